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

import numpy as np


def squared_norm(values: np.ndarray) -> float:
    """|v|^2 in float64 (the gradients are float32; their squares would lose digits summed in float32)."""
    flat = values.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(flat, flat))


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
