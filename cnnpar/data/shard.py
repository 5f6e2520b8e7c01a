"""Sharding, the trainer's hot path: how a data-parallel epoch is cut into steps and each step into the
ranks' slices (the rule is the package docstring's)."""

from __future__ import annotations

import numpy as np


def _check_shard_args(n_samples: int, ranks: int, samples_per_rank: int) -> None:
    if n_samples < 1 or ranks < 1 or samples_per_rank < 1:
        raise ValueError(f"need n_samples, ranks, samples_per_rank >= 1, got {n_samples}, {ranks}, "
                         f"{samples_per_rank}")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's sample order (int64), identical on every rank and in every process for (seed, epoch)."""
    if seed < 0 or epoch < 0 or n < 0:
        raise ValueError(f"seed, epoch and n must not be negative, got {seed}, {epoch}, {n}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n_samples: int, ranks: int, samples_per_rank: int) -> int:
    """ceil(n_samples / (ranks * samples_per_rank)): the last step may be short."""
    _check_shard_args(n_samples, ranks, samples_per_rank)
    return -(-n_samples // (ranks * samples_per_rank))


def rank_slices(n_samples: int, ranks: int, samples_per_rank: int, rank: int) -> tuple:
    """`rank`'s [start, stop) slice of every step of an epoch in the epoch permutation, and each step's
    global batch size, as int64 arrays of steps_per_epoch entries (the package docstring gives the rule; a
    short last step may leave a rank an empty slice). The trainer computes them once, not on every step."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range for {ranks} ranks")
    n_steps = steps_per_epoch(n_samples, ranks, samples_per_rank)
    batch = ranks * samples_per_rank
    steps = np.arange(n_steps, dtype=np.int64)
    sizes = np.minimum(batch, n_samples - steps * batch)
    base, extra = np.divmod(sizes, ranks)
    starts = steps * batch + rank * base + np.minimum(rank, extra)
    return starts, starts + base + (rank < extra), sizes
