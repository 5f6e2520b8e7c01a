"""Where a run's files live: its log, the checkpoint beside it, and what the log path must allow.

The one home of these names: the trainer, the checkpoint module and `python -m cnnpar.runlog info` all
ask here. It imports nothing of cnnpar but its errors, so every one of them may.
"""

from __future__ import annotations

CHECKPOINT_SUFFIX = ".ckpt"


def checkpoint_path(log_path: str) -> str:
    """The checkpoint of a log lives beside it: `<log>.ckpt`."""
    return f"{log_path}{CHECKPOINT_SUFFIX}"


def log_of_checkpoint(path: str) -> str:
    """The log a checkpoint continues (checkpoint_path's inverse), or '' for a file not named like one."""
    return path[: -len(CHECKPOINT_SUFFIX)] if path.endswith(CHECKPOINT_SUFFIX) else ""
