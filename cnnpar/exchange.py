"""Gradient exchanges: how one step's per-rank gradients become the step's summed gradient.

Every exchange has the same small interface, so the training loop never
changes when the communication does (mpi4py-demo style: same compute,
swappable communication):

    params = exchange.bind(params)   # once; an exchange may move params into shared memory (hogwild)
    exchange.reduce(grads)           # every step, in place: grads becomes the sum over all ranks
    exchange.close()                 # every exit path; frees windows and communicators

`reduce` returns the seconds this rank spent waiting for the others when the
exchange can tell (shared-memory flags), or NaN when it cannot; then the
trainer estimates the wait from the ranks' arrival times (`split_wait`).
"""

from __future__ import annotations

import math

import numpy as np

from .dist import Dist


class Exchange:
    name = "base"
    lossless = True        # False where updates may be lost by design (race, hogwild)
    deterministic = True   # same inputs -> bit-identical result
    replicas_agree = True  # False where a params checksum cannot be compared: 'local' (replicas diverge by
                           # design) and 'hogwild' (one shared copy, still being written when ranks check)
    excluded_s = 0.0       # seconds of the last reduce() spent on diagnostics (the race audit), not exchange
    first_step = 0         # global step of the first reduce() (a resumed run starts later)

    def bind(self, params: np.ndarray) -> np.ndarray:
        return params

    def reduce(self, grads: np.ndarray) -> float:
        raise NotImplementedError

    def drain_audit(self) -> dict | None:
        """Per-step race-audit figures gathered since the last call (rank 0 logs them), or None."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExchange(Exchange):
    """No exchange at all: each rank trains its own replica. Gives the compute-only bound."""

    name = "local"
    replicas_agree = False

    def reduce(self, grads: np.ndarray) -> float:
        return 0.0


class MpiAllreduce(Exchange):
    """MPI_Allreduce(IN_PLACE, SUM) on the flat gradient buffer; non-blocking and core-yielding when
    ranks outnumber cores, so a waiting rank hands its core to the rank still computing."""

    name = "mpi"

    def __init__(self, dist: Dist):
        from mpi4py import MPI

        self._comm = dist.comm
        self._in_place = MPI.IN_PLACE
        self._sum = MPI.SUM
        self._dist = dist
        self._alone = dist.size == 1

    def reduce(self, grads: np.ndarray) -> float:
        if self._alone:  # the sum over one rank is its own gradient; MPI would still cost ~1.5 us a step
            return 0.0
        if self._dist.yield_when_waiting:
            self._dist.wait(self._comm.Iallreduce(self._in_place, grads, self._sum))
        else:
            self._comm.Allreduce(self._in_place, grads, self._sum)
        return math.nan


def split_wait(arrive_s: np.ndarray, reduce_s: np.ndarray, measured_wait_s: np.ndarray) -> tuple:
    """Split each rank's time in `reduce` into waiting for slower ranks and exchanging.

    arrive_s, reduce_s, measured_wait_s: (steps, ranks). `arrive_s` is the time from a rank's step start
    to entering `reduce`. A blocking exchange releases all ranks at nearly the same moment, so steps
    start aligned and rank r waits for about max_j(arrive_j) - arrive_r. Where the exchange measured
    its wait itself (not NaN), that measurement wins. Returns (exchange_s, wait_s).
    """
    estimated = arrive_s.max(axis=1, keepdims=True) - arrive_s
    wait_s = np.where(np.isnan(measured_wait_s), np.minimum(estimated, reduce_s), measured_wait_s)
    wait_s = np.clip(wait_s, 0.0, reduce_s)
    return reduce_s - wait_s, wait_s


def make_exchange(config, dist: Dist, n_params: int, network=None) -> Exchange:
    """The exchange a config asks for; modes that need shared memory fall back or refuse clearly.

    network: the model being trained; with it, 'auto' (and 'factored') can exchange its dense layers'
    sufficient factors instead of their gradients (exchange_factored), at one sample per rank."""
    mode = config.mode
    if mode == "local":
        return LocalExchange()
    if mode == "sync":
        if config.allreduce == "mpi" or dist.size == 1:  # 'auto' is decided by exchange_shm
            return MpiAllreduce(dist)
        from . import exchange_shm
        return exchange_shm.make_sync_exchange(config.allreduce, dist, n_params, network=network,
                                               samples_per_rank=getattr(config, "samples_per_rank", 1))
    from . import race
    return race.make_race_exchange(config, dist, n_params)
