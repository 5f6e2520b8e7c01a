"""The HDF5 run log: one self-describing file per training run, written by rank 0 only.

The schema (format version 1) is documented in full in docs/runlog.md. This module does no MPI: the
trainer gathers per-rank figures and hands plain numpy arrays to `RunLogWriter`; the analysis scripts
and the tests read logs back through `open_log` / `RunLog`.

Crash safety and live reading rest on HDF5's single-writer/multiple-reader (SWMR) mode:

* every group, dataset and attribute is created when the log is created, *before* SWMR write mode
  starts; afterwards the writer only appends rows to resizable datasets, writes fixed-shape datasets,
  and rewrites pre-created fixed-size attributes in place (same dtype, same size). No object is
  ever created or deleted under SWMR, and no variable-length data is used anywhere (SWMR cannot
  carry it): all strings are fixed-length UTF-8.
* `/committed_rows` holds, per table, the number of rows that were complete at the last `flush()`.
  It is written after the rows themselves and flushed a second time, so a reader of a live or killed
  run sees every row up to the last flush and never a half-written window.
* a file whose writer was killed still carries HDF5's "open for writing" flag; readers therefore
  open logs with `swmr=True`, which reads such files (and live ones) consistently.

Nothing is ever pickled: the config is stored as its JSON text plus one attribute per field.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

import numpy as np

from . import __version__
from .errors import UserError

FORMAT = "cnnpar-runlog"
FORMAT_VERSION = 1
STATUSES = ("running", "complete", "failed", "diverged", "interrupted")

STATUS_BYTES = 16          # fixed size of the root `status` attribute
MESSAGE_BYTES = 1024       # fixed size of the root `status_message` attribute (longer messages are cut)
FINAL_EXTRA_BYTES = 4096   # fixed size of /final's `extra_json` attribute
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# Tables that grow by rows, with their columns: name -> (dtype, per_rank).
STEP_COLUMNS = {
    "step": ("i8", False), "epoch": ("i4", False), "loss": ("f4", False), "rank_loss": ("f4", True),
    "samples": ("i4", False), "compute_s": ("f4", True), "exchange_s": ("f4", True),
    "wait_s": ("f4", True), "lr": ("f4", False),
}
AUDIT_COLUMNS = {"step": ("i8", False), "rel_l2_error": ("f8", False), "frac_elements_differ": ("f8", False),
                 "lost_contributions": ("f8", False)}
EPOCH_COLUMNS = {"epoch": ("i4", False), "step": ("i8", False), "train_loss": ("f8", False),
                 "train_acc": ("f8", False), "test_loss": ("f8", False), "test_acc": ("f8", False),
                 "train_time_s": ("f8", False), "samples": ("i8", False)}
CONSISTENCY_COLUMNS = {"step": ("i8", False), "checksum": ("u8", False), "ok": ("?", False)}
FOLD_COLUMNS = {"fold": ("i4", False), "test_acc": ("f8", False), "test_loss": ("f8", False)}
# --noise-scale (cnnpar/noise.py): one row per window of steps, and one per epoch; "step" is the window's
# last step / the steps done at the epoch's end, g2 = mean |G|^2 and trace = mean tr(Sigma) estimates.
NOISE_COLUMNS = {"step": ("i8", False), "first_step": ("i8", False), "steps": ("i4", False),
                 "b_small": ("f8", False), "b_big": ("f8", False), "g2": ("f8", False), "trace": ("f8", False),
                 "b_simple": ("f8", False)}
NOISE_EPOCH_COLUMNS = {"epoch": ("i4", False), "step": ("i8", False), "steps": ("i4", False),
                       "g2": ("f8", False), "trace": ("f8", False), "b_simple": ("f8", False)}
TABLES = {"steps": STEP_COLUMNS, "audit": AUDIT_COLUMNS, "epochs": EPOCH_COLUMNS,
          "consistency": CONSISTENCY_COLUMNS, "folds": FOLD_COLUMNS, "noise": NOISE_COLUMNS,
          "noise_epochs": NOISE_EPOCH_COLUMNS}
BUFFERED_TABLES = ("steps", "audit", "consistency")  # appended rows wait in memory for flush() ...
PENDING_ROWS = 65536  # ... up to this many rows per table
# /committed_rows index of each table; "final" is 1 once write_final has been flushed.
# Logs made before --noise-scale have the first six names only: the file's own `tables` attribute says which.
COMMITTED = ("steps", "audit", "epochs", "consistency", "folds", "noise", "noise_epochs", "final")
CHUNK_ROWS = {"steps": 2048, "audit": 2048, "epochs": 64, "consistency": 256, "folds": 16, "noise": 256,
              "noise_epochs": 64}
# /final attributes: name -> dtype (pre-created as NaN / -1, rewritten in place by write_final).
FINAL_ATTRS = {"test_acc": "f8", "test_loss": "f8", "train_time_s": "f8", "samples": "i8",
               "samples_per_s": "f8", "steps": "i8"}


# ----------------------------------------------------------------------------------------------------
# small helpers


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fixed_str_dtype(nbytes: int):
    import h5py

    return h5py.string_dtype("utf-8", max(1, int(nbytes)))


def _cut_utf8(text: str, nbytes: int) -> bytes:
    raw = str(text).encode("utf-8")
    if len(raw) <= nbytes:
        return raw
    return raw[: nbytes - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def _decode(value) -> Any:
    """An attribute or dataset value as plain Python: bytes -> str, numpy scalars -> Python scalars."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_decode(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_default(value):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _set_str_attr(attrs, name: str, text: str, nbytes: int | None = None) -> None:
    raw = str(text).encode("utf-8") if nbytes is None else _cut_utf8(text, nbytes)
    dtype = _fixed_str_dtype(nbytes or len(raw))
    attrs.create(name, np.array(raw, dtype=dtype), dtype=dtype)


