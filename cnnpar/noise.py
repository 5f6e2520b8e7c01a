"""The gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
appendix A.1), from the two batch sizes every data-parallel step already holds.

For a mean gradient g_B over B samples drawn independently, E|g_B|^2 = |G|^2 + tr(Sigma)/B, where G is
the true gradient and Sigma the per-sample gradient covariance. A step holds gradients at two batch sizes:
each rank's own (B_small = samples per rank; with one rank, each sample's gradient, B_small = 1) and their
sum over the step (B_big = the global batch). Two equations in two unknowns give unbiased estimates

    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)
    |G|^2     = |g_big|^2 - tr(Sigma) / B_big

and the simple noise scale B_simple = tr(Sigma) / |G|^2 is the batch size at which the gradient's noise
and signal are about equal. Each step's estimates are very noisy (|G|^2 often comes out negative), so
B_simple is the ratio of the two estimates' *means* over a window or an epoch, not a mean of ratios.

Everything here is plain numerics on arrays: the trainer gathers the per-rank norms (communication is not
this module's business) and passes them in. Gradients are given as sums over samples, the way the
trainer holds them before the learning rate is applied.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _sum_of_squares(flat):
    total = 0.0  # float64: float32 squares summed in float32 would lose digits
    for x in flat:
        total += np.float64(x) * np.float64(x)
    return total


def squared_norm(values: np.ndarray) -> float:
    """|v|^2, accumulated in float64 in index order (so equal vectors give equal bits, whatever the path)."""
    return float(_sum_of_squares(values.reshape(-1)))


def step_terms(unit_sq_sums: np.ndarray, unit_counts: np.ndarray, total_sq_sum: np.ndarray) -> tuple:
    """The two batch sizes' mean squared gradient norms of each step, from summed gradients.

    unit_sq_sums: (steps, units) |s_u|^2, where s_u is the sum of unit u's per-sample gradients (a unit is a
        rank, or a sample inside a single rank); counts of 0 mark units without samples in that step.
    unit_counts: (steps, units) samples in each unit, b_u.
    total_sq_sum: (steps,) |sum_u s_u|^2.
    Returns (small_sq, small_inv_batch, big_sq, big_inv_batch), each (steps,): the mean over units of
    |s_u / b_u|^2 and of 1/b_u, and |sum / B|^2 and 1/B with B = sum_u b_u. With units of unequal size
    the small batch's E|g|^2 is |G|^2 + tr(Sigma) x mean(1/b_u), hence the mean inverse batch.
    """
    sq = np.atleast_2d(np.asarray(unit_sq_sums, np.float64))
    counts = np.atleast_2d(np.asarray(unit_counts, np.float64))
    total = np.atleast_1d(np.asarray(total_sq_sum, np.float64))
    present = counts > 0
    safe = np.where(present, counts, 1.0)
    units = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        small_sq = np.where(present, sq / safe ** 2, 0.0).sum(axis=1) / units
        small_inv = np.where(present, 1.0 / safe, 0.0).sum(axis=1) / units
        big_batch = counts.sum(axis=1)
        big_sq = total / big_batch ** 2
        big_inv = 1.0 / big_batch
    return small_sq, small_inv, big_sq, big_inv


def unbiased_estimates(small_sq, small_inv_batch, big_sq, big_inv_batch) -> tuple:
    """(|G|^2, tr(Sigma)) per step from the two batch sizes' squared norms; NaN where the two batch sizes
    are equal (one unit in the step: nothing to compare)."""
    small_sq, small_inv, big_sq, big_inv = (np.asarray(a, np.float64) for a in
                                            (small_sq, small_inv_batch, big_sq, big_inv_batch))
    gap = small_inv - big_inv
    with np.errstate(invalid="ignore", divide="ignore"):
        trace = np.where(gap > 0, (small_sq - big_sq) / np.where(gap > 0, gap, 1.0), np.nan)
    return big_sq - trace * big_inv, trace


def b_simple(g2, trace) -> float:
    """tr(Sigma) / |G|^2 from the means of the per-step estimates (steps with NaN left out); NaN when the
    mean |G|^2 is not positive (the noise swamps the signal: the estimate says nothing but 'large')."""
    g2, trace = np.asarray(g2, np.float64), np.asarray(trace, np.float64)
    keep = np.isfinite(g2) & np.isfinite(trace)
    if not keep.any():
        return float("nan")
    mean_g2 = float(g2[keep].mean())
    return float(trace[keep].mean()) / mean_g2 if mean_g2 > 0 else float("nan")


def per_sample_forward_backward(forward_backward_at, params, grads, scratch, order, start: int, stop: int):
    """One rank's samples [start, stop) one at a time, so their gradients can be measured apart.

    Same result as forward_backward_at(params, grads, order, start, stop) bit for bit: that adds the samples'
    gradients to `grads` one after another in sample order, and so does this (each computed alone in the
    zeroed `scratch` first). Returns (loss_sum, correct, per-sample |gradient|^2 array)."""
    loss_sum, correct = 0.0, 0
    sq = np.empty(stop - start, np.float64)
    for i in range(start, stop):
        scratch[:] = 0.0
        loss, hit = forward_backward_at(params, scratch, order, i, i + 1)
        loss_sum += loss
        correct += hit
        sq[i - start] = squared_norm(scratch)
        grads += scratch
    return loss_sum, correct, sq


class NoiseMeter:
    """The trainer's per-step bookkeeping for the estimate (no communication here: the trainer gathers
    `take_rows()` of every rank with its window of step statistics and hands them to `window_summary`).

    Per step each rank keeps one row of ROW_FIELDS: the sum over its units of |s_u / b_u|^2, the sum of
    1/b_u, the number of units, and (rank 0) |sum over the step|^2. A unit is the rank's batch, or with a
    single rank each of its samples (B_small = 1), whose gradients are then computed one at a time."""

    ROW_FIELDS = ("small_sq_sum", "inv_batch_sum", "units", "total_sq")

    def __init__(self, n_params: int, ranks: int, samples_per_rank: int, is_root: bool):
        self.per_sample = ranks == 1
        self.scratch = np.zeros(n_params, np.float32) if self.per_sample else None
        self.is_root = is_root
        self.rows = []
        self._small = (0.0, 0.0, 0)
        self.epoch_g2, self.epoch_trace, self.epoch_steps = 0.0, 0.0, 0

    def forward_backward(self, forward_backward_at, params, grads, order, start: int, stop: int):
        """The step's forward/backward, noting this rank's small-batch terms before the exchange."""
        if self.per_sample:
            loss_sum, correct, sq = per_sample_forward_backward(forward_backward_at, params, grads,
                                                                self.scratch, order, start, stop)
            self._small = (float(sq.sum()), float(len(sq)), len(sq))
        else:
            loss_sum, correct = forward_backward_at(params, grads, order, start, stop)
            count = stop - start
            self._small = ((squared_norm(grads) / count ** 2, 1.0 / count, 1) if count else (0.0, 0.0, 0))
        return loss_sum, correct

    def after_exchange(self, summed_grads) -> None:
        total = squared_norm(summed_grads) if self.is_root else float("nan")
        self.rows.append(self._small + (total,))

    def take_rows(self) -> np.ndarray:
        rows = np.array(self.rows, np.float64).reshape(len(self.rows), len(self.ROW_FIELDS))
        self.rows.clear()
        return rows

    def window_summary(self, gathered: list, step_counts) -> dict:
        """Rank 0: the window's estimates from every rank's rows (steps x fields each) and the steps'
        global batch sizes; adds them to the epoch's running sums."""
        per_rank = np.stack(gathered, axis=1)  # (steps, ranks, fields)
        units = per_rank[:, :, 2].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            small_sq = per_rank[:, :, 0].sum(axis=1) / units
            small_inv = per_rank[:, :, 1].sum(axis=1) / units
            big_batch = np.asarray(step_counts, np.float64)
            big_sq = per_rank[:, 0, 3] / big_batch ** 2
        g2, trace = unbiased_estimates(small_sq, small_inv, big_sq, 1.0 / big_batch)
        keep = np.isfinite(g2) & np.isfinite(trace)
        self.epoch_g2 += float(g2[keep].sum())
        self.epoch_trace += float(trace[keep].sum())
        self.epoch_steps += int(keep.sum())
        n = max(int(keep.sum()), 1)
        return {"steps": int(keep.sum()), "b_small": float(np.mean(1.0 / small_inv[keep])) if keep.any()
                else float("nan"), "b_big": float(np.mean(big_batch)),
                "g2": float(g2[keep].sum()) / n if keep.any() else float("nan"),
                "trace": float(trace[keep].sum()) / n if keep.any() else float("nan"),
                "b_simple": b_simple(g2, trace)}

    def epoch_sums(self) -> np.ndarray:
        """Rank 0: the running sums of the epoch so far (g2, trace, steps), for a checkpoint."""
        return np.array([self.epoch_g2, self.epoch_trace, self.epoch_steps], np.float64)

    def restore_epoch_sums(self, sums) -> None:
        """Rank 0: continue an epoch from a checkpoint's `epoch_sums()`, so a resumed epoch's estimate
        is the one an uninterrupted run reports."""
        g2, trace, steps = (float(v) for v in sums)
        self.epoch_g2, self.epoch_trace, self.epoch_steps = g2, trace, int(steps)

    def epoch_summary(self) -> dict:
        """Rank 0: the epoch's mean estimates and B_simple (the ratio of the means); resets the sums."""
        n = self.epoch_steps
        g2 = self.epoch_g2 / n if n else float("nan")
        trace = self.epoch_trace / n if n else float("nan")
        self.epoch_g2, self.epoch_trace, self.epoch_steps = 0.0, 0.0, 0
        return {"steps": n, "g2": g2, "trace": trace,
                "b_simple": trace / g2 if n and g2 > 0 else float("nan")}
