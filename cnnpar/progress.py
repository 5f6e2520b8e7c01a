"""What rank 0 shows while a run starts and trains: notes, the compile notice, a bar or plain lines.

--progress bar|lines|none|auto. 'auto' draws a bar when the user's terminal is at the end of rank 0's
stderr, and writes plain lines into files and pipes. Under a launcher a rank's stderr is a pipe (or a
socket) to the launcher, so isatty() says no even in a terminal. Launcher-independent rule: follow
stderr up the process tree while it is a pipe or socket whose other end the parent holds (the parent
reads it and forwards it: MPICH's hydra proxy and mpiexec, Open MPI's mpirun); if that walk ends at a
terminal, the launcher writes to a terminal and a bar (carriage returns) arrives there intact. It ends
anywhere else (a file, a pipe that the user's shell set up for `2>&1 | tee`, /dev/null under srun or a
batch job, or a /proc that cannot be read) and lines are written. Linux only; elsewhere, isatty().
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

PROGRESS_MODES = ("auto", "bar", "lines", "none")
LINE_EVERY_S = 5.0
_LAUNCHER_DEPTH = 6  # rank -> proxy -> launcher -> ... ; deeper than any launcher chain seen


def _fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _holds(pid: int, target: str) -> bool:
    """Whether process pid has `target` (a 'pipe:[inode]' or 'socket:[inode]') open."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return any(_fd_target(pid, int(name)) == target for name in names if name.isdigit())


def _terminal_width(path: str) -> int | None:
    """The terminal's width in columns if `path` is a terminal device, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not os.isatty(fd):
            return None
        try:
            return os.get_terminal_size(fd).columns or 80
        except OSError:
            return 80
    finally:
        os.close(fd)


def stderr_terminal_width(stream=None) -> int | None:
    """Columns of the terminal that this process's stderr ends up on, directly or through a launcher's
    forwarding (see the module doc); None when it ends anywhere else."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or 80
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    pid, target = os.getpid(), _fd_target(os.getpid(), fd)
    for _ in range(_LAUNCHER_DEPTH):
        if target is None or not target.startswith(("pipe:", "socket:")):
            return None
        parent = _parent(pid)
        if parent <= 1 or not _holds(parent, target):
            return None
        pid, target = parent, _fd_target(parent, 2)
        if target is not None and target.startswith("/dev/"):
            return _terminal_width(target)
    return None


def resolve_mode(mode: str, stream=None) -> tuple:
    """(mode, width): 'bar' with the terminal's width, or 'lines' / 'none' with None."""
    if mode == "auto":
        width = stderr_terminal_width(stream)
        return ("bar", width) if width else ("lines", None)
    if mode == "bar":
        return "bar", stderr_terminal_width(stream) or 80
    return mode, None


def samples_per_s(samples: int, train_time_s: float) -> float:
    """The run's speed, as the progress display, the summary line and the log's /final@samples_per_s all give
    it: training samples over training time (evaluation and the race audit left out of both), 0 before any."""
    return samples / train_time_s if train_time_s > 0 else 0.0


class Speaker:
    """What rank 0 says: notes and the compile notice, progress as a bar or lines (or none), and with
    quiet nothing but the final summary. Other ranks say nothing."""

    def __init__(self, is_root: bool, quiet: bool, mode: str = "auto"):
        self.active = is_root and not quiet
        self.is_root = is_root
        self.mode, self.width = resolve_mode(mode) if self.active else ("none", None)

    def line(self, text: str) -> None:
        if self.active:
            print(text, file=sys.stderr, flush=True)

    def summary(self, text: str) -> None:
        if self.is_root:
            print(text, flush=True)

    def compiling(self, kernels: int, fewest_s: float, most_s: float):
        """Announce a first-run compilation at once, with the range of seconds it may take; returns the
        notice to count kernels on, or None."""
        if not self.active:
            return None
        return CompileNotice(kernels, fewest_s, most_s, live=self.mode == "bar", lines=self.mode == "lines")

    def progress(self, total_steps: int, first_step: int = 0):
        if not self.active or self.mode == "none":
            return None
        return Progress(total_steps, first_step, bar=self.mode == "bar", width=self.width)


