"""SGD on the flat parameter / gradient buffers (see cnnpar.model for their layout).

    velocity = momentum * velocity + grads          (only when momentum > 0)
    params  -= scale * (velocity if momentum > 0 else grads)

with scale = lr for reduce='sum' (the paper: the step's gradients are summed, never averaged) and
lr / n_samples for reduce='mean', n_samples being the step's global sample count. A step with
n_samples == 0 changes nothing. One njit call per step, nothing allocated.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import sgd_step_kernel  # beside the drivers that call it too: see cnnpar.kernels

REDUCES = ("sum", "mean")


class SGD:
    """Plain / momentum SGD over flat float32 buffers; `velocity` is the momentum state (checkpoint it)."""

    def __init__(self, n_params: int, lr: float, momentum: float = 0.0, reduce: str = "sum"):
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        if not lr > 0 or not np.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.n_params = int(n_params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.reduce = reduce
        self.velocity = np.zeros(self.n_params, np.float32)
        self._shape = (self.n_params,)
        self._retype(self.velocity.dtype)

    def step(self, params: np.ndarray, grads: np.ndarray, n_samples: int, lr: float | None = None,
             zero_grads: bool = False) -> None:
        """One update of params (in place) from grads holding the step's n_samples gradients summed.

        zero_grads=True also clears grads, in the same pass, ready for the next step's accumulation
        (cheaper than a separate grads.fill(0); with n_samples == 0 they are cleared alone)."""
        if n_samples <= 0:
            if zero_grads:
                grads.fill(0)
            return
        if params.shape != self._shape or grads.shape != self._shape:
            raise ValueError(f"params {params.shape} and grads {grads.shape} must both be ({self.n_params},)")
        scale = self.lr if lr is None else lr
        if self.reduce == "mean":
            scale /= n_samples
        dtype = params.dtype
        if dtype is not self._dtype:  # a float64 run (tests): keep the state and the update in its dtype
            self._retype(dtype)
        if scale != self._scale:  # converting to a numpy scalar costs as much as a small step: reuse it
            self._scale, self._scale_typed = scale, self._dtype.type(scale)
        sgd_step_kernel(params, grads, self.velocity, self._scale_typed, self._momentum_typed, zero_grads)

    def momentum_typed(self, dtype):
        """The momentum as a scalar of `dtype`, the params' (the state follows that dtype from here)."""
        if dtype is not self._dtype:
            self._retype(dtype)
        return self._momentum_typed

    def _retype(self, dtype) -> None:
        self._dtype = dtype
        self.velocity = self.velocity.astype(dtype)
        self._momentum_typed = dtype.type(self.momentum)  # float32 scalars keep the update in float32
        self._scale = math.nan


# ---------------------------------------------------------------------------------------- the lr schedule

def learning_rate(config, step: int, global_batch: int) -> float:
    """The base lr, or with --lr-scaling linear the lr x global batch reached by a linear warm-up."""
    if config.lr_scaling == "none":
        return config.lr
    target = config.lr * global_batch
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr + (target - config.lr) * (step + 1) / config.warmup_steps
    return target


def learning_rate_constant_from(config) -> int:
    """The first step from which learning_rate no longer changes (the loop stops asking it then)."""
    return config.warmup_steps if config.lr_scaling != "none" else 0
