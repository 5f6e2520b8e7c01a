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

import fcntl
import os
import signal
import socket
import sys
import tempfile
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
        self._wakeup = None  # start-up only: the (read, write) pipe the signal watcher thread reads
        self._watch_lock = threading.Lock()
        self._mine = np.zeros(1, np.int32)
        self._agreed = np.zeros(1, np.int32)

    def install_for_startup(self, speaks: bool) -> "StopRequest":
        """Until `install()`: a stop signal ends this process at once (`exit_at_once`). Start-up (data,
        kernels, the exchange's windows) has no step boundary to agree at and has written nothing."""
        self._speaks = self._first = speaks
        self._take(self._exit_at_once)
        self._watch_startup()
        return self

    def share_the_startup_line(self, comm) -> "StopRequest":
        """Collective: from here the first rank of rank 0's node to act on a start-up stop says its line,
        not rank 0 alone. A launcher ends every rank still running once one has ended (hydra at once, by
        SIGKILL), and on an oversubscribed node rank 0 may not have run since the signal came (measured: no
        line in 1 of 4 mid-compile ^Cs at 4 ranks on 2 cores). The node's ranks share one small file,
        opened by all and then unlinked (so nothing is left behind): the first to lock it and find it empty
        marks it and speaks, and the mark outlives it for the ranks the launcher stops after it."""
        if comm.Get_size() == 1:
            return self
        here = socket.gethostname()
        path = None
        if comm.Get_rank() == 0:
            try:
                folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
                fd, path = tempfile.mkstemp(prefix="cnnpar-stop-", dir=folder)
                os.close(fd)
            except OSError:
                path = None
        first_host, path = comm.bcast((here, path))
        fd = None
        if here == first_host and path is not None:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                fd = None
        comm.Barrier()  # every rank of the node has it open: it can go
        if comm.Get_rank() == 0 and path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._speaks, self._line_fd = here == first_host, fd
        return self

    def _says_the_line(self) -> bool:
        """Whether this process says the start-up stop's line; asked once, by the process's one leaver."""
        if not self._speaks:
            return False
        if self._line_fd is None:
            return self._first
        try:
            fcntl.flock(self._line_fd, fcntl.LOCK_EX)  # held for microseconds; a SIGKILL releases it
            try:
                if os.pread(self._line_fd, 1, 0):
                    return False  # a rank said it already
                os.pwrite(self._line_fd, b"1", 0)
                return True
            finally:
                fcntl.flock(self._line_fd, fcntl.LOCK_UN)
        except OSError:
            return self._first

    def install(self) -> "StopRequest":
        """From here (just before the log is created) stop signals are noted, and acted upon at a step."""
        self._unwatch()
        if self._line_fd is not None:
            os.close(self._line_fd)
            self._line_fd, self._speaks = None, self._first
        return self._take(self._note)

    def _watch_startup(self) -> None:
        """Act on a start-up stop signal even while the main thread sits in a long C call. A Python handler
        runs only between bytecodes, and LLVM compiling one kernel can hold the main thread for seconds
        (ctypes releases the GIL meanwhile); hydra's mpiexec, seeing the other ranks end at once, SIGKILLs
        such a rank, and the job lost its line when that was rank 0 (measured with rank 0 of 4 in 1 s C
        calls: its line came 0 times in 6 without this thread, 9 times in 9 with it). The interpreter's
        C-level handler writes each signal's number to the wakeup fd at once, and this thread, blocked on
        reading it, ends the process from there."""
        if threading.current_thread() is not threading.main_thread() or self._wakeup is not None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            previous = None
        if previous != -1:  # someone else's wakeup fd (an event loop): leave it theirs
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="cnnpar-stop-watch", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(read_fd, 64)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not data:
                    return  # _unwatch closed the pipe
                for signum in data:
                    if signum in STOP_SIGNALS:
                        with self._watch_lock:
                            if self._wakeup is not None:  # still starting: the handler would do the same
                                self._exit_at_once(signum, None)
        finally:
            os.close(read_fd)

    def _unwatch(self) -> None:
        with self._watch_lock:  # a watcher acting on a signal finishes first
            if self._wakeup is None:
                return
            _, write_fd = self._wakeup
            self._wakeup = None
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        os.close(write_fd)  # the watcher reads the end of the pipe and ends

    def _take(self, handler) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.signal(signum, handler)
                self._previous.setdefault(signum, previous)
        return self

    def _exit_at_once(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum

        def line() -> str:
            if not self._says_the_line():
                return ""
            return (f"cnnpar: stopped by {signal.Signals(signum).name} while starting (loading data, compiling "
                    f"kernels); nothing was written: run the same command again\n")
        exit_at_once(128 + signum, line)

    _speaks = _first = False
    _line_fd = None  # the node's shared file for who says the start-up line (share_the_startup_line)

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
        """Every handler back as it was before `install()`, no timer armed, no watcher left."""
        self._unwatch()
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


_leaving = threading.Lock()  # taken by whichever thread ends the process first


def exit_at_once(status: int, line="") -> None:
    """End the process now with `status` after writing `line` (a text, or a function giving it, asked only
    by the thread that ends the process) to stderr, without cleaning up (nothing has been written that
    needs closing). A numba cache save in progress finishes first
    (kernel_cache.after_saves), so no half-written entry is left; a child started with `end_with_me`
    gets SIGTERM."""
    def leave():
        if not _leaving.acquire(blocking=False):
            return  # the other thread (watcher or main) is ending the process already
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
        text = line() if callable(line) else line
        if text:
            os.write(2, text.encode())
        os._exit(status)

    kernel_cache.after_saves(leave)


def exit_at_once_on_stop_signals() -> None:
    """For a helper process (the compile helper): a stop signal ends it at once and quietly."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: exit_at_once(128 + signum))