class CompileNotice:
    """`compiling numba kernels for this machine (first run only, 8-30 s)` and a count of the kernels done:
    rewritten in place on a terminal, a line at most every LINE_EVERY_S into files and pipes. A range, never
    one figure: how long a compile takes depends on what else the machine runs meanwhile."""

    def __init__(self, kernels: int, fewest_s: float, most_s: float, live: bool, lines: bool = True):
        self.total = kernels
        self.done = 0
        self.live = live
        self.lines = lines or live
        self.start = time.perf_counter()
        self.next_line = LINE_EVERY_S
        fewest = max(1, math.floor(fewest_s))
        span = (f"{fewest}-{max(math.ceil(most_s), fewest + 1)} s" if math.isfinite(most_s) else
                f"{fewest} s or more: niced on a busy machine")
        self.head = f"compiling numba kernels for this machine (first run only, {span})"
        if self.live:
            self._write(f"\r{self.head}: 0/{self.total} kernels")
        else:
            self._write(self.head + "\n")

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def task_done(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if self.live:
            self._write(f"\r{self.head}: {self.done}/{self.total} kernels, {elapsed:.0f} s")
        elif self.lines and elapsed >= self.next_line and self.done < self.total:
            self._write(f"compiled {self.done}/{self.total} kernels in {elapsed:.0f} s\n")
            self.next_line = elapsed + LINE_EVERY_S

    def close(self, seconds: float) -> None:
        if self.live:
            self._write(f"\r{self.head}: {self.done}/{self.total} kernels, done in {seconds:.1f} s\n")
        else:
            self._write(f"compiled {self.done}/{self.total} kernels in {seconds:.1f} s\n")


class Progress:
    """Rank 0's progress bar (tqdm) or a line every LINE_EVERY_S; updated once per window of steps, so
    rank 0, whom everyone waits for, stays off the terminal in the hot loop."""

    def __init__(self, total_steps: int, first_step: int, bar: bool, width: int | None = None):
        self.total = total_steps
        self.start = time.perf_counter()
        self.bar = None
        self.next_line = 0.0
        if bar:
            from tqdm import tqdm  # imported only where a bar is drawn

            # the width is given: stderr may be the launcher's pipe, whose width tqdm cannot ask
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", file=sys.stderr,
                            ncols=width or 80, mininterval=0.2)
        self.done = first_step

    def update(self, step: int, samples: int, train_time_s: float, rows) -> None:
        """samples, train_time_s: the run's training samples and time so far (see samples_per_s);
        rows: this rank's window of (step, epoch, loss_sum, count, ...) tuples ending at `step`."""
        loss_sum = sum(row[2] for row in rows)
        count = sum(row[3] for row in rows)
        loss = loss_sum / count if count else math.nan
        elapsed = time.perf_counter() - self.start
        rate = samples_per_s(samples, train_time_s)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} | {rate:.0f} samples/s", refresh=False)
            self.bar.update(step + 1 - self.done)
        elif elapsed >= self.next_line or step + 1 == self.total:
            print(f"step {step + 1}/{self.total} | loss {loss:.4f} | {rate:.0f} samples/s",
                  file=sys.stderr, flush=True)
            self.next_line = elapsed + LINE_EVERY_S
        self.done = step + 1

    def epoch(self, epoch, train_loss, train_acc, test_loss, test_acc) -> None:
        text = (f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {100 * train_acc:.1f}% | "
                f"test loss {test_loss:.4f} acc {100 * test_acc:.1f}%")
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ start-up trace
#
# With $CNNPAR_STARTUP_TRACE set, every process notes when it reached each milestone of a run (wall and
# CPU clocks), the time spent in named spans (imports of the big packages, numba's target set-up, each
# kernel's cache load, the evaluations) and, at interpreter exit, appends one JSON line to that file:
# cnnpar bench startup splits a run phase by phase and rank by rank from them. Unset, each call is one test.

