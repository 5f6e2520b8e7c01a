"""Where a run's files live: its log, the checkpoint beside it, a dead attempt's log set aside, and what
the log's path must allow before a run starts.

The one home of these names: the trainer, the checkpoint module and `python -m cnnpar.runlog info` all
ask here. It imports nothing of cnnpar but its errors, so every one of them may.
"""

from __future__ import annotations

import itertools
import os

from .errors import UserError

CHECKPOINT_SUFFIX = ".ckpt"
LOG_FOLDER = "runs"  # where a run without --log writes its log, relative to the working folder


def default_log_path(stamp: str, ranks, mode: str) -> str:
    """A run's log when --log is not given: runs/<stamp>-n<ranks>-<mode>.h5."""
    return os.path.join(LOG_FOLDER, f"{stamp}-n{ranks}-{mode}.h5")


DEFAULT_LOG_SHOWN = default_log_path("<date-time>", "<ranks>", "<mode>")  # what --help says the default is


def checkpoint_path(log_path: str) -> str:
    """The checkpoint of a log lives beside it: `<log>.ckpt`."""
    return f"{log_path}{CHECKPOINT_SUFFIX}"


def log_of_checkpoint(path: str) -> str:
    """The log a checkpoint continues (checkpoint_path's inverse), or '' for a file not named like one."""
    return path[: -len(CHECKPOINT_SUFFIX)] if path.endswith(CHECKPOINT_SUFFIX) else ""


def log_path(config, ranks: int, started) -> str:
    """The log's path: --log, or runs/<date-time>-n<ranks>-<mode>.h5 stamped with the run's start."""
    if config.log:
        return config.log
    return default_log_path(started.strftime("%Y%m%d-%H%M%S"), ranks, config.mode)


def check_log_path(path: str, make_folder: bool, resuming: bool) -> None:
    """Raise a UserError naming what is wrong with `path` as a new (or, resuming, continued) log file.
    The last check creates and removes a file beside it, so a place the file system refuses (/proc, a
    read-only mount) is caught here rather than by HDF5 after the kernels were compiled."""
    if path.endswith(os.sep) or os.path.isdir(path):
        raise UserError("--log", f"{path} is a folder; give a file path such as "
                        f"{os.path.join(path, 'run.h5')}")
    if os.path.exists(path):
        if not resuming:
            raise UserError("--log", f"{path} already exists; choose another path or remove it")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UserError("--log", f"{path} cannot be continued: it is not readable and writable")
        return
    folder = os.path.dirname(os.path.abspath(path))
    above = folder
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UserError("--log", f"{above} is a file, not a folder, so {path} cannot be created")
    if not os.path.isdir(folder):
        if not make_folder:
            raise UserError("--log", f"the folder {folder} does not exist")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise UserError("--log", f"cannot create the folder {folder}: {err.strerror}") from None
    # The probe is a sibling, never the log's own name: a reader polling for the log (a watcher, a soak)
    # must not find an empty file there, even for a moment.
    probe = os.path.join(folder, f".cnnpar-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise UserError("--log", f"{path} cannot be created: {err.strerror}") from None


def set_aside(log_path: str) -> str:
    """Rename a log out of the way to the first free `<name>.no-checkpoint-N<ext>` beside it; a hard link
    then an unlink, so an existing file of that name is never replaced."""
    stem, ext = os.path.splitext(log_path)
    for n in itertools.count(1):
        target = f"{stem}.no-checkpoint-{n}{ext}"
        try:
            os.link(log_path, target)
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError("--log", f"{log_path} has no checkpoint to resume from and cannot be set aside "
                            f"({err.strerror or err}): move it away or choose another --log") from None
        os.unlink(log_path)
        return target
    raise AssertionError("unreachable")
