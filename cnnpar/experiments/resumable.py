"""What the sweep and the map share as resumable runners of many training runs: the state of a point's log
(asked of cnnpar.runlog), moving leftovers aside, resuming from a checkpoint, the folder lock that keeps a
second runner out, progress with the time left, and the slice of the points that one array task runs."""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cnnpar.errors import UserError

INCOMPLETE_DIR = "incomplete"
LOCK_FILE = ".cnnpar-lock"


# ----------------------------------------------------------------------------------------------------
# a point's log


@dataclass(frozen=True)
class LogState:
    """`state` is 'todo' (no log), 'done' (complete), 'diverged' (the loss became NaN: a result), 'resumable'
    (stopped, with a checkpoint to continue from), 'running' (a live process writes it) or 'stale'
    (anything else: unreadable, or stopped before its first checkpoint)."""

    state: str
    detail: str = ""
    status: str = ""


def checkpoint_of(path: Path) -> Path:
    from cnnpar.runpaths import checkpoint_path

    return Path(checkpoint_path(os.fspath(path)))


def log_state(path: Path) -> LogState:
    from cnnpar import runlog

    path = Path(path)
    if not path.exists():
        return LogState("todo")
    try:
        log = runlog.open_log(path)
    except UserError as err:
        return LogState("stale", err.message)
    status = log.status
    if status == "complete":
        return LogState("done", status=status)
    if status == "diverged":
        return LogState("diverged", log.status_message, status)
    if status == "running":   # a live writer, or one this system cannot tell from a dead one
        return LogState("running", "a live process is writing it", status)
    if checkpoint_of(path).exists():
        return LogState("resumable", f"status {status}, resumed from its checkpoint", status)
    return LogState("stale", f"status {status}", status)


def resume_args(checkpoint_every: str) -> list:
    """Training flags that make a point resumable: checkpoints, and `--resume auto` to continue from the
    latest one (it starts afresh when there is none)."""
    return ["--checkpoint-every", checkpoint_every, "--resume", "auto"] if checkpoint_every else []


def drop_checkpoint(path: Path) -> None:
    """A complete log's checkpoint can never be resumed from: remove it (thousands of points, each a copy)."""
    try:
        checkpoint_of(path).unlink()
    except FileNotFoundError:
        pass


def move_aside(path: Path, out: Path, output: str = "", reason: str = "") -> Path:
    """Move a leftover log (and its checkpoint) to OUT/incomplete/NAME.STAMP.h5, the run's output beside it."""
    folder = out / INCOMPLETE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder / f"{path.stem}.{stamp}{path.suffix}"
    n = 1
    while target.exists() or target.with_suffix(".txt").exists():
        target = folder / f"{path.stem}.{stamp}-{n}{path.suffix}"
        n += 1
    if path.exists():
        os.replace(path, target)
    if checkpoint_of(path).exists():
        os.replace(checkpoint_of(path), checkpoint_of(target))
    if output or reason:
        target.with_suffix(".txt").write_text((f"# {reason}\n" if reason else "") + output)
    return target


# ----------------------------------------------------------------------------------------------------
# time


def hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Runs finished, time elapsed and the time left over the pending points, from an estimator whose
    `remaining(points)` gives (seconds for the points it can predict, how many it cannot) and a `fallback`
    (seconds for points it cannot predict yet), divided among `jobs` runs at once."""

    def __init__(self, pending, estimator, jobs: int = 1, fallback=None):
        self.pending = list(pending)
        self.total = len(self.pending)
        self.finished = 0
        self.estimator, self.jobs, self.fallback = estimator, jobs, fallback
        self.started = time.monotonic()

    def left_s(self) -> float:
        seconds, unknown = self.estimator.remaining(self.pending)
        if unknown and self.fallback is not None:
            seconds += self.fallback([p for p in self.pending if self.estimator.predict(p) is None])
        return seconds / min(self.jobs, max(len(self.pending), 1)) if self.pending else 0.0

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def step(self, point) -> None:
        self.pending.remove(point)
        self.finished += 1


# ----------------------------------------------------------------------------------------------------
# the folder lock


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process (its lock file is unreadable)"
    array = f", array job {info['array_job']}" if info.get("array_job") else ""
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}{array}: "
            f"{info.get('command', '?')}")


class FolderLock:
    """One runner per folder. The lock file OUT/.cnnpar-lock names its holder (pid, host, start, command);
    the lock itself is the run log's kind (cnnpar.runlog.lock: an open-file-description lock on one byte),
    which the kernel drops when the holder dies, so a dead holder's file is taken over, with a note.

    Tasks of one job array share the folder (`array_job` = Slurm's array job id): they take the lock
    shared, and only while no other runner holds it; each writes only its own slice's logs. A plain runner
    takes it exclusively. Where the lock is not supported (not Linux), the file's pid is checked instead,
    for this host only."""

    def __init__(self, out: Path, array_job: str = ""):
        self.path = Path(out) / LOCK_FILE
        self.array_job = array_job
        self.fd = None
        self.note = ""

    def acquire(self) -> "FolderLock":
        from cnnpar.runlog import lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            previous = self.path.read_text()
        except OSError:
            previous = ""
        if lock.SUPPORTED:
            held = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, lock._request(fcntl.F_WRLCK))
            kind = lock._Flock.from_buffer_copy(held).l_type
            shared_ok = self.array_job and kind == fcntl.F_RDLCK and \
                _json(previous).get("array_job") == self.array_job
            if kind != fcntl.F_UNLCK and not shared_ok:
                os.close(fd)
                raise UserError(str(self.path.parent), f"in use by {_holder_text(self.path)}; wait for it to "
                                "end, or use another --out")
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                            lock._request(fcntl.F_RDLCK if self.array_job else fcntl.F_WRLCK))
            except OSError:
                os.close(fd)
                raise UserError(str(self.path.parent), f"in use by {_holder_text(self.path)}; wait for it to "
                                "end, or use another --out") from None
            if previous.strip() and kind == fcntl.F_UNLCK and \
                    not (self.array_job and _json(previous).get("array_job") == self.array_job):
                self.note = f"note: took over the lock of {_holder_text(self.path)}, which has ended"
            joined = kind == fcntl.F_RDLCK
        else:
            info = _json(previous)
            if info.get("host") == socket.gethostname() and _alive(info.get("pid")) and \
                    not (self.array_job and info.get("array_job") == self.array_job):
                os.close(fd)
                raise UserError(str(self.path.parent), f"in use by {_holder_text(self.path)}; wait for it to "
                                "end, or use another --out")
            if info:
                self.note = f"note: took over the lock of {_holder_text(self.path)}"
            joined = False
        self.fd = fd
        if not joined:  # the first of an array's tasks, or a plain runner, names itself
            text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                               "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                               "array_job": self.array_job})
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


# ----------------------------------------------------------------------------------------------------
# array slices


def slice_of(points, task: int, slices: int) -> list:
    """The points array task `task` (0..slices-1) runs: every slices-th of the full, ordered list, so a
    requeued or resubmitted task takes the same points whatever else is pending, and each part's points
    spread over all tasks."""
    return [p for i, p in enumerate(points) if i % slices == task]


def array_task() -> tuple:
    """(task, array job id) from Slurm's environment, or (None, '') outside an array."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return (int(task), os.environ.get("SLURM_ARRAY_JOB_ID", "")) if task and task.isdigit() else (None, "")