def _set_plain_attr(attrs, name: str, value) -> None:
    """One config/env value as an h5ls-friendly attribute (None is omitted; nested values as JSON)."""
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)):
        attrs.create(name, np.bool_(value))
    elif isinstance(value, (int, np.integer)):
        attrs.create(name, np.int64(value))
    elif isinstance(value, (float, np.floating)):
        attrs.create(name, np.float64(value))
    elif isinstance(value, str):
        _set_str_attr(attrs, name, value)
    elif isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        raw = [v.encode("utf-8") for v in value]
        width = max(1, max(len(r) for r in raw))
        attrs.create(name, np.array(raw, dtype=_fixed_str_dtype(width)), dtype=_fixed_str_dtype(width))
    elif (isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
          and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)):
        attrs.create(name, np.asarray(value))
    else:
        _set_str_attr(attrs, name, json.dumps(value, sort_keys=True, default=_json_default))


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def _shape_from_text(text: str) -> tuple:
    return tuple(int(d) for d in text.split("x")) if text else ()


# ----------------------------------------------------------------------------------------------------
# writer


class RunLogWriter:
    """Writes one run's log (rank 0 only). See docs/runlog.md for the schema.

    `layout` rows are (name, shape, offset, size) of each parameter in the flat parameter vector.
    `/audit` exists when `audit` is true (default: config_fields["race_audit"]); `/folds` when `folds`
    is true (default: config_fields["folds"] > 1). All other groups always exist.
    Usable as a context manager: an exception closes the log as "failed" ("interrupted" for Ctrl-C).
    """

    def __init__(self, path, config_json: str, config_fields: dict, env: dict, layout: list,
                 ranks: int, n_classes: int = 10, *, audit: bool | None = None, folds: bool | None = None,
                 _created: str | None = None, _resume_count: int = 0):
        import h5py

        self.path = os.fspath(path)
        self.ranks = int(ranks)
        self.n_classes = int(n_classes)
        if self.ranks < 1:
            raise ValueError(f"ranks must be at least 1, got {ranks}")
        if audit is None:
            audit = bool(config_fields.get("race_audit", False))
        if folds is None:
            folds = int(config_fields.get("folds", 1) or 1) > 1
        self._closed = True
        try:
            f = h5py.File(self.path, "x", libver="latest")
        except FileExistsError:
            raise UserError(self.path, "a file already exists there; the run log will not overwrite it") from None
        except OSError as err:
            raise UserError(self.path, f"cannot create the run log: {_h5_reason(err)}") from None
        try:
            _build(f, config_json, config_fields, env, layout, self.ranks, self.n_classes, audit, folds,
                   _created or _utc_now(), _resume_count)
            f.flush()
            f.swmr_mode = True
        except BaseException:
            f.close()
            try:
                os.remove(self.path)
            except OSError:
                pass
            raise
        self._bind(f)

    # -- construction helpers ---------------------------------------------------------------------
    def _bind(self, f) -> None:
        self._f = f
        self._closed = False
        self._pending = {}  # table -> appended column dicts not yet written to the file
        self._tables = {name: f[name] for name in TABLES if name in f}
        self._rows = {name: f[name]["step" if name != "folds" else "fold"].shape[0] for name in self._tables}
        self._committed = f["committed_rows"]
        self._committed_names = _committed_names(self._committed)
        self._final_written = bool(self._committed[self._committed_names.index("final")])
        self.ranks = int(f.attrs["ranks"])
        self.n_classes = int(f["final/confusion"].shape[0])

    @classmethod
    def _attach(cls, path: str) -> "RunLogWriter":
        """Open a cleanly closed log for appending, in SWMR write mode."""
        import h5py

        self = cls.__new__(cls)
        self.path = path
        try:
            f = h5py.File(path, "r+", libver="latest")
        except OSError as err:
            raise UserError(path, f"cannot reopen the run log for writing: {_h5_reason(err)}") from None
        f.swmr_mode = True
        self._bind(f)
        return self

    @classmethod
    def reopen(cls, path, step_count: int | None = None, epoch_count: int | None = None,
               env: dict | None = None) -> "RunLogWriter":
        """Reopen an existing log for appending (checkpoint resume), truncated to `step_count` steps.

        Works on logs whose writer was killed as well as on closed ones. The log is rewritten through
        a temporary file beside it (then atomically renamed), so a crash during reopen leaves the old
        log intact. Rows of /steps, /audit and /consistency with step >= step_count are dropped;
        /epochs keeps its first `epoch_count` rows (default: those with step <= step_count). /final and
        /folds are cleared, the status is set back to "running", `resume_count` grows by one. `env`,
        when given, replaces /env (the machine of the resumed part). None keeps everything.
        """
        path = os.fspath(path)
        log = open_log(path)
        return cls._rewrite(path, log, step_count, epoch_count, env)

    @classmethod
    def _rewrite(cls, path, log: "RunLog", step_count, epoch_count, env) -> "RunLogWriter":
        tmp = path + ".rewrite-tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        fields = dict(log.config)
        new = cls(tmp, log.config_json, fields, log.env if env is None else env,
                  [(n, s, o, z) for n, s, o, z in log.layout], log.ranks, log.n_classes,
                  audit=log.audit is not None, folds=log.has_folds, _created=log.created,
                  _resume_count=log.resume_count + 1)
        try:
            keep = _truncation(log, step_count, epoch_count)
            steps = {k: v[: keep["steps"]] for k, v in log.steps.items()}
            if keep["steps"]:
                new.append_steps(**steps)
            if log.audit is not None and keep["audit"]:
                new.append_audit(**{k: v[: keep["audit"]] for k, v in log.audit.items()})
            if keep["epochs"]:
                new.append_epoch(**{k: v[: keep["epochs"]] for k, v in log.epochs.items()})
            if keep["consistency"]:
                new.append_consistency(**{k: v[: keep["consistency"]] for k, v in log.consistency.items()})
            new._close_file()
        except BaseException:
            new._close_file()
            os.remove(tmp)
            raise
        os.replace(tmp, path)
        return cls._attach(path)

    def truncate_to(self, step_count: int, epoch_count: int | None = None) -> None:
        """Drop every row at or after `step_count` steps (see `reopen`); the log stays open."""
        self._check_open()
        self._close_file()
        log = open_log(self.path)
        other = type(self)._rewrite(self.path, log, step_count, epoch_count, None)
        self.__dict__.update(other.__dict__)
        other._closed = True  # the file handle now belongs to self

    # -- appending --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"run log {self.path} is closed")

    def _append(self, table: str, columns: dict) -> None:
        self._check_open()
        if table not in self._tables:
            raise RuntimeError(f"run log {self.path} has no /{table} group "
                               f"(it is created only when enabled at creation; see docs/runlog.md)")
        spec = TABLES[table]
        n = None
        arrays = {}
        for name, (dtype, per_rank) in spec.items():
            value = columns.get(name)
            if value is None:
                continue
            arr = np.asarray(value)
            if per_rank:
                arr = arr.reshape(-1, self.ranks) if arr.ndim <= 1 else arr
                if arr.ndim != 2 or arr.shape[1] != self.ranks:
                    raise ValueError(f"/{table}/{name} needs shape (n, {self.ranks}), got {np.shape(value)}")
            else:
                arr = np.atleast_1d(arr)
                if arr.ndim != 1:
                    raise ValueError(f"/{table}/{name} needs shape (n,), got {np.shape(value)}")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"/{table}: column {name} has {arr.shape[0]} rows, the others {n}")
            arrays[name] = arr.astype(dtype, copy=False)
        missing = [k for k in spec if k not in arrays and not (table == "steps" and k == "lr")]
        if missing:
            raise ValueError(f"/{table}: missing column(s) {', '.join(missing)}")
        if not n:
            return
        for name, (dtype, per_rank) in spec.items():
            if name not in arrays:  # lr not given
                arrays[name] = np.full(n, np.nan, dtype)
        self._rows[table] += n
        # Rows become visible to readers only at flush(), so the per-step tables wait in memory until
        # then: resizing and writing an HDF5 table costs ~2 ms per call, which every few hundred short
        # training steps would otherwise pay (several us per step on rank 0, whom every rank waits for).
        pending = self._pending.setdefault(table, [])
        pending.append(arrays)
        if table not in BUFFERED_TABLES or sum(len(a["step"]) for a in pending) >= PENDING_ROWS:
            self._write_pending(table)

    def _write_pending(self, table: str) -> None:
        pending = self._pending.pop(table, None)
        if not pending:
            return
        group = self._tables[table]
        key = "step" if table != "folds" else "fold"
        start = group[key].shape[0]
        for name in TABLES[table]:
            values = pending[0][name] if len(pending) == 1 else np.concatenate([a[name] for a in pending])
            dset = group[name]
            dset.resize(start + len(values), axis=0)
            dset[start:start + len(values)] = values

    def append_steps(self, step, epoch, loss, rank_loss, samples, compute_s, exchange_s, wait_s, lr=None):
        """A window of steps: 1-D arrays of n steps, per-rank arrays of shape (n, ranks), times in s."""
        self._append("steps", dict(step=step, epoch=epoch, loss=loss, rank_loss=rank_loss, samples=samples,
                                   compute_s=compute_s, exchange_s=exchange_s, wait_s=wait_s, lr=lr))

    def append_audit(self, step, rel_l2_error, frac_elements_differ, lost_contributions):
        self._append("audit", dict(step=step, rel_l2_error=rel_l2_error,
                                   frac_elements_differ=frac_elements_differ,
                                   lost_contributions=lost_contributions))

    def append_epoch(self, epoch, step, train_loss, train_acc, test_loss, test_acc, train_time_s, samples):
        """One evaluated epoch (scalars) or several (arrays). Accuracies are fractions in 0..1."""
        self._append("epochs", dict(epoch=epoch, step=step, train_loss=train_loss, train_acc=train_acc,
                                    test_loss=test_loss, test_acc=test_acc, train_time_s=train_time_s,
                                    samples=samples))

    def append_noise(self, first_step, step, steps, b_small, b_big, g2, trace, b_simple):
        """One window's noise-scale estimates (--noise-scale)."""
        self._append("noise", dict(step=step, first_step=first_step, steps=steps, b_small=b_small, b_big=b_big,
                                   g2=g2, trace=trace, b_simple=b_simple))

    def append_noise_epoch(self, epoch, step, steps, g2, trace, b_simple):
        """One epoch's mean estimates and its B_simple (--noise-scale)."""
        self._append("noise_epochs", dict(epoch=epoch, step=step, steps=steps, g2=g2, trace=trace,
                                          b_simple=b_simple))

    def append_consistency(self, step, checksum, ok):
        self._append("consistency", dict(step=step, checksum=checksum, ok=ok))

    def write_folds(self, fold_acc, fold_loss):
        """Per-fold test accuracy (fraction) and loss of a k-fold run; fills mean_acc/sd_acc (ddof 1)."""
        self._check_open()
        acc = np.atleast_1d(np.asarray(fold_acc, np.float64))
        loss = np.atleast_1d(np.asarray(fold_loss, np.float64))
        if acc.shape != loss.shape or acc.ndim != 1:
            raise ValueError(f"fold_acc and fold_loss need the same 1-D shape, got {acc.shape} and {loss.shape}")
        start = self._rows.get("folds", 0)
        self._append("folds", dict(fold=np.arange(start, start + len(acc)), test_acc=acc, test_loss=loss))
        everything = self._f["folds/test_acc"][: self._rows["folds"]]
        attrs = self._f["folds"].attrs
        attrs.modify("mean_acc", np.float64(everything.mean()) if len(everything) else np.nan)
        attrs.modify("sd_acc", np.float64(everything.std(ddof=1)) if len(everything) > 1 else np.nan)

    def write_final(self, params, confusion, **attrs):
        """Final flat params (float32), confusion matrix (rows true label, cols predicted) and summary
        attrs (test_acc, test_loss, train_time_s, samples, samples_per_s, steps; others -> extra_json)."""
        self._check_open()
        params = np.ascontiguousarray(np.asarray(params, np.float32).ravel())
        confusion = np.asarray(confusion, np.int64)
        if confusion.shape != (self.n_classes, self.n_classes):
            raise ValueError(f"confusion needs shape ({self.n_classes}, {self.n_classes}), got {confusion.shape}")
        expected = self._f["final/params"].attrs["n_params"]
        if expected >= 0 and params.size != expected:
            raise ValueError(f"params has {params.size} values, the layout {expected}")
        group = self._f["final"]
        extras = {}
        for name, value in attrs.items():
            if name in FINAL_ATTRS:
                group.attrs.modify(name, np.asarray(value if value is not None else np.nan,
                                                    FINAL_ATTRS[name]))
            else:
                extras[name] = value
        text = json.dumps(extras, sort_keys=True, default=_json_default)
        if len(text.encode("utf-8")) > FINAL_EXTRA_BYTES:
            raise ValueError(f"write_final: extra attrs take more than {FINAL_EXTRA_BYTES} bytes as JSON")
        group.attrs.modify("extra_json", np.array(text.encode("utf-8"), dtype=_fixed_str_dtype(FINAL_EXTRA_BYTES)))
        group["confusion"][...] = confusion
        group["params"].resize((params.size,))
        group["params"][...] = params
        self._final_written = True

    def rows(self, table: str) -> int:
        """Rows appended so far to /steps, /audit, /epochs, /consistency or /folds (0 for a table the
        log does not have); "final": 1 once write_final was called. Checkpoints record these so that
        `reopen(path, rows("steps"), rows("epochs"))` resumes exactly where the checkpoint was taken."""
        if table == "final":
            return int(self._final_written)
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}, final")
        return int(self._rows.get(table, 0))

    # -- status, flush, close ---------------------------------------------------------------------
    @property
    def status(self) -> str:
        return _decode(self._f.attrs["status"]) if not self._closed else self._last_status

    @property
    def closed(self) -> bool:
        return self._closed

    def set_status(self, status: str, message: str = "") -> None:
        self._check_open()
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._f.attrs.modify("status", np.array(status.encode(), dtype=_fixed_str_dtype(STATUS_BYTES)))
        self._f.attrs.modify("status_message", np.array(_cut_utf8(message, MESSAGE_BYTES),
                                                        dtype=_fixed_str_dtype(MESSAGE_BYTES)))

    def flush(self) -> None:
        """Make everything appended so far durable and visible to readers (call at least every epoch)."""
        self._check_open()
        for table in list(self._pending):
            self._write_pending(table)
        self._f.flush()  # rows first ...
        counts = [self._rows.get(name, 0) for name in self._committed_names[:-1]] + [int(self._final_written)]
        self._committed[...] = np.asarray(counts, np.int64)
        self._f.flush()  # ... then the row counts that make them visible

    def close(self, status: str | None = None, message: str = "") -> None:
        """Flush, set the final status, close. status None: keep it, but a log still "running" becomes
        "interrupted" (it was closed before the run said how it ended). Closing twice does nothing."""
        if self._closed:
            return
        try:
            if status is None and self.status == "running":
                status, message = "interrupted", message or "log closed before the run reported its end"
            if status is not None:
                self.set_status(status, message)
            self.flush()
        finally:
            self._close_file()

    def _close_file(self) -> None:
        if self._closed:
            return
        try:  # appended rows reach the file even when the log is closed without flush()
            for table in list(self._pending):
                self._write_pending(table)
        except Exception:
            pass
        try:
            self._last_status = _decode(self._f.attrs["status"])
        except Exception:
            self._last_status = "unknown"
        self._closed = True
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._closed:
            return False
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", "interrupted (KeyboardInterrupt)")
        else:
            self.close("failed", f"{exc_type.__name__}: {exc}")
        return False

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self._close_file()
            except Exception:
                pass


