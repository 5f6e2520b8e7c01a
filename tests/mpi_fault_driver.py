"""Runs the trainer with a fault injected: rank FAULT_RANK raises on its FAULT_CALL-th forward/backward."""

import os
import sys

from mpi4py import MPI

import cnnpar.model as model_lib
from cnnpar.train import main

FAULT_RANK = int(os.environ["FAULT_RANK"])
FAULT_CALL = int(os.environ["FAULT_CALL"])
_original = model_lib.Network.forward_backward
_calls = [0]


def _faulty(self, *args, **kwargs):
    _calls[0] += 1
    if MPI.COMM_WORLD.Get_rank() == FAULT_RANK and _calls[0] == FAULT_CALL:
        raise RuntimeError("injected fault")
    return _original(self, *args, **kwargs)


model_lib.Network.forward_backward = _faulty
sys.exit(main(sys.argv[1:]))
