"""Writes one run's log (rank 0 only). The schema is `schema.SCHEMA`; docs/runlog.md explains it.

HDF5 never writes to the disk here. The writer keeps the log open as an in-memory HDF5 file (the core
driver without a backing store); appended rows, the final result and status changes wait for
`flush()`, which writes them into it, then writes the whole file image to `<log>.flush-tmp` and renames
it over the log (the closing write is also synced to the device).
So the log on disk is at every moment a closed, complete HDF5 file as of the last flush, whatever
kills the job and when (SIGKILL, node failure, MPI_Abort, even mid-flush), and any HDF5 1.10+ tool
opens it plainly. A write that fails (disk full, quota, I/O error) fails in plain Python I/O on the
temporary file, so it leaves the log as it was and HDF5's state untouched: it becomes one
`WriteError` naming the file and the cause. While the writer lives it holds a lock on the log
(`lock.WriterLock`) by which readers tell a live run from a dead one.

A log is marked `complete` only after `/final` and every row were written and read back intact.
The cost is one write of the whole file per flush (the trainer flushes once per epoch, per
checkpoint and at the end); docs/faults.md gives the measured cost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time

import errno

import numpy as np

from .. import __version__
from ..errors import UserError, WriteError
from . import _h5
from .lock import WriterLock
from .schema import (BY_PATH, COMMITTED, FINAL_ATTRS, FINAL_EXTRA_BYTES, FORMAT, FORMAT_VERSION, LIBVER,
                     MESSAGE_BYTES, STATUS_BYTES, TABLE_RECORDS, TABLES, WRITTEN_STATUSES, columns)

PENDING_ROWS = 65536   # rows of one table that may wait in memory before a flush is forced
FLUSH_EVERY_S = 10.0   # `flush_due()` writes when this long has passed since the last write, ...
FLUSH_COST_SHARE = 0.01  # ... or longer, so that rewriting a large log takes at most this share of the time
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


class RunLogWriter:
    """Writes one run's log (rank 0 only).

    `layout` rows are (name, shape, offset, size) of each parameter in the flat parameter vector.
    `/audit` exists when `audit` is true (default: config_fields["race_audit"]); `/folds` when `folds`
    is true (default: config_fields["folds"] > 1). `created` is the run's start (default: now).
    Usable as a context manager: an exception closes the log as "failed" ("interrupted" for Ctrl-C).
    """

    def __init__(self, path, config_json: str, config_fields: dict, env: dict, layout: list,
                 ranks: int, n_classes: int = 10, *, audit: bool | None = None, folds: bool | None = None,
                 noise: bool | None = None, created: str | None = None, world_ranks: int | None = None, _resume_count: int = 0):
        import h5py

        self.path = os.fspath(path)
        self._closed = True
        self._lock = None
        ranks, n_classes = int(ranks), int(n_classes)
        if ranks < 1:
            raise ValueError(f"ranks must be at least 1, got {ranks}")
        chosen = {"race_audit": audit, "folds > 1": folds, "noise_scale": noise}  # what the caller decided
        present = {t.name: t.present_in(config_fields) if chosen.get(t.present) is None else bool(chosen[t.present])
                   for t in TABLE_RECORDS}
        json.loads(config_json)  # must be valid JSON
        if os.path.lexists(self.path):
            raise UserError(self.path, "a file already exists there; the run log will not overwrite it")
        self._h5 = _in_memory_file("w")
        # The tables' datasets by path, kept from their creation: h5py's lookup by path costs more than
        # the write (~0.15 ms each), and a short run writes each table once.
        self._datasets = _build(self._h5, config_json, config_fields, env, layout, ranks, n_classes, present,
                                created or _h5.utc_now(), _resume_count, world_ranks or ranks)
        try:
            self._publish(exclusive=True)
        except OSError as err:
            if err.errno == errno.EEXIST:
                raise UserError(self.path, "a file already exists there; the run log will not overwrite it") \
                    from None
            if err.errno in WRITE_FAILURES:
                raise WriteError("--log", f"{self.path}: {_h5.write_failure_cause(err)}") from None
            raise UserError(self.path, f"cannot create the run log: {err.strerror or err}") from None
        self.ranks, self.n_classes = ranks, n_classes
        self._tables = {t for t in TABLES if present[t]}
        self._start({t: 0 for t in TABLES}, final_written=False, n_params=max([o + z for _, _, o, z in layout],
                                                                               default=-1))

    def _start(self, rows: dict, final_written: bool, n_params: int) -> None:
        self._closed = False
        self._rows = dict(rows)          # rows appended so far (written or waiting)
        self._written = dict(rows)       # rows already in the file
        self._pending = {}               # table -> list of column dicts waiting for the next flush
        self._final = None               # (params, confusion, attrs, extra_json) waiting for a flush
        self._final_written = final_written
        self._folds_stats = None
        self._status = None              # (status, message) waiting for a flush
        self._file_status = "running"
        self._n_params = n_params
        self.write_error = None          # the first WriteError; nothing is written after it

    # -- resuming ----------------------------------------------------------------------------------
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
        from .reader import open_log

        path = os.fspath(path)
        return cls._rewrite(path, open_log(path), step_count, epoch_count, env)

    @classmethod
    def _rewrite(cls, path, log, step_count, epoch_count, env) -> "RunLogWriter":
        from .reader import truncation

        tmp = path + ".rewrite-tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        new = cls(tmp, log.config_json, dict(log.config), log.env if env is None else env,
                  [(n, s, o, z) for n, s, o, z in log.layout], log.ranks, log.n_classes,
                  audit=log.audit is not None, folds=log.has_folds, noise=log.noise is not None,
                  created=log.created,
                  world_ranks=log.world_ranks, _resume_count=log.resume_count + 1)
        try:
            keep = truncation(log, step_count, epoch_count)
            for table in TABLE_RECORDS:
                rows = getattr(log, table.name)
                if table.on_resume != "none" and rows is not None and keep[table.name]:
                    new._append(table.name, {k: v[: keep[table.name]] for k, v in rows.items()})
            new.flush()
            os.replace(tmp, path)
        except BaseException:
            new._release()
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        new.path = path  # the lock stays on the renamed file
        return new

    def truncate_to(self, step_count: int, epoch_count: int | None = None) -> None:
        """Drop every row at or after `step_count` steps (see `reopen`); the log stays open."""
        from .reader import open_log

        self.flush()
        self._release()
        other = type(self)._rewrite(self.path, open_log(self.path), step_count, epoch_count, None)
        self.__dict__.update(other.__dict__)
        other._closed, other._lock, other._h5 = True, None, None  # its lock and file now belong to self

    # -- appending --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"run log {self.path} is closed")

    def _append(self, table: str, values: dict) -> None:
        self._check_open()
        if table not in self._tables:
            raise RuntimeError(f"run log {self.path} has no /{table} group "
                               f"(it is created only when enabled at creation; see docs/runlog.md)")
        n = None
        arrays = {}
        for entry in columns(table):
            value = values.get(entry.name)
            if value is None:
                continue
            arr = np.asarray(value)
            if entry.per_rank:
                arr = arr.reshape(-1, self.ranks) if arr.ndim <= 1 else arr
                if arr.ndim != 2 or arr.shape[1] != self.ranks:
                    raise ValueError(f"{entry.path} needs shape (n, {self.ranks}), got {np.shape(value)}")
            else:
                arr = np.atleast_1d(arr)
                if arr.ndim != 1:
                    raise ValueError(f"{entry.path} needs shape (n,), got {np.shape(value)}")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"/{table}: column {entry.name} has {arr.shape[0]} rows, the others {n}")
            arrays[entry.name] = arr.astype(entry.dtype, copy=False)
        missing = [e.name for e in columns(table) if e.name not in arrays and e.path != "/steps/lr"]
        if missing:
            raise ValueError(f"/{table}: missing column(s) {', '.join(missing)}")
        if not n:
            return
        if "lr" in [e.name for e in columns(table)] and "lr" not in arrays:
            arrays["lr"] = np.full(n, np.nan, BY_PATH["/steps/lr"].dtype)
        self._rows[table] += n
        # Rows wait in memory for the next flush: opening the file and resizing a table costs ~ms,
        # which every window of short training steps would otherwise pay on rank 0, whom all wait for.
        self._pending.setdefault(table, []).append(arrays)
        if self._rows[table] - self._written[table] >= PENDING_ROWS:
            self._flush_deferring_errors()

    def append_steps(self, step, epoch, loss, rank_loss, samples, compute_s, exchange_s, wait_s, lr=None):
        """A window of steps: 1-D arrays of n steps, per-rank arrays of shape (n, ranks), times in s."""
        self._append("steps", dict(step=step, epoch=epoch, loss=loss, rank_loss=rank_loss, samples=samples,
                                   compute_s=compute_s, exchange_s=exchange_s, wait_s=wait_s, lr=lr))

    def append_audit(self, step, rel_l2_error, frac_elements_differ, lost_contributions):
        self._append("audit", dict(step=step, rel_l2_error=rel_l2_error,
                                   frac_elements_differ=frac_elements_differ,
                                   lost_contributions=lost_contributions))

    def append_noise(self, first_step, step, steps, b_small, b_big, g2, trace, b_simple):
        """One window's gradient-noise-scale estimates (--noise-scale)."""
        self._append("noise", dict(step=step, first_step=first_step, steps=steps, b_small=b_small, b_big=b_big,
                                   g2=g2, trace=trace, b_simple=b_simple))

    def append_noise_epoch(self, epoch, step, steps, g2, trace, b_simple):
        """One epoch's mean estimates and its B_simple (--noise-scale)."""
        self._append("noise_epochs", dict(epoch=epoch, step=step, steps=steps, g2=g2, trace=trace,
                                          b_simple=b_simple))

    def append_epoch(self, epoch, step, train_loss, train_acc, test_loss, test_acc, train_time_s, samples):
        """One evaluated epoch (scalars) or several (arrays). Accuracies are fractions in 0..1."""
        self._append("epochs", dict(epoch=epoch, step=step, train_loss=train_loss, train_acc=train_acc,
                                    test_loss=test_loss, test_acc=test_acc, train_time_s=train_time_s,
                                    samples=samples))

    def append_consistency(self, step, checksum, ok):
        self._append("consistency", dict(step=step, checksum=checksum, ok=np.asarray(ok).astype(np.uint8)))

    def write_folds(self, fold_acc, fold_loss):
        """Per-fold test accuracy (fraction) and loss of a k-fold run; fills mean_acc/sd_acc (ddof 1)."""
        self._check_open()
        acc = np.atleast_1d(np.asarray(fold_acc, np.float64))
        loss = np.atleast_1d(np.asarray(fold_loss, np.float64))
        if acc.shape != loss.shape or acc.ndim != 1:
            raise ValueError(f"fold_acc and fold_loss need the same 1-D shape, got {acc.shape} and {loss.shape}")
        start = self._rows["folds"]
        self._append("folds", dict(fold=np.arange(start, start + len(acc)), test_acc=acc, test_loss=loss))
        self._fold_acc = np.concatenate([getattr(self, "_fold_acc", np.zeros(0)), acc])
        every = self._fold_acc
        self._folds_stats = (np.float64(every.mean()) if len(every) else np.nan,
                             np.float64(every.std(ddof=1)) if len(every) > 1 else np.nan)

    def write_final(self, params, confusion, **attrs):
        """Final flat params (float32), confusion matrix (rows true label, cols predicted) and summary
        attrs (test_acc, test_loss, train_time_s, samples, samples_per_s, steps; others -> extra_json)."""
        self._check_open()
        params = np.array(np.asarray(params, np.float32).ravel())  # a copy: the caller may keep training
        confusion = np.array(confusion, np.int64)
        if confusion.shape != (self.n_classes, self.n_classes):
            raise ValueError(f"confusion needs shape ({self.n_classes}, {self.n_classes}), got {confusion.shape}")
        if self._n_params >= 0 and params.size != self._n_params:
            raise ValueError(f"params has {params.size} values, the layout {self._n_params}")
        known, extras = {}, {}
        for name, value in attrs.items():
            if name in FINAL_ATTRS:
                known[name] = np.asarray(value if value is not None else np.nan, FINAL_ATTRS[name])
            else:
                extras[name] = value
        text = json.dumps(extras, sort_keys=True, default=_h5.json_default)
        if len(text.encode("utf-8")) > FINAL_EXTRA_BYTES:
            raise ValueError(f"write_final: extra attrs take more than {FINAL_EXTRA_BYTES} bytes as JSON")
        self._final = (params, confusion, known, text)

    def rows(self, table: str) -> int:
        """Rows appended so far to /steps, /audit, /epochs, /consistency or /folds (0 for a table the
        log does not have); "final": 1 once write_final was called. Checkpoints record these so that
        `reopen(path, rows("steps"), rows("epochs"))` resumes exactly where the checkpoint was taken."""
        if table == "final":
            return int(self._final_written or self._final is not None)
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}, final")
        return int(self._rows.get(table, 0))

    # -- status, flush, close ---------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status[0] if self._status else self._file_status

    @property
    def closed(self) -> bool:
        return self._closed

    def set_status(self, status: str, message: str = "") -> None:
        """Takes effect at the next flush (or close)."""
        self._check_open()
        if status not in WRITTEN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(WRITTEN_STATUSES)}, got {status!r}")
        self._status = (status, message)

    def flush(self, _closing: bool = False) -> None:
        """Write everything appended so far and make it visible to readers (at least once per epoch).
        A failed write raises WriteError (every later flush raises the same one)."""
        self._check_open()
        if self.write_error is not None:
            raise self.write_error
        if not (self._pending or self._final is not None or self._status is not None or self._folds_stats):
            return  # nothing new: the file on disk is current
        try:
            self._write_session(_closing)
        except Exception as err:  # noqa: BLE001 - whatever broke the write, the log is now what it was
            self.write_error = err if isinstance(err, WriteError) else \
                WriteError("--log", f"{self.path}: {_h5.write_failure_cause(err)}")
            raise self.write_error from None

    def flush_due(self) -> None:
        """`flush()` when the log has not been written for FLUSH_EVERY_S (or for 1 / FLUSH_COST_SHARE times
        as long as the last write took, for a large log), or holds no rows yet: the
        trainer asks at every epoch end, and an epoch of a small run is shorter than a flush is worth
        (each one rewrites the whole file). The first rows are always written at once, so a new run
        shows up in its log, and a disk too small for it fails, at the first epoch."""
        if time.monotonic() >= self._flush_due_at or not any(self._written.values()):
            self.flush()

    def _flush_deferring_errors(self) -> None:
        with contextlib.suppress(WriteError):
            self.flush()  # a failure is kept in write_error and raised by the caller's next flush()

    def _write_session(self, closing: bool) -> None:
        """Write what waits into the in-memory file, then the whole file to the disk at once; the
        closing write is synced, and a `complete` one is read back and checked before it replaces the log."""
        f = self._h5
        final = self._final
        for table in list(self._pending):
            self._write_rows(f, table)
        if self._folds_stats is not None:
            _set_attr(self._node(f, "/folds"), "mean_acc", np.float64(self._folds_stats[0]))
            _set_attr(self._node(f, "/folds"), "sd_acc", np.float64(self._folds_stats[1]))
            self._folds_stats = None
        final_now = self._final is not None
        if final_now:
            self._write_final(f)
        counts = [self._written[t] for t in COMMITTED[:-1]] + [int(self._final_written or final_now)]
        _write_whole(self._node(f, "/committed_rows"), np.asarray(counts, np.int64))
        if self._status is not None:
            status, message = self._status
            _set_attr(f, "status", _h5.fixed_str(status, STATUS_BYTES))
            _set_attr(f, "status_message", _h5.fixed_str(message, MESSAGE_BYTES))
        complete = self._status is not None and self._status[0] == "complete"
        # Closing, HDF5's in-memory file is closed while the device writes (it is not needed after the
        # image is taken and checked; a failed write reopens the log from the disk).
        self._publish(sync=closing, check=(lambda fd, image: self._verify(fd, image, final)) if complete else None,
                      meanwhile=self._close_image if closing else None)
        if self._final is not None:
            self._final_written, self._final = True, None
        if self._status is not None:
            self._file_status, self._status = self._status[0], None

    def _publish(self, exclusive: bool = False, sync: bool = False, check=None, meanwhile=None) -> None:
        started = time.monotonic()
        self._publish_once(exclusive, sync, check, meanwhile)
        took_s = time.monotonic() - started
        self._flush_due_at = started + took_s + max(FLUSH_EVERY_S, took_s / FLUSH_COST_SHARE)

    def _publish_once(self, exclusive: bool, sync: bool, check, meanwhile) -> None:
        """Replace the log on disk by the image, atomically: written beside it (`sync`: and synced to the
        device; `check(fd, image)`: and read back), then renamed (`exclusive`: linked, so that an existing
        file is never replaced). `meanwhile()` runs while the device writes. Plain OS errors only (and the
        check's WriteError), raised before the log is touched."""
        self._h5.flush()
        data = self._h5.id.get_file_image()
        _check_free_space(self.path, len(data))
        tmp = f"{self.path}.flush-tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                view, done = memoryview(data), 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                if sync:  # the device starts writing now; the sync at the end waits for what is left
                    _start_writeback(fd)
                if check is not None:  # from the page cache: ~0.4 ms, most of it faulting in the new buffer
                    check(fd, data)
                if meanwhile is not None:
                    meanwhile()
                if sync:  # the data and the size, what a reader needs, not the timestamps
                    getattr(os, "fdatasync", os.fsync)(fd)
            finally:
                os.close(fd)
            lock = WriterLock(tmp)  # before the rename: a reader never sees the new file unlocked
            try:
                if exclusive:
                    os.link(tmp, self.path)
                else:
                    os.replace(tmp, self.path)
            except BaseException:
                lock.release()
                raise
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if self._lock is not None:
            self._lock.release()
        self._lock = lock

    def _node(self, f, path: str):
        """A group or dataset of the in-memory file, looked up by path once."""
        node = self._datasets.get(path)
        if node is None:
            node = self._datasets[path] = f[path]
        return node

    def _write_rows(self, f, table: str) -> None:
        import h5py

        pending = self._pending[table]
        start = self._written[table]
        n = 0
        for entry in columns(table):
            values = pending[0][entry.name] if len(pending) == 1 else \
                np.concatenate([chunk[entry.name] for chunk in pending])
            values = np.ascontiguousarray(values)
            dset = self._node(f, entry.path).id
            # HDF5's own calls: h5py's resize() and write_direct() cost ~4x as much in Python around
            # them, and a log's fixed cost is paid by every short run of a map.
            dset.set_extent((start + len(values),) + values.shape[1:])
            if start == 0:  # a short run's only write: the rows are the whole dataset
                dset.write(h5py.h5s.ALL, h5py.h5s.ALL, values)
            else:
                file_space = dset.get_space()
                file_space.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
                dset.write(h5py.h5s.create_simple(values.shape), file_space, values)
            n = len(values)
        self._written[table] = start + n
        del self._pending[table]

    def _write_final(self, f) -> None:
        params, confusion, known, text = self._final
        group = self._node(f, "/final")
        for name, value in known.items():
            _set_attr(group, name, value)
        _set_attr(group, "extra_json", _h5.fixed_str(text, FINAL_EXTRA_BYTES))
        _write_whole(self._node(f, "/final/confusion"), confusion)
        if "/final/params" not in self._datasets and "params" not in group:  # created without a layout
            _create_dataset(group, "/final/params", data=params)
        else:
            _write_whole(self._node(f, "/final/params"), params)

    def _verify(self, fd: int, image: bytes, final) -> None:
        """Read a written file back: every byte equal to the image, and in those bytes every row count
        and, when written now, `/final`, bit for bit (NaN included), where HDF5 says they are stored.
        (Opening the file with HDF5 again cost 1-2 ms, which every short run of a map would pay, and read
        back only what it looked at.)"""
        back = os.pread(fd, len(image) + 1, 0)  # one byte more than written: a longer file shows
        while len(back) <= len(image):
            more = os.pread(fd, len(image) + 1 - len(back), len(back))
            if not more:
                break
            back += more
        if back != image:
            at = next((i for i, (a, b) in enumerate(zip(back, image)) if a != b), min(len(back), len(image)))
            self._read_back_failed(f"the file reads back different from what was written (from byte {at}; "
                                   f"{os.fstat(fd).st_size} bytes on disk, {len(image)} written)")

        def stored(path: str, like: np.ndarray) -> np.ndarray:
            """The bytes of dataset `path` as read back (as many as `like` has; fewer if the file is short)."""
            dset = self._node(self._h5, path).id
            offset = dset.get_offset()  # the byte where a contiguous dataset's values start
            if offset is None:  # stored in the object header: the image's copy, which equals `back`
                import h5py

                values = np.empty(dset.shape, dset.dtype)
                dset.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
                return values.reshape(-1).view(np.uint8)
            return np.frombuffer(back, np.uint8, max(0, min(like.nbytes, len(back) - offset)), offset)

        def same(path: str, values: np.ndarray) -> bool:  # as bytes: a NaN equals itself
            return np.array_equal(stored(path, values), np.ascontiguousarray(values).reshape(-1).view(np.uint8))

        expected = np.asarray([self._written[t] for t in COMMITTED[:-1]]
                              + [int(self._final_written or final is not None)], np.int64)
        if not same("/committed_rows", expected):
            counts = stored("/committed_rows", expected)
            counts = counts[:len(counts) // 8 * 8].view(np.int64).tolist()
            self._read_back_failed(f"read back {counts} committed rows, wrote {expected.tolist()}")
        if final is not None and not (same("/final/params", final[0]) and same("/final/confusion", final[1])):
            self._read_back_failed("/final reads back different from what was written")

    def _read_back_failed(self, what: str):
        raise WriteError("--log", f"{self.path}: input/output error: {what}")

    def _close_image(self) -> None:
        """Close HDF5's in-memory file (the closing write no longer needs it)."""
        self._datasets = {}
        self._h5.close()
        self._h5 = None

    def close(self, status: str | None = None, message: str = "") -> None:
        """Flush, set the final status, close. status None: keep it, but a log still "running" becomes
        "interrupted" (it was closed before the run said how it ended). Closing twice does nothing.

        The closing write is synced to the device. "complete" replaces the log only after that file was
        read back with every row count and `/final` intact; when a write fails the log is left as it was
        at the last good flush, with a best-effort "failed" status, and WriteError is raised."""
        if self._closed:
            return
        try:
            if status is None and self.status == "running":
                status, message = "interrupted", message or "log closed before the run reported its end"
            if self.write_error is not None:
                self._mark_failed_after_write_error()
                raise self.write_error
            if status is not None:
                self.set_status(status, message)
            try:
                self.flush(_closing=True)
            except WriteError:
                self._mark_failed_after_write_error()
                raise
        finally:
            self._release()

    def _mark_failed_after_write_error(self) -> None:
        """Best effort: the log as of its last good flush, with status `failed`. This needs the file's
        size in free space; where even that fails the log stays `running`, which readers report as
        `incomplete` once this process is gone."""
        import h5py

        with contextlib.suppress(Exception):
            if self._h5 is not None:
                self._h5.close()
            self._h5 = _in_memory_file("r+", self.path)  # the file as it is on disk
            self._datasets = {}
            self._h5.attrs.modify("status", _h5.fixed_str("failed", STATUS_BYTES))
            self._h5.attrs.modify("status_message", _h5.fixed_str(f"write error: {self.write_error.message}",
                                                                  MESSAGE_BYTES))
            self._publish()

    def _release(self) -> None:
        self._closed = True
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        with contextlib.suppress(Exception):
            self._release()


_IMAGES = itertools.count()


def _in_memory_file(mode: str, path: str | None = None):
    """An HDF5 file that lives in memory only (the core driver without a backing store): new, or a copy
    of the file at `path`. Nothing HDF5 does to it touches the disk."""
    import h5py

    name = path or f"cnnpar-runlog-image-{os.getpid()}-{next(_IMAGES)}"
    return h5py.File(name, mode, driver="core", backing_store=False, libver=LIBVER)


def _set_attr(node, name: str, value: np.ndarray) -> None:
    """Overwrite an attribute the log created with a value of its type and shape, by HDF5's own calls
    (h5py's attrs.modify looks it up and checks it in Python: ~60 us against ~10)."""
    import h5py

    h5py.h5a.open(node.id, name.encode()).write(np.ascontiguousarray(value))


def _write_whole(dset, values: np.ndarray) -> None:
    """Overwrite a whole fixed-shape dataset (h5py's `dset[...] = values`, at a seventh of its cost)."""
    import h5py

    values = np.ascontiguousarray(values)
    if values.shape != dset.id.shape:  # HDF5 would read as many values as the dataset holds
        raise ValueError(f"{dset.name} has shape {dset.id.shape}, got {values.shape}")
    dset.id.write(h5py.h5s.ALL, h5py.h5s.ALL, values)


_WRITEBACK = []  # libc's sync_file_range, looked up once (empty list: not looked up yet; [None]: none)


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to the device, without waiting (Linux's
    sync_file_range with SYNC_FILE_RANGE_WRITE), so that the read-back and the in-memory file's close
    overlap the device write that the closing fdatasync would otherwise do from its start. Where there is
    no such call this does nothing: the sync then does it all. Durability rests on the sync alone."""
    if not _WRITEBACK:
        import ctypes

        try:
            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            function.restype = ctypes.c_int
        except (AttributeError, OSError):
            function = None
        _WRITEBACK.append(function)
    if _WRITEBACK[0] is not None:
        _WRITEBACK[0](fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; a failure here is the sync's to report


def _check_free_space(path: str, nbytes: int) -> None:
    """A flush that cannot fit fails before writing a byte, with the figures in its message."""
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free, the log needs {nbytes})")


def _create_dataset(group, path: str, **kwargs):
    """A dataset of the schema, with its `units` and `description` attributes."""
    entry = BY_PATH[path]
    dset = group.create_dataset(entry.name, dtype=entry.dtype, **kwargs)
    _h5.set_str_attr(dset.attrs, "units", entry.units)
    _h5.set_str_attr(dset.attrs, "description", entry.description)
    return dset


def _build(f, config_json, config_fields, env, layout, ranks, n_classes, present, created, resume_count,
           world_ranks) -> dict:
    """Create every group, dataset and attribute of a fresh log; returns the tables' datasets, /final
    and /committed_rows by path."""
    a = f.attrs
    _h5.set_str_attr(a, "format", FORMAT)
    a.create("format_version", np.int64(FORMAT_VERSION))
    _h5.set_str_attr(a, "created", created)
    _h5.set_str_attr(a, "status", "running", STATUS_BYTES)
    _h5.set_str_attr(a, "status_message", "", MESSAGE_BYTES)
    _h5.set_str_attr(a, "cnnpar_version", __version__)
    a.create("ranks", np.int64(ranks))
    a.create("world_ranks", np.int64(world_ranks))
    a.create("n_classes", np.int64(n_classes))
    a.create("resume_count", np.int64(resume_count))

    for name, fields in (("config", config_fields), ("env", env)):
        group = f.create_group(name)
        text = config_json if name == "config" else json.dumps(env, sort_keys=True, default=_h5.json_default)
        _h5.set_str_attr(group.attrs, "json", text)
        for key, value in sorted(fields.items()):
            if key != "json":
                _h5.set_plain_attr(group.attrs, key, value)

    rows = [(str(n), tuple(int(d) for d in s), int(o), int(z)) for n, s, o, z in layout]
    lay = f.create_group("layout")
    for name, values in (("names", [r[0] for r in rows]), ("shapes", [_h5.shape_text(r[1]) for r in rows])):
        raw = [v.encode("utf-8") for v in values]
        width = max([1] + [len(r) for r in raw])
        dset = lay.create_dataset(name, data=np.array(raw, dtype=_h5.fixed_str_dtype(width)),
                                  dtype=_h5.fixed_str_dtype(width))
        _h5.set_str_attr(dset.attrs, "units", BY_PATH[f"/layout/{name}"].units)
        _h5.set_str_attr(dset.attrs, "description", BY_PATH[f"/layout/{name}"].description)
    _create_dataset(lay, "/layout/offsets", data=np.array([r[2] for r in rows], np.int64))
    _create_dataset(lay, "/layout/sizes", data=np.array([r[3] for r in rows], np.int64))
    n_params = max([o + z for _, _, o, z in rows], default=-1)

    datasets = {}
    for table in TABLE_RECORDS:
        if not present[table.name]:
            continue
        group = f.create_group(table.name)
        chunk = table.chunk_rows
        for entry in columns(table.name):
            if entry.per_rank:
                rows_per_chunk = max(16, min(chunk, 65536 // ranks))
                dset = _create_dataset(group, entry.path, shape=(0, ranks), maxshape=(None, ranks),
                                       chunks=(rows_per_chunk, ranks))
            else:
                dset = _create_dataset(group, entry.path, shape=(0,), maxshape=(None,), chunks=(chunk,))
            datasets[entry.path] = dset
        if table.name == "folds":
            group.attrs.create("mean_acc", np.float64(np.nan))
            group.attrs.create("sd_acc", np.float64(np.nan))

    final = f.create_group("final")
    if n_params >= 0:
        params = datasets["/final/params"] = _create_dataset(final, "/final/params", shape=(n_params,))
        params.attrs.create("n_params", np.int64(n_params))
    datasets["/final/confusion"] = _create_dataset(final, "/final/confusion",
                                                   data=np.zeros((n_classes, n_classes), np.int64))
    for name, dtype in FINAL_ATTRS.items():
        final.attrs.create(name, np.asarray(np.nan if dtype.startswith("float") else -1, dtype))
    _h5.set_str_attr(final.attrs, "extra_json", "{}", FINAL_EXTRA_BYTES)

    committed = _create_dataset(f, "/committed_rows", data=np.zeros(len(COMMITTED), np.int64))
    raw = [n.encode() for n in COMMITTED]
    committed.attrs.create("tables", np.array(raw, dtype=_h5.fixed_str_dtype(16)), dtype=_h5.fixed_str_dtype(16))
    datasets.update({"/committed_rows": committed, "/final": final})
    return datasets
