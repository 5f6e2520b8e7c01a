"""--allreduce mpi: MPI_Allreduce on the flat gradient buffer."""

from __future__ import annotations

import math

import numpy as np

from ..dist import Dist
from .interface import Exchange


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
        self._alone = self.reduces_nothing = dist.size == 1

    def reduce(self, grads: np.ndarray) -> float:
        if self._alone:  # the sum over one rank is its own gradient; MPI would still cost ~1.5 us a step
            return 0.0
        if self._dist.yield_when_waiting:
            self._dist.wait(self._comm.Iallreduce(self._in_place, grads, self._sum))
        else:
            self._comm.Allreduce(self._in_place, grads, self._sum)
        return math.nan  # the trainer estimates the wait (Exchange.split_wait)
