#!/usr/bin/env python3
"""The threshold as a prediction: the smallest rank count N at which averaged-gradient SGD at a given lr
trains (one epoch, the default arch), from a short probe of the loss landscape.

    cnnpar predict --dataset fashion-mnist --reduce mean --lr 0.178
    -> {"critical_n": 2, "inputs": {...}}

The probe is the first PROBE_STEPS steps of a safe run (lr PROBE_LR, two samples per step, --noise-scale:
each sample's gradient against the step's sum), written as an ordinary run log. From that log come

- B_noise, the early gradient noise scale tr(Sigma) / |G|^2 over the probe's windows (cnnpar.noise), and
- eps_max = |G|^2 / (G^T H G), the learning rate of the best step along the true gradient, at the probe's
  final parameters: G is the mean gradient of CURVATURE_SAMPLES training samples and H G a central finite
  difference of two such gradients, at params +- h G/|G| (the trainer's own kernels).

McCandlish et al. 2018 (eq. 2.6-2.7): with a mean gradient over B samples, a step of lr changes the loss by
-lr |G|^2 + lr^2/2 (G^T H G + tr(H Sigma) / B); it rises (the run is kicked out, here: collapses to a
constant output) once lr > 2 eps_max / (1 + B_noise / B). With tr(H Sigma) / G^T H G approximated by the
simple noise scale, and the factor 2 replaced by a constant C fitted on one dataset (the probe's eps_max and
B_noise are not those of the steps where a run's fate is decided, and C absorbs the difference), a run
trains when

    lr <= C eps_max B / (B + B_noise),   i.e.   B >= lr B_noise / (C eps_max - lr),

and the critical N is the smallest integer B >= 1 that satisfies it (none when lr >= C eps_max). C is
fitted on fashion-mnist (the map's fit dataset) by `cnnpar report` and tested there on mnist-5k.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cnnpar.errors import UserError, exit_on_user_error

PROBE_STEPS = 400
PROBE_LR = 0.01           # trains at one sample per step on every dataset of the map
PROBE_SAMPLES = 2         # per step: B_small = 1 sample, B_big = 2
PROBE_WINDOW = 100        # steps per noise estimate
CURVATURE_SAMPLES = 1000
CURVATURE_STEP = 1e-2     # |params change| of the finite difference, along G/|G|
MAX_N = 12
# fitted on fashion-mnist's observed thresholds by the map report's threshold section (runs/predict/map:
# lr 0.178 at N = 1..12, 8 seeds; one rank at lr 0.178/N, 2 seeds), the probe of seed 1
CALIBRATED_C = 58.6


def probe_args(dataset: str, seed: int, log: str, data_dir: str = "") -> list:
    args = ["--dataset", dataset, "--reduce", "mean", "--lr", str(PROBE_LR), "--steps", str(PROBE_STEPS),
            "--samples-per-rank", str(PROBE_SAMPLES), "--noise-scale", "--log-window", str(PROBE_WINDOW),
            "--seed", str(seed), "--log", log, "--quiet"]
    return args + (["--data-dir", data_dir] if data_dir else [])


def run_probe(dataset: str, seed: int, log: str, data_dir: str = "") -> None:
    """The probe run in this process (the trainer's main; its summary line is kept off stdout)."""
    from cnnpar import train

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            rc = train.main(probe_args(dataset, seed, log, data_dir))
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
    if rc != 0:
        raise UserError("probe", f"the probe run exited {rc}: {buffer.getvalue().strip()[-300:]}")


def noise_of(log) -> dict:
    """The probe's early noise scale: the windows' mean estimates, weighted by their step counts."""
    steps = np.asarray(log.noise["steps"], np.float64)
    g2 = float(np.sum(steps * log.noise["g2"]) / steps.sum())
    trace = float(np.sum(steps * log.noise["trace"]) / steps.sum())
    return {"g2": g2, "trace": trace, "b_noise": trace / g2 if g2 > 0 else float("nan"),
            "noise_steps": int(steps.sum())}


def mean_gradient(network, params, images, labels) -> np.ndarray:
    grads = np.zeros(network.n_params, network.dtype)
    network.forward_backward(params, grads, images, labels)
    return grads.astype(np.float64) / len(labels)


def curvature_along_gradient(network, params, images, labels, step: float = CURVATURE_STEP) -> dict:
    """|G|^2, G^T H G / |G|^2 (the curvature along G) and eps_max = |G|^2 / G^T H G on (images, labels),
    H G by a central difference of the mean gradient at params +- step G/|G|."""
    g = mean_gradient(network, params, images, labels)
    norm = float(np.linalg.norm(g))
    u = g / norm
    plus = (params.astype(np.float64) + step * u).astype(network.dtype)
    minus = (params.astype(np.float64) - step * u).astype(network.dtype)
    hu = (mean_gradient(network, plus, images, labels) - mean_gradient(network, minus, images, labels)) / (2 * step)
    curvature = float(u @ hu)
    return {"g2_batch": norm ** 2, "curvature": curvature,
            "eps_max": 1.0 / curvature if curvature > 0 else float("inf")}


def per_sample_noise(network, params, images, labels) -> dict:
    """B_noise from every sample's own gradient: tr(Sigma) = mean |g_i - g|^2 x M/(M-1), |G|^2 = |g|^2 -
    tr(Sigma)/M (unbiased), over M samples at one point of parameter space (no training in between)."""
    count = len(labels)
    grads = np.zeros(network.n_params, network.dtype)
    total = np.zeros(network.n_params, np.float64)
    sq_sum = 0.0
    for i in range(count):
        grads[:] = 0
        network.forward_backward(params, grads, images[i:i + 1], labels[i:i + 1])
        g = grads.astype(np.float64)
        total += g
        sq_sum += float(g @ g)
    mean = total / count
    trace = (sq_sum / count - float(mean @ mean)) * count / (count - 1)
    g2 = float(mean @ mean) - trace / count
    return {"g2": g2, "trace": trace, "b_noise": trace / g2 if g2 > 0 else float("nan")}


def probe_inputs(log_path: str) -> dict:
    """Every input of the prediction, from the probe's log alone (its config, noise windows, final params)."""
    from cnnpar import data, model
    from cnnpar.runlog import open_log

    log = open_log(log_path)
    if log.noise is None or not len(log.noise["step"]):
        raise UserError(log_path, "holds no noise-scale windows: not a probe log")
    c = log.config
    dataset = data.load_dataset(c["dataset"], c.get("data_dir") or None, float(c.get("input_scale", 1.0)))
    network = model.build_network(c["arch"], dataset.train_images.shape[1:], dataset.n_classes)
    params = np.ascontiguousarray(log.final["params"], network.dtype)
    take = np.random.default_rng([int(c["seed"]), 23]).permutation(len(dataset.train_labels))[:CURVATURE_SAMPLES]
    take.sort()
    images, labels = dataset.train_images[take], dataset.train_labels[take]
    curvature = curvature_along_gradient(network, params, images, labels)
    # the same two quantities where every run of the seed starts (added after the first comparison with
    # mnist-5k's thresholds: the probe's windowed estimate is far above the early one the collapse sees)
    start = network.init_params(int(c["seed"]))
    at_start = per_sample_noise(network, start, images, labels)
    curvature_start = curvature_along_gradient(network, start, images, labels)
    return {"dataset": c["dataset"], "seed": int(c["seed"]), "probe_log": str(log_path),
            "probe_steps": int(log.final["attrs"]["steps"]), **noise_of(log), **curvature,
            "start_b_noise": at_start["b_noise"], "start_g2": at_start["g2"], "start_trace": at_start["trace"],
            "start_eps_max": curvature_start["eps_max"]}


def critical_n(lr: float, eps_max: float, b_noise: float, c: float = CALIBRATED_C, max_n: int = MAX_N):
    """The smallest B >= 1 with lr <= c eps_max B / (B + b_noise); None when none up to max_n does."""
    limit = c * eps_max
    if not (limit > lr) or not math.isfinite(b_noise):
        return None
    n = max(1, math.ceil(lr * max(b_noise, 0.0) / (limit - lr) - 1e-12))
    return n if n <= max_n else None


def c_interval(lr: float, observed_n, eps_max: float, b_noise: float, max_n: int = MAX_N) -> tuple:
    """The constants c for which critical_n(lr, ...) == observed_n (observed None: no N up to max_n)."""
    def c_for(b):  # the c at which B = b is exactly at the boundary
        return lr * (b + b_noise) / (b * eps_max)
    if observed_n is None:
        return 0.0, c_for(max_n)
    low = c_for(observed_n)
    high = c_for(observed_n - 1) if observed_n > 1 else math.inf
    return low, high


def predict(dataset: str, lr: float, seed: int = 1, log: str = "", data_dir: str = "",
            c: float = CALIBRATED_C) -> dict:
    with contextlib.ExitStack() as stack:
        if not log:
            log = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "probe.h5")
        if not Path(log).exists():
            run_probe(dataset, seed, log, data_dir)
        inputs = probe_inputs(log)
    inputs.update({"lr": lr, "c": c})
    return {"critical_n": critical_n(lr, inputs["eps_max"], inputs["b_noise"], c), "inputs": inputs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpar predict", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--dataset", default="mnist-5k", help="dataset name or folder (default mnist-5k)")
    parser.add_argument("--reduce", default="mean", help="only 'mean': the law is for averaged gradients")
    parser.add_argument("--lr", type=float, required=True, help="the learning rate to predict for")
    parser.add_argument("--seed", type=int, default=1, help="the probe's seed (default 1)")
    parser.add_argument("--probe-log", default="", help="keep the probe's log here (reused when it exists)")
    parser.add_argument("--data-dir", default="", help="where datasets are looked for first")
    parser.add_argument("--c", type=float, default=CALIBRATED_C, help=f"the constant (default {CALIBRATED_C})")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.reduce != "mean":
        raise UserError("--reduce", f"the prediction is for averaged gradients ('mean'), not {args.reduce!r}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError("--lr", f"must be a positive finite number, got {args.lr}")
    result = predict(args.dataset, args.lr, args.seed, args.probe_log, args.data_dir, args.c)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
