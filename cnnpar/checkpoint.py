"""Checkpoints: everything needed to continue a run bit for bit, in one small HDF5 file.

A checkpoint holds the flat params, the optimizer's flat velocity, the data
position (global step; the sample order is a pure function of seed and epoch,
so no RNG state has to be carried), the running epoch statistics, the time and
samples accounted so far, the config, the rank count, and how many rows of the
run log belong to it. Rank 0 writes it atomically (a temporary file, synced
and read back, then renamed), so a kill or a full disk at any moment leaves the
previous checkpoint intact. No pickle anywhere: opening a checkpoint cannot run
code.

The checkpoint of a log lives beside it: `runpaths.checkpoint_path(log)`. `resume_state` decides what a
run given --resume continues from; `Checkpointer` decides when the trainer writes one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np

from . import runpaths
from .config import DEFAULTS, NUMBERS, RESUME_FIELDS, checkpoint_interval, fields_that_change
from .errors import UserError, WriteError
from .runlog._h5 import write_failure_cause
from .runlog.schema import OPTIONAL_GROUPS

MAGIC = "cnnpar-checkpoint"
VERSION = 1



def save(path: str, *, params: np.ndarray, velocity: np.ndarray, step: int, epoch_sums: np.ndarray,
         train_time_s: float, samples_done: int, config_json: str, ranks: int, log_steps: int,
         log_epochs: int, noise_sums: np.ndarray | None = None) -> None:
    """Write a checkpoint atomically: a temporary file beside it, synced and read back bit for bit, then
    renamed over the old one. Any failure raises WriteError and leaves the previous checkpoint intact."""
    import h5py

    temporary = f"{path}.tmp-{os.getpid()}"
    arrays = {"params": np.asarray(params), "velocity": np.asarray(velocity),
              "epoch_sums": np.asarray(epoch_sums, np.float64)}
    if noise_sums is not None:  # --noise-scale: the epoch's running estimate sums (g2, trace, steps)
        arrays["noise_sums"] = np.asarray(noise_sums, np.float64)
    attrs = {"format": MAGIC, "format_version": VERSION, "step": int(step), "train_time_s": float(train_time_s),
             "samples_done": int(samples_done), "ranks": int(ranks), "log_steps": int(log_steps),
             "log_epochs": int(log_epochs), "config_json": config_json}
    try:
        _check_free_space(path, sum(a.nbytes for a in arrays.values()))
        with h5py.File(temporary, "w", libver=("earliest", "v110")) as f:
            f.attrs.update(attrs)
            for name, values in arrays.items():
                f.create_dataset(name, data=values)
        _fsync(temporary)
        with h5py.File(temporary, "r") as f:  # read back before it may replace a good checkpoint
            if any(not np.array_equal(f[name][...], values) for name, values in arrays.items()):
                raise OSError(f"{temporary} reads back different from what was written")
        os.replace(temporary, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    except WriteError:
        raise
    except Exception as err:  # noqa: BLE001 - disk full, quota, I/O error: the environment's fault
        raise WriteError("--checkpoint-every", f"{path}: {write_failure_cause(err)}") from None
    finally:
        if os.path.exists(temporary):
            try:
                os.remove(temporary)
            except OSError:
                pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_free_space(path: str, nbytes: int) -> None:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    needed = nbytes + (64 << 10)  # HDF5 metadata and attributes
    if free < needed:  # fail before writing a byte
        raise OSError(errno.ENOSPC, f"{free} bytes free, the checkpoint needs about {needed}")


def load(path: str) -> dict:
    """Read and check a checkpoint; any problem is a UserError naming the file."""
    import h5py

    if not os.path.isfile(path):
        raise UserError(path, "no such checkpoint file")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != MAGIC:
                raise UserError(path, "not a cnnpar checkpoint")
            version = int(f.attrs.get("format_version", -1))
            if version != VERSION:
                raise UserError(path, f"checkpoint format version {version}; this cnnpar reads {VERSION}")
            state = {key: f.attrs[key] for key in ("step", "train_time_s", "samples_done", "ranks",
                                                  "log_steps", "log_epochs")}
            state["config"] = json.loads(f.attrs["config_json"])
            for name in ("params", "velocity", "epoch_sums"):
                state[name] = f[name][...]
            state["noise_sums"] = f["noise_sums"][...] if "noise_sums" in f else None
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise UserError(path, f"unreadable checkpoint ({err}); it may be truncated") from None
    return state


def check_compatible(state: dict, config, ranks: int, n_params: int, path: str) -> None:
    """A checkpoint continues only the run that wrote it: same ranks, same trajectory settings."""
    if int(state["ranks"]) != ranks:
        raise UserError("--resume", f"{path} was written by a run with {int(state['ranks'])} ranks, this one has "
                        f"{ranks}; resume with the same rank count (the log keeps one column per rank)")
    for name in RESUME_FIELDS:  # the settings that shape the trajectory or the log's tables (config.py)
        theirs, ours = state["config"].get(name, DEFAULTS[name]), getattr(config, name)
        if theirs == ours:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name not in fields_that_change(NUMBERS):
            how = "with" if theirs else "without"
            tables = " and ".join(f"/{group}" for group, setting in OPTIONAL_GROUPS.items() if setting == name)
            raise UserError(flag, f"{path} was written by a run {how} {flag}; resume it {how} the flag (the "
                                  f"log's {tables} tables must cover every step or none)")
        raise UserError("--resume", f"{path} was written with {flag} {theirs!r}, this run asks for {ours!r}; use "
                        f"the checkpointed run's settings")
    if state["params"].shape != (n_params,):
        raise UserError("--resume", f"{path} holds {state['params'].size} params, the network has {n_params}")


def resume_state(config, log_path: str, ranks: int, n_params: int):
    """The checkpoint to continue from, checked against this run; None for a fresh start; {"complete": True}
    when the log is finished already; {"set_aside": PATH} when a dead attempt's log without a checkpoint
    was moved to PATH (start over)."""
    from .runlog import is_complete_log
    from .runlog.lock import writer_alive

    if not config.resume:
        return None
    path = runpaths.checkpoint_path(log_path) if config.resume == "auto" else config.resume
    if config.resume == "auto" and not os.path.exists(path):
        if not os.path.exists(log_path):
            return None  # 'auto' with nothing there yet: job scripts can always pass it
        if is_complete_log(log_path):
            return {"complete": True}
        # A job killed before its first checkpoint (SIGKILL, a node lost): a requeued job must start over,
        # and the dead attempt's log is kept beside it, never overwritten.
        if writer_alive(log_path):
            raise UserError("--log", f"{log_path} is being written by a running job right now; --resume auto "
                            f"neither continues nor replaces it")
        return {"set_aside": runpaths.set_aside(log_path)}
    state = load(path)
    check_compatible(state, config, ranks, n_params, path)
    if not os.path.exists(log_path):
        owner = runpaths.log_of_checkpoint(path)
        if owner and os.path.abspath(owner) != os.path.abspath(log_path):
            raise UserError("--resume", f"{path} continues the log {owner}, not {log_path}: "
                            f"pass --log {owner}")
        raise UserError("--log", f"{log_path} is missing; the checkpoint {path} continues that log")
    if is_complete_log(log_path):
        return {"complete": True}
    return state


class Checkpointer:
    """Decides when to checkpoint and writes one (rank 0; the window is flushed first, so the log and the
    checkpoint agree on how many steps are done)."""

    def __init__(self, config, log_path, steps_per_epoch, ranks, optimizer, noise=None):
        interval = checkpoint_interval(config.checkpoint_every)
        self.every_steps = 0
        if interval is not None:
            count, unit = interval
            self.every_steps = count * (steps_per_epoch if unit == "epochs" else 1)
        self.path = runpaths.checkpoint_path(log_path)
        self.config_json = config.to_json()
        self.ranks = ranks
        self.optimizer = optimizer
        self.noise = noise

    def due(self, steps_done: int) -> bool:
        return self.every_steps > 0 and steps_done % self.every_steps == 0

    def save(self, log, params, steps_done, epoch_sums, train_time_s, samples_done) -> None:
        if log is None:
            return
        log.flush()
        save(self.path, params=params, velocity=self.optimizer.velocity, step=steps_done, epoch_sums=epoch_sums,
             train_time_s=train_time_s, samples_done=samples_done, config_json=self.config_json, ranks=self.ranks,
             log_steps=log.rows("steps"), log_epochs=log.rows("epochs"),
             noise_sums=None if self.noise is None else self.noise.epoch_sums())
