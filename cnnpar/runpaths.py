"""Where a run's files live: its log, the checkpoint beside it, and what the log path must allow.

The one home of these names: the trainer, the checkpoint module and `python -m cnnpar.runlog info` all
ask here. It imports nothing of cnnpar but its errors, so every one of them may.
"""

from __future__ import annotations

import os

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