def _build(f, config_json, config_fields, env, layout, ranks, n_classes, audit, folds, created, resume_count):
    """Create every group, dataset and attribute of a fresh log (before SWMR write mode starts)."""
    a = f.attrs
    _set_str_attr(a, "format", FORMAT)
    a.create("format_version", np.int64(FORMAT_VERSION))
    _set_str_attr(a, "created", created)
    _set_str_attr(a, "status", "running", STATUS_BYTES)
    _set_str_attr(a, "status_message", "", MESSAGE_BYTES)
    _set_str_attr(a, "cnnpar_version", __version__)
    a.create("ranks", np.int64(ranks))
    a.create("n_classes", np.int64(n_classes))
    a.create("resume_count", np.int64(resume_count))

    cfg = f.create_group("config")
    json.loads(config_json)  # must be valid JSON
    _set_str_attr(cfg.attrs, "json", config_json)
    for key, value in sorted(config_fields.items()):
        if key != "json":
            _set_plain_attr(cfg.attrs, key, value)

    env_group = f.create_group("env")
    _set_str_attr(env_group.attrs, "json", json.dumps(env, sort_keys=True, default=_json_default))
    for key, value in sorted(env.items()):
        if key != "json":
            _set_plain_attr(env_group.attrs, key, value)

    rows = [(str(n), tuple(int(d) for d in s), int(o), int(z)) for n, s, o, z in layout]
    lay = f.create_group("layout")
    for name, values in (("names", [r[0] for r in rows]), ("shapes", [_shape_text(r[1]) for r in rows])):
        raw = [v.encode("utf-8") for v in values]
        width = max([1] + [len(r) for r in raw])
        lay.create_dataset(name, data=np.array(raw, dtype=_fixed_str_dtype(width)), dtype=_fixed_str_dtype(width))
    lay.create_dataset("offsets", data=np.array([r[2] for r in rows], np.int64))
    lay.create_dataset("sizes", data=np.array([r[3] for r in rows], np.int64))
    n_params = max([o + z for _, _, o, z in rows], default=-1)

    for table, spec in TABLES.items():
        if (table == "audit" and not audit) or (table == "folds" and not folds) or \
                (table.startswith("noise") and not config_fields.get("noise_scale", False)):
            continue
        group = f.create_group(table)
        chunk = CHUNK_ROWS[table]
        for name, (dtype, per_rank) in spec.items():
            if per_rank:
                rows_per_chunk = max(16, min(chunk, 65536 // ranks))
                group.create_dataset(name, shape=(0, ranks), maxshape=(None, ranks), dtype=dtype,
                                     chunks=(rows_per_chunk, ranks))
            else:
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
        if table == "folds":
            group.attrs.create("mean_acc", np.float64(np.nan))
            group.attrs.create("sd_acc", np.float64(np.nan))

    final = f.create_group("final")
    params = final.create_dataset("params", shape=(0,), maxshape=(None,), dtype="f4",
                                  chunks=(max(1, min(max(n_params, 1), 1 << 18)),))
    params.attrs.create("n_params", np.int64(n_params))
    final.create_dataset("confusion", data=np.zeros((n_classes, n_classes), np.int64))
    for name, dtype in FINAL_ATTRS.items():
        final.attrs.create(name, np.asarray(np.nan if dtype == "f8" else -1, dtype))
    _set_str_attr(final.attrs, "extra_json", "{}", FINAL_EXTRA_BYTES)

    committed = f.create_dataset("committed_rows", data=np.zeros(len(COMMITTED), np.int64))
    raw = [n.encode() for n in COMMITTED]
    committed.attrs.create("tables", np.array(raw, dtype=_fixed_str_dtype(16)), dtype=_fixed_str_dtype(16))


# ----------------------------------------------------------------------------------------------------
# reader


class RunLog:
    """A read-only, fully loaded view of a run log (the file is closed once `open_log` returns)."""

    path: str
    format_version: int
    created: str
    status: str
    status_message: str
    cnnpar_version: str
    ranks: int
    n_classes: int
    resume_count: int
    config_json: str
    config: dict
    env: dict
    layout: list
    steps: dict
    epochs: dict
    audit: dict | None
    noise: dict | None
    noise_epochs: dict | None
    consistency: dict
    folds: dict | None
    has_folds: bool
    final: dict | None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def param_views(self) -> dict:
        """Each parameter of the final params as an array of its own shape (views into one array)."""
        if self.final is None:
            raise ValueError(f"{self.path}: the log has no final params (status {self.status})")
        flat = self.final["params"]
        return {name: flat[offset:offset + size].reshape(shape) for name, shape, offset, size in self.layout}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self) -> str:
        return (f"RunLog({self.path!r}, status={self.status!r}, ranks={self.ranks}, "
                f"steps={len(self.steps['step'])}, epochs={len(self.epochs['epoch'])})")


class _Corrupt(Exception):
    """The file is HDF5 but its content does not hold together as a cnnpar run log."""


def _h5_reason(err: BaseException) -> str:
    text = str(err).strip()
    for prefix in ("Unable to synchronously open file (", "Unable to open file (", "Unable to create file ("):
        if prefix in text:
            text = text.split(prefix, 1)[1].rstrip(")")
    if "errno" in text and "error message" in text:
        text = text.split("error message = ", 1)[-1].strip(" '\"")
    return " ".join(text.split())[:200] or type(err).__name__


def _has_hdf5_signature(path: str) -> bool:
    """HDF5 looks for its signature at 0, 512, 1024, 2048, ... bytes."""
    size = os.path.getsize(path)
    offset = 0
    with open(path, "rb") as fh:
        while offset + 8 <= size:
            fh.seek(offset)
            if fh.read(8) == HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def open_log(path) -> RunLog:
    """Load a run log. Every problem with the file is a UserError naming it, in one line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(path, "no such file")
    if os.path.isdir(path):
        raise UserError(path, "is a directory, not a run log")
    try:
        signature = _has_hdf5_signature(path)
    except OSError as err:
        raise UserError(path, f"cannot read the file: {err.strerror or err}") from None
    if not signature:
        raise UserError(path, "not an HDF5 file, so not a cnnpar run log")
    f = _open_h5(path)
    try:
        return _load(f, path)
    except UserError:
        raise
    except (_Corrupt, Exception) as err:  # noqa: BLE001 - any failure inside a damaged file is the file's fault
        reason = str(err) if isinstance(err, _Corrupt) else f"{type(err).__name__}: {_h5_reason(err)}"
        raise UserError(path, f"corrupt or truncated run log ({reason})") from None
    finally:
        try:
            f.close()
        except Exception:
            pass


def _open_h5(path: str):
    """Open read-only: plainly when the file was closed cleanly, else (live run, or a writer that was
    killed) as an SWMR reader."""
    import h5py

    try:
        return h5py.File(path, "r", locking=False)
    except Exception as err:  # noqa: BLE001
        reason = _h5_reason(err)
    if "locking flag" in reason:  # this very process has the log open for writing: share that handle
        try:
            return h5py.File(path, "r")
        except Exception as err:  # noqa: BLE001
            reason = _h5_reason(err)
    if "already open for write" not in reason:
        raise UserError(path, f"corrupt or truncated HDF5 file ({reason})")
    try:
        return _open_swmr_reader(path)
    except Exception as err:  # noqa: BLE001
        swmr_reason = _h5_reason(err)
    if "superblock" in swmr_reason or "SWMR" in swmr_reason:
        raise UserError(path, "HDF5 file left open by a writer that did not finish, and not written "
                              "in SWMR mode, so unreadable (h5clear -s may recover it)")
    raise UserError(path, f"corrupt or truncated HDF5 file ({swmr_reason})")


SWMR_READ_ATTEMPTS = 16  # HDF5's default (100, with exponential back-off) makes a damaged file hang for ages


def _open_swmr_reader(path: str):
    """h5py.File(path, "r", swmr=True), but with a bounded number of metadata read attempts: an SWMR
    reader retries a metadata read whose checksum fails (the writer may be mid-write), and with
    HDF5's default of 100 attempts and doubling sleeps a damaged file would block for hours."""
    import h5py
    from h5py import h5f, h5p

    setter = _metadata_read_attempts_setter()
    if setter is None:
        return h5py.File(path, "r", libver="latest", swmr=True, locking=False)
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    fapl.set_fclose_degree(h5f.CLOSE_STRONG)
    if setter(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        return h5py.File(path, "r", libver="latest", swmr=True, locking=False)
    fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


_SETTER: list = []


def _metadata_read_attempts_setter():
    """H5Pset_metadata_read_attempts from the HDF5 library h5py uses (h5py does not wrap it), or None."""
    if _SETTER:
        return _SETTER[0]
    setter = None
    try:
        import ctypes

        import h5py  # noqa: F401 - loads the library

        library = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit("/", 1)[-1]
                if line.rstrip().endswith((".so", ".dylib")) or ".so." in name:
                    if name.startswith("libhdf5") and not name.startswith("libhdf5_hl"):
                        library = line.split(None, 5)[-1].strip()
                        break
        if library:
            function = ctypes.CDLL(library).H5Pset_metadata_read_attempts
            function.argtypes = [ctypes.c_int64, ctypes.c_uint]
            function.restype = ctypes.c_int
            setter = function
    except Exception:  # noqa: BLE001 - only a guard against slow failures; plain SWMR reading still works
        setter = None
    _SETTER.append(setter)
    return setter


def _attr(attrs, name, required=True, default=None):
    if name not in attrs:
        if required:
            raise _Corrupt(f"attribute {name!r} is missing")
        return default
    return _decode(attrs[name])


def _load(f, path: str) -> RunLog:
    fmt = _attr(f.attrs, "format", required=False)
    if fmt != FORMAT:
        raise UserError(path, "an HDF5 file, but not a cnnpar run log (no format = 'cnnpar-runlog' attribute)")
    version = _attr(f.attrs, "format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _Corrupt(f"format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise UserError(path, f"written by a newer cnnpar (log format version {version}; this cnnpar reads "
                              f"up to version {FORMAT_VERSION}); upgrade cnnpar to read it")
    if version < 1:
        raise _Corrupt(f"unknown log format version {version}")

    file_size = os.path.getsize(path)
    log = RunLog()
    log.path = path
    log.format_version = version
    log.created = str(_attr(f.attrs, "created"))
    log.status = str(_attr(f.attrs, "status"))
    if log.status not in STATUSES:
        raise _Corrupt(f"unknown status {log.status!r}")
    log.status_message = str(_attr(f.attrs, "status_message"))
    log.cnnpar_version = str(_attr(f.attrs, "cnnpar_version"))
    log.ranks = _int_attr(f.attrs, "ranks", 1)
    log.n_classes = _int_attr(f.attrs, "n_classes", 1)
    log.resume_count = _int_attr(f.attrs, "resume_count", 0)

    log.config_json = str(_attr(f["config"].attrs, "json"))
    log.config = _json_dict(log.config_json, "/config json")
    log.env = _json_dict(str(_attr(f["env"].attrs, "json")), "/env json")

    lay = f["layout"]
    names = _read(lay["names"], file_size)
    shapes = _read(lay["shapes"], file_size)
    offsets = _read(lay["offsets"], file_size)
    sizes = _read(lay["sizes"], file_size)
    if not (len(names) == len(shapes) == len(offsets) == len(sizes)):
        raise _Corrupt("/layout datasets differ in length")
    log.layout = []
    for name, shape_text, offset, size in zip(names, shapes, offsets, sizes):
        try:
            shape = _shape_from_text(_decode(shape_text))
        except ValueError:
            raise _Corrupt(f"/layout/shapes holds {shape_text!r}") from None
        if int(np.prod(shape, dtype=np.int64)) != int(size) or offset < 0 or size < 0:
            raise _Corrupt(f"/layout row {_decode(name)!r} is inconsistent")
        log.layout.append((_decode(name), shape, int(offset), int(size)))

    committed = _read(f["committed_rows"], file_size)
    names = _committed_names(f["committed_rows"])
    if committed.shape != (len(names),) or committed.dtype.kind not in "iu" or np.any(committed < 0):
        raise _Corrupt("/committed_rows is malformed")
    counts = dict.fromkeys(COMMITTED, 0)
    counts.update(zip(names, (int(c) for c in committed)))

    def table(name):
        group = f[name]
        out = {}
        for col, (dtype, per_rank) in TABLES[name].items():
            dset = group[col]
            if dset.shape[0] < counts[name] or (per_rank and dset.shape[1:] != (log.ranks,)) or \
                    (not per_rank and dset.ndim != 1):
                raise _Corrupt(f"/{name}/{col} has shape {dset.shape}, expected {counts[name]} rows")
            out[col] = _read(dset, file_size, counts[name])
        return out

    log.steps = table("steps")
    log.epochs = table("epochs")
    log.consistency = table("consistency")
    log.audit = table("audit") if "audit" in f else None
    log.noise = table("noise") if "noise" in f else None
    log.noise_epochs = table("noise_epochs") if "noise_epochs" in f else None
    log.has_folds = "folds" in f
    log.folds = None
    if log.has_folds and counts["folds"]:
        log.folds = table("folds")
        log.folds["mean_acc"] = float(_attr(f["folds"].attrs, "mean_acc"))
        log.folds["sd_acc"] = float(_attr(f["folds"].attrs, "sd_acc"))

    log.final = None
    final = f["final"]
    if counts["final"]:
        params = _read(final["params"], file_size)
        confusion = _read(final["confusion"], file_size)
        n_params = max([o + z for _, _, o, z in log.layout], default=params.size)
        if params.ndim != 1 or params.size != n_params:
            raise _Corrupt(f"/final/params has {params.size} values, the layout {n_params}")
        if confusion.shape != (log.n_classes, log.n_classes):
            raise _Corrupt(f"/final/confusion has shape {confusion.shape}")
        attrs = {name: _attr(final.attrs, name) for name in FINAL_ATTRS}
        attrs.update(_json_dict(str(_attr(final.attrs, "extra_json")), "/final extra_json"))
        log.final = {"params": params, "confusion": confusion, "attrs": attrs}
    return log


def _committed_names(dataset) -> tuple:
    """The tables /committed_rows counts, in order: its `tables` attribute (older logs have fewer)."""
    raw = dataset.attrs.get("tables")
    if raw is None:
        return COMMITTED[:5] + ("final",)
    names = tuple(_decode(v) for v in np.asarray(raw).tolist())
    if names[-1:] != ("final",) or not set(names) <= set(COMMITTED):
        raise _Corrupt(f"/committed_rows names unknown tables {names}")
    return names


def _int_attr(attrs, name, minimum) -> int:
    value = _attr(attrs, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _Corrupt(f"attribute {name!r} is {value!r}")
    return value


def _json_dict(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise _Corrupt(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _Corrupt(f"{what} is not a JSON object")
    return value


def _read(dset, file_size: int, rows: int | None = None) -> np.ndarray:
    """Read a dataset (its first `rows` rows), refusing sizes a damaged header may claim."""
    shape = dset.shape
    if shape is None:
        raise _Corrupt(f"{dset.name} has no shape")
    if rows is not None:
        shape = (rows,) + tuple(shape[1:])
    nbytes = int(np.prod(shape, dtype=np.float64)) * dset.dtype.itemsize
    if nbytes > 4 * file_size + (1 << 20):
        raise _Corrupt(f"{dset.name} claims {nbytes} bytes in a {file_size}-byte file")
    data = dset[()] if rows is None else dset[:rows]
    return np.asarray(data)


def is_complete_log(path) -> bool:
    """True only if `path` opens as a run log whose status is "complete"; never raises."""
    try:
        return open_log(path).complete
    except Exception:  # noqa: BLE001
        return False


def _truncation(log: RunLog, step_count, epoch_count) -> dict:
    """Rows of each table to keep when truncating to `step_count` steps / `epoch_count` epochs."""
    keep = {"steps": len(log.steps["step"]), "audit": len(log.audit["step"]) if log.audit else 0,
            "epochs": len(log.epochs["epoch"]), "consistency": len(log.consistency["step"])}
    if step_count is not None:
        step_count = int(step_count)
        keep["steps"] = int(np.count_nonzero(log.steps["step"] < step_count))
        if log.audit:
            keep["audit"] = int(np.count_nonzero(log.audit["step"] < step_count))
        keep["consistency"] = int(np.count_nonzero(log.consistency["step"] < step_count))
        if epoch_count is None:
            keep["epochs"] = int(np.count_nonzero(log.epochs["step"] <= step_count))
    if epoch_count is not None:
        keep["epochs"] = min(int(epoch_count), keep["epochs"])
    return keep


def summarize(log: RunLog) -> str:
    """One line about a log, for scripts."""
    acc = log.final["attrs"]["test_acc"] if log.final else float("nan")
    return (f"{log.path}: {log.status}, {log.config.get('mode', '?')} x {log.ranks} ranks, "
            f"{len(log.steps['step'])} steps, test acc {acc * 100 if not math.isnan(acc) else float('nan'):.1f}%")


__all__ = ["FORMAT", "FORMAT_VERSION", "STATUSES", "RunLogWriter", "RunLog", "open_log", "is_complete_log"]
