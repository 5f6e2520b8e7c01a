"""The exchange modes, their families, and the rule for the factored exchange: the one place these facts
live. It imports nothing, so the config, the warm-up, the exchanges, the benchmarks and the analysis can all
ask it without loading MPI or numba."""

from __future__ import annotations

MODES = ("sync", "local", "race", "atomic", "hogwild")
# The modes whose updates go through a shared window without a lock or a collective sum: each step's
# result depends on how the ranks interleave, so the race audit applies and the exchange kernels are
# the race module's.
RACE_MODES = ("race", "atomic", "hogwild")
# The race modes that accumulate one-sided into an owner's window (hogwild updates shared params instead).
ONE_SIDED_MODES = ("race", "atomic")

# The factored exchange rebuilds each dense layer's weight gradient from one outer product per rank, so
# it needs exactly one sample per rank, in float32 (the precision whose rounding it reproduces).
FACTORED_SAMPLES_PER_RANK = 1
FACTORED_DTYPE = "float32"


def is_race_mode(mode: str) -> bool:
    return mode in RACE_MODES


def factored_fits(samples_per_rank: int, dtype=FACTORED_DTYPE) -> bool:
    """Whether a run's batch shape and precision allow the factored exchange (the network's own checks,
    exchange/factored.py's `applies`, come on top)."""
    return samples_per_rank == FACTORED_SAMPLES_PER_RANK and str(dtype) == FACTORED_DTYPE
