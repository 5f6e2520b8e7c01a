"""Runs the trainer with a fault injected.

FAULT_RANK / FAULT_CALL: rank FAULT_RANK raises on its FAULT_CALL-th training step (a crash).
FAULT_DISK: rank 0's disk fills up just before one write: `publish:N` (the N-th write of the log file;
1 is its creation), `checkpoint:N` (the N-th checkpoint) or `final` (the closing write of a complete
run). FAULT_DISK_HOW=fill writes a filler file beside the log until the file system is full (use it on
a small tmpfs only); FAULT_DISK_HOW=rlimit sets RLIMIT_FSIZE to 0 instead, so every later write to a
file fails with EFBIG (where no tmpfs can be mounted).
"""

import errno
import os
import resource
import signal
import sys

from mpi4py import MPI

import cnnpar.checkpoint as checkpoint_lib
import cnnpar.model as model_lib
from cnnpar.runlog.writer import RunLogWriter
from cnnpar.train import main

RANK = MPI.COMM_WORLD.Get_rank()


def _crash_on_call(fault_rank: int, fault_call: int) -> None:
    original = model_lib.Network.sampled_forward_backward
    calls = [0]

    def faulty(self, images, labels):
        step = original(self, images, labels)

        def faulty_step(*args):
            calls[0] += 1
            if RANK == fault_rank and calls[0] == fault_call:
                raise RuntimeError("injected fault")
            return step(*args)

        return faulty_step

    model_lib.Network.sampled_forward_backward = faulty
    original_window = model_lib.Network.sampled_train_steps

    def faulty_window(self, images, labels):  # a rank without an exchange runs windows of steps in one call
        steps = original_window(self, images, labels)

        def faulty_steps(*args):
            n_steps = args[10]
            calls[0] += max(n_steps, 1)  # the warm-up's call runs no step and counts one, as the step's does
            if RANK == fault_rank and calls[0] >= fault_call:
                raise RuntimeError("injected fault")
            return steps(*args)

        return faulty_steps

    model_lib.Network.sampled_train_steps = faulty_window


def _fill_disk(folder: str, how: str) -> None:
    if how == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        return
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def _disk_full_at(moment: str, how: str) -> None:
    kind, _, count = moment.partition(":")
    calls = {"publish": 0, "checkpoint": 0}

    def before(what, path):
        if kind == what:
            calls[what] += 1
            if calls[what] == int(count or 1):
                _fill_disk(os.path.dirname(os.path.abspath(path)), how)

    publish, save, close = RunLogWriter._publish, checkpoint_lib.save, RunLogWriter.close

    def publish_then(self, *args, **kwargs):
        before("publish", self.path)
        return publish(self, *args, **kwargs)

    def save_then(path, **kwargs):
        before("checkpoint", path)
        return save(path, **kwargs)

    def close_then(self, status=None, message=""):
        if kind == "final" and status == "complete":
            _fill_disk(os.path.dirname(os.path.abspath(self.path)), how)
        return close(self, status, message)

    RunLogWriter._publish, checkpoint_lib.save, RunLogWriter.close = publish_then, save_then, close_then


if "FAULT_RANK" in os.environ:
    _crash_on_call(int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_CALL"]))
if "FAULT_DISK" in os.environ and RANK == 0:
    _disk_full_at(os.environ["FAULT_DISK"], os.environ.get("FAULT_DISK_HOW", "fill"))
sys.exit(main(sys.argv[1:]))
