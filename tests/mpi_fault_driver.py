"""Runs the trainer with a fault injected: rank FAULT_RANK raises on its FAULT_CALL-th training step."""

import os
import sys

from mpi4py import MPI

import cnnpar.model as model_lib
from cnnpar.train import main

FAULT_RANK = int(os.environ["FAULT_RANK"])
FAULT_CALL = int(os.environ["FAULT_CALL"])
_original = model_lib.Network.sampled_forward_backward
_calls = [0]


def _faulty(self, images, labels):
    step = _original(self, images, labels)

    def faulty_step(*args):
        _calls[0] += 1
        if MPI.COMM_WORLD.Get_rank() == FAULT_RANK and _calls[0] == FAULT_CALL:
            raise RuntimeError("injected fault")
        return step(*args)

    return faulty_step


model_lib.Network.sampled_forward_backward = _faulty
sys.exit(main(sys.argv[1:]))