_TRACE_PATH = os.environ.get("CNNPAR_STARTUP_TRACE", "")
_MILESTONES = {}   # name -> (wall time, process CPU seconds), the first time it was reached
_SPANS = {}        # name -> [wall seconds, CPU seconds] summed over every time it ran
_TRACE = {"rank": None, "written": False}
# imported packages whose load is worth its own line; an import nested in another is counted only in its own
TIMED_IMPORTS = ("numpy", "mpi4py.MPI", "numba", "h5py", "tqdm", "matplotlib")


def milestone(name: str) -> None:
    """Note when this process first reached a start-up milestone (only with $CNNPAR_STARTUP_TRACE set)."""
    if _TRACE_PATH and name not in _MILESTONES:
        _MILESTONES[name] = (time.time(), time.process_time())


class _Span:
    __slots__ = ("name", "wall", "cpu", "inner")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        totals = _SPANS.setdefault(self.name, [0.0, 0.0])
        totals[0] += time.perf_counter() - self.wall
        totals[1] += time.process_time() - self.cpu
        return False


class _NoSpan:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


def span(name: str):
    """`with span(name):` adds the block's wall and CPU seconds to the trace under `name` (when tracing)."""
    return _Span(name) if _TRACE_PATH else _NO_SPAN


def trace_rank(rank: int) -> None:
    """Name this process's trace record after its world rank (MPI is up)."""
    _TRACE["rank"] = rank


class _TimedLoader:
    """A module loader that times the loader it wraps; everything else is the wrapped loader's."""

    _stack = []  # the timed imports under way, innermost last: a nested one is taken out of its parent's time

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def __getattr__(self, attribute):
        return getattr(self._loader, attribute)

    def _timed(self, call, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        self._stack.append([0.0, 0.0])
        try:
            return call(*args)
        finally:
            nested = self._stack.pop()
            took = (time.perf_counter() - wall, time.process_time() - cpu)
            if self._stack:
                self._stack[-1][0] += took[0]
                self._stack[-1][1] += took[1]
            totals = _SPANS.setdefault(f"import {self._name}", [0.0, 0.0])
            totals[0] += took[0] - nested[0]
            totals[1] += took[1] - nested[1]

    def create_module(self, spec):  # an extension module loads (and mpi4py.MPI initialises MPI) here
        return self._timed(self._loader.create_module, spec)

    def exec_module(self, module):
        return self._timed(self._loader.exec_module, module)


class _ImportTimer:
    """A finder that hands the TIMED_IMPORTS to the other finders and times the loaders they return."""

    _busy = set()

    def find_spec(self, name, path=None, target=None):
        if name not in TIMED_IMPORTS or name in self._busy:
            return None
        self._busy.add(name)
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                spec = find(name, path, target) if finder is not self and find is not None else None
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(name)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _TimedLoader(spec.loader, name)
        return spec


def _process_start_time() -> float | None:
    """Wall-clock time this process started (Linux /proc), before Python and its imports."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return time.time() - (uptime_s - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def write_milestones() -> None:
    """Append this process's record to the trace file (once; also run at interpreter exit)."""
    if not _TRACE_PATH or _TRACE["written"]:
        return
    _TRACE["written"] = True
    milestone("exit")
    events = sorted(((name, wall, cpu) for name, (wall, cpu) in _MILESTONES.items()), key=lambda e: e[1])
    record = {"pid": os.getpid(), "rank": _TRACE["rank"], "process_start": _process_start_time(),
              "events": events, "spans": {name: list(v) for name, v in _SPANS.items()}}
    try:  # one write to an O_APPEND file: the ranks' lines never interleave
        fd = os.open(_TRACE_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


if _TRACE_PATH:
    import atexit

    milestone("package")  # the interpreter is up and cnnpar's package (its kernel cache key) imported
    sys.meta_path.insert(0, _ImportTimer())
    atexit.register(write_milestones)  # registered before mpi4py's own: runs after MPI is finalised
