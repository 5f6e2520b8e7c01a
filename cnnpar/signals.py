"""Stopping a run cleanly: signals and write errors noted on one rank, agreed on by all at a step boundary.

A signal handler may run between any two bytecodes, in the middle of an MPI call's Python wrapper or
halfway through a log flush, so it only notes the signal. The training loop asks `agreed(comm)` at
every window flush (a point all ranks of the replica reach at the same step); that one small allreduce
tells every rank the most serious reason any rank has to stop, so all of them stop at the same step
boundary even when only one rank got the signal (`kill` of one rank) or only rank 0 failed to write.

SIGINT (Ctrl-C) ends the run as `interrupted` (exit 130); SIGTERM (a scheduler's preemption or time
limit, `scancel`) and SIGUSR1 (Slurm's `--signal=USR1@T` warning) end it as `preempted` (exit 143 and
138). While the loop runs, a second stop signal at least `SECOND_SIGNAL_S` after the first kills the
process at once with the signal's default action; copies within that second are ignored, because the
launcher forwards a terminal's Ctrl-C to ranks that got it already, milliseconds later. Once the ranks
agree to stop, that escalation is cancelled and every later stop signal is only noted, so nothing cuts
the shutdown (checkpoint, log close, MPI's finalise) short.

MPICH's hydra mpiexec forwards SIGINT, SIGTERM and SIGUSR1 to every rank. Open MPI's mpirun turns
SIGINT and SIGTERM into SIGTERM for every rank and sends SIGKILL a few seconds later, and forwards
SIGUSR1 and SIGUSR2; so under Open MPI a run stops as `preempted` whichever of the two it got.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import kernel_cache

SECOND_SIGNAL_S = 1.0
WRITE_ERROR_CODE = 1 << 10  # above every signal number: a failed write outranks a signal
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted", signal.SIGUSR1: "preempted"}


@dataclass(frozen=True)
class Stop:
    """Why every rank stops: a signal (`signum`) or rank 0's failed write (`signum` 0)."""

    signum: int

    @property
    def by_signal(self) -> bool:
        return self.signum != 0

    @property
    def status(self) -> str:
        """The log's status for this stop."""
        return STOP_SIGNALS[signal.Signals(self.signum)] if self.by_signal else "failed"

    @property
    def exit_status(self) -> int:
        return 128 + self.signum if self.by_signal else 1

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.by_signal else "write error"


class StopRequest:
    """Notes stop signals (after `install()`) and a write error (`note_write_error`); `agreed(comm)`
    is collective and returns the same `Stop` (or None) on every rank of `comm`.

    Its handlers live from `install()` to `restore()`, which the trainer calls once the process has
    nothing left to shut down. The second-signal escalation lives only while the loop runs (`with`
    around it): the ranks agreeing to stop, or the loop ending any other way, cancels it (`stand_down`),
    so the shutdown that follows (checkpoint, log close, MPI finalise) cannot be cut short by it; a
    stop signal during the shutdown is only noted."""

    def __init__(self):
        self.signum = 0
        self.first_at = 0.0
        self.write_error = None
        self.escalating = False  # inside the loop: a second signal may still kill at once
        self._previous = {}
        self._mine = np.zeros(1, np.int32)
        self._agreed = np.zeros(1, np.int32)

    def install_for_startup(self, speaks: bool) -> "StopRequest":
        """Until `install()`: a stop signal ends this process at once (`exit_at_once`). Start-up (data,
        kernels, the exchange's windows) has no step boundary to agree at and has written nothing."""
        self._speaks = speaks
        return self._take(self._exit_at_once)

    def install(self) -> "StopRequest":
        """From here (just before the log is created) stop signals are noted, and acted upon at a step."""
        return self._take(self._note)

    def _take(self, handler) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.signal(signum, handler)
                self._previous.setdefault(signum, previous)
        return self

    def _exit_at_once(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if self._speaks:
            line = (f"cnnpar: stopped by {signal.Signals(signum).name} while starting (loading data, compiling "
                    f"kernels); nothing was written: run the same command again\n")
        exit_at_once(128 + signum, line if self._speaks else "")

    _speaks = False

    def stand_down(self) -> None:
        """No second signal kills at once from here: the timer is cancelled and the stop signals, should
        the escalation have handed them to their default action already, are only noted again."""
        self.escalating = False  # first, so that a timer firing meanwhile does nothing (_escalate)
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in STOP_SIGNALS:
            if signum in self._previous and signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, self._note)

    def restore(self) -> None:
        """Every handler back as it was before `install()`, no timer armed."""
        self.stand_down()
        # SIGALRM's handler goes last: a timer that fired just before it was cancelled has run its
        # (idle) handler by now, and finds no default action to kill with.
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self):
        self.install()
        self.escalating = True
        return self

    def __exit__(self, *exc):
        self.stand_down()
        return False

    def _note(self, signum, frame) -> None:
        if self.signum:
            return  # a copy of the first (see SECOND_SIGNAL_S), or a signal during the shutdown
        self.signum, self.first_at = signum, time.monotonic()
        if not self.escalating:
            return
        # From SECOND_SIGNAL_S on, a stop signal takes its default action, in the kernel: it kills at
        # once even while this rank sits in a long C call (an MPI wait, a kernel) where no Python
        # handler could run.
        if signal.SIGALRM not in self._previous:
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._escalate)
        signal.setitimer(signal.ITIMER_REAL, SECOND_SIGNAL_S)

    def _escalate(self, signum, frame) -> None:
        if not self.escalating:
            return  # the loop ended before the timer's handler ran
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_DFL)

    def note_write_error(self, err) -> None:
        """Rank 0's log or checkpoint write failed: the run stops at the next agreement."""
        if self.write_error is None:
            self.write_error = err

    def local_code(self) -> int:
        return WRITE_ERROR_CODE if self.write_error is not None else int(self.signum)

    def agreed(self, comm, wait=None) -> Stop | None:
        """Collective over `comm`: the stop every rank makes now, or None to carry on. `wait(request)`
        completes the reduction (dist.wait: ranks that outnumber the cores yield theirs meanwhile, so
        that rank 0, which may be flushing the log, is not slowed by ranks spinning in the reduction)."""
        from mpi4py import MPI

        self._mine[0] = self.local_code()
        request = comm.Iallreduce(self._mine, self._agreed, op=MPI.MAX)
        if wait is None:
            request.Wait()
        else:
            wait(request)
        code = int(self._agreed[0])
        if code == 0:
            return None
        self.stand_down()  # every rank now stops (or finishes): the shutdown is not to be cut short
        return Stop(0 if code == WRITE_ERROR_CODE else code)


_children = []  # processes this one started that must not outlive it (the compile helper)


def end_with_me(process) -> None:
    """`process` (a subprocess.Popen) is ended too when a stop signal ends this process at start-up."""
    _children.append(process)


def exit_at_once(status: int, line: str = "") -> None:
    """End the process now with `status` after writing `line` to stderr, without cleaning up (nothing
    has been written that needs closing). A numba cache save in progress finishes first
    (kernel_cache.after_saves), so no half-written entry is left; a child started with `end_with_me`
    gets SIGTERM."""
    def leave():
        for child in _children:
            try:
                child.terminate()
            except OSError:
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a flush the signal interrupted: what it held is lost
                pass
        if line:
            os.write(2, line.encode())
        os._exit(status)

    kernel_cache.after_saves(leave)


def exit_at_once_on_stop_signals() -> None:
    """For a helper process (the compile helper): a stop signal ends it at once and quietly."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: exit_at_once(128 + signum))
