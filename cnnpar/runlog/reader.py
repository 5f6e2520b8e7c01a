"""Reads run logs back: `open_log(path)` loads a whole log, checked against `schema.SCHEMA`, and turns
every problem with the file into one `UserError` naming it.

Logs of format 2 are plain HDF5 files that are closed between the writer's flushes, so they open
plainly; a `running` log whose writer no longer holds its lock reads as `incomplete`. Logs of format
1 were written in SWMR mode; one whose writer was killed still carries HDF5's "open for writing"
flag and is opened as an SWMR reader.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from ..errors import UserError
from . import _h5
from .lock import writer_alive
from .schema import (COMMITTED, COMMITTED_V1, FINAL_ATTRS, FORMAT, FORMAT_VERSION, OPTIONAL_GROUPS, STATUSES,
                     TABLE_RECORDS, TABLES, columns)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MID_FLUSH_RETRIES = 40        # a live writer's flush takes milliseconds: retry a read that met one ...
MID_FLUSH_RETRY_S = 0.05      # ... this often
SWMR_READ_ATTEMPTS = 16  # HDF5's default (100, with exponential back-off) makes a damaged file hang for ages


class RunLog:
    """A read-only, fully loaded view of a run log (the file is closed once `open_log` returns)."""

    path: str
    format_version: int
    created: str
    status: str
    status_message: str
    cnnpar_version: str
    ranks: int
    world_ranks: int
    n_classes: int
    resume_count: int
    config_json: str
    config: dict
    env: dict
    layout: list
    steps: dict
    epochs: dict
    audit: dict | None
    noise: dict | None          # --noise-scale: per-window estimates
    noise_epochs: dict | None   # --noise-scale: per-epoch estimates
    consistency: dict
    folds: dict | None
    has_folds: bool
    final: dict | None
    committed: dict
    writer_alive: bool | None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def param_views(self) -> dict:
        """Each parameter of the final params as an array of its own shape (views into one array)."""
        if self.final is None:
            raise ValueError(f"{self.path}: the log has no final params (status {self.status})")
        flat = self.final["params"]
        return {name: flat[offset:offset + size].reshape(shape) for name, shape, offset, size in self.layout}

    def flat_columns(self, table: str = "steps") -> dict:
        """One table (`steps`, `epochs`, ..., or `final`: one row of the result's figures) as 1-D columns in
        schema order; a per-rank column `x` of shape (rows, R) becomes `x_0` ... `x_{R-1}`. UserError when
        the log has no such table."""
        if table == "final":
            if self.final is None:
                raise UserError(self.path, f"has no final result yet (status {self.status})")
            return {name: np.asarray([self.final["attrs"][name]]) for name in FINAL_ATTRS}
        if table not in TABLES:
            raise UserError(table, f"no such table; a run log has {', '.join(TABLES)} and final")
        rows = getattr(self, table)
        if rows is None:
            made_by = OPTIONAL_GROUPS.get(table, "")
            raise UserError(self.path, f"has no {table} table"
                            + (f" (written with --{made_by.replace('_', '-')})" if made_by else ""))
        out = {}
        for entry in columns(table):
            values = rows[entry.name]
            if values.ndim == 2:
                out.update((f"{entry.name}_{rank}", values[:, rank]) for rank in range(values.shape[1]))
            else:
                out[entry.name] = values
        return out

    def frame(self, table: str = "steps"):
        """One table as a pandas DataFrame (columns as `flat_columns` gives them); pandas is the `frames`
        extra, and its absence is a UserError saying how to install it."""
        try:
            import pandas
        except ImportError:
            raise UserError("pandas", "RunLog.frame needs pandas: pip install 'cnnpar[frames]' (or use "
                                      "`cnnpar runlog export --csv DIR`, which does not)") from None
        return pandas.DataFrame(self.flat_columns(table))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self) -> str:
        return (f"RunLog({self.path!r}, status={self.status!r}, ranks={self.ranks}, "
                f"steps={len(self.steps['step'])}, epochs={len(self.epochs['epoch'])})")


class _Corrupt(Exception):
    """The file is HDF5 but its content does not hold together as a cnnpar run log."""


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
    for attempt in range(MID_FLUSH_RETRIES + 1):
        try:
            return _open_once(path)
        except UserError:
            # A live writer may be in the middle of a flush: the file is briefly inconsistent.
            if attempt == MID_FLUSH_RETRIES or not writer_alive(path):
                raise
            time.sleep(MID_FLUSH_RETRY_S)
    raise AssertionError("unreachable")


def _open_once(path: str) -> RunLog:
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
        reason = str(err) if isinstance(err, _Corrupt) else f"{type(err).__name__}: {_h5.h5_reason(err)}"
        raise UserError(path, f"corrupt or truncated run log ({reason})") from None
    finally:
        try:
            f.close()
        except Exception:
            pass


def _open_h5(path: str):
    """Open read-only: plainly, or (a format-1 log of a live run, or of a writer that was killed) as an
    SWMR reader."""
    import h5py

    try:
        return h5py.File(path, "r", locking=False)
    except Exception as err:  # noqa: BLE001
        reason = _h5.h5_reason(err)
    if "already open for write" not in reason:
        raise UserError(path, f"corrupt or truncated HDF5 file ({reason})")
    try:
        return _open_swmr_reader(path)
    except Exception as err:  # noqa: BLE001
        swmr_reason = _h5.h5_reason(err)
    if "superblock" in swmr_reason or "SWMR" in swmr_reason:
        raise UserError(path, "HDF5 file left open by a writer that did not finish, and not written "
                              "in SWMR mode, so unreadable (h5clear -s may recover it)")
    raise UserError(path, f"corrupt or truncated HDF5 file ({swmr_reason})")


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
    return _h5.decode(attrs[name])


def _check_dataset(dset, entry, version: int) -> None:
    """A dataset must have the schema's dtype and rank (format 2 also its units and description)."""
    expected = np.dtype(entry.dtype) if not entry.dtype.startswith("str") else None
    if expected is not None and dset.dtype != expected and not (version == 1 and entry.path == "/consistency/ok"):
        raise _Corrupt(f"{entry.path} is {dset.dtype}, the schema says {entry.dtype}")
    if dset.ndim != entry.ndim:
        raise _Corrupt(f"{entry.path} has shape {dset.shape}, the schema says {entry.shape}")
    if version >= 2 and ("units" not in dset.attrs or "description" not in dset.attrs):
        raise _Corrupt(f"{entry.path} has no units/description attributes")


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
    log.writer_alive = writer_alive(path) if log.status == "running" else False
    if log.status == "running" and log.writer_alive is False and version >= 2:
        log.status = "incomplete"
        log.status_message = ("no writer holds it and it was never closed: the job was killed, its node "
                              "failed, or its disk filled up")
    log.cnnpar_version = str(_attr(f.attrs, "cnnpar_version"))
    log.ranks = _int_attr(f.attrs, "ranks", 1)
    log.world_ranks = int(_attr(f.attrs, "world_ranks", required=False, default=log.ranks))
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
            shape = _h5.shape_from_text(_h5.decode(shape_text))
        except ValueError:
            raise _Corrupt(f"/layout/shapes holds {shape_text!r}") from None
        if int(np.prod(shape, dtype=np.int64)) != int(size) or offset < 0 or size < 0:
            raise _Corrupt(f"/layout row {_h5.decode(name)!r} is inconsistent")
        log.layout.append((_h5.decode(name), shape, int(offset), int(size)))

    committed = _read(f["committed_rows"], file_size)
    names = _committed_names(f["committed_rows"])
    if committed.shape != (len(names),) or committed.dtype.kind not in "iu" or np.any(committed < 0):
        raise _Corrupt("/committed_rows is malformed")
    counts = dict.fromkeys(COMMITTED, 0)
    counts.update(zip(names, (int(c) for c in committed)))
    log.committed = counts

    def table(name):
        group = f[name]
        out = {}
        for entry in columns(name):
            dset = group[entry.name]
            _check_dataset(dset, entry, version)
            if dset.shape[0] < counts[name] or (entry.per_rank and dset.shape[1:] != (log.ranks,)):
                raise _Corrupt(f"{entry.path} has shape {dset.shape}, expected {counts[name]} rows")
            out[entry.name] = _read(dset, file_size, counts[name])
        return out

    for record in TABLE_RECORDS:  # a table every log has is read even when absent (and then called corrupt)
        setattr(log, record.name, table(record.name) if record.present == "always" or record.name in f else None)
    log.consistency["ok"] = log.consistency["ok"].astype(bool)
    log.has_folds = log.folds is not None
    if log.has_folds and counts["folds"]:
        log.folds["mean_acc"] = float(_attr(f["folds"].attrs, "mean_acc"))
        log.folds["sd_acc"] = float(_attr(f["folds"].attrs, "sd_acc"))
    else:
        log.folds = None  # written with /final: no rows yet reads as none

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


def _committed_names(dataset) -> tuple:
    """The tables /committed_rows counts, in order: its `tables` attribute (format-1 logs have none)."""
    raw = dataset.attrs.get("tables")
    if raw is None:
        return COMMITTED_V1
    names = tuple(_h5.decode(v) for v in np.asarray(raw).tolist())
    if names[-1:] != ("final",) or not set(names) <= set(COMMITTED):
        raise _Corrupt(f"/committed_rows names unknown tables {names}")
    return names


def truncation(log: RunLog, step_count, epoch_count) -> dict:
    """Rows of each table to keep when truncating to `step_count` steps / `epoch_count` epochs."""
    keep = {}
    for record in TABLE_RECORDS:
        rows = getattr(log, record.name)
        if record.on_resume == "none" or rows is None:
            keep[record.name] = 0
        elif step_count is None or (record.name == "epochs" and epoch_count is not None):
            keep[record.name] = len(rows["step"])
        else:
            done = rows["step"] < int(step_count) if record.on_resume == "before" else rows["step"] <= int(step_count)
            keep[record.name] = int(np.count_nonzero(done))
    if epoch_count is not None:
        keep["epochs"] = min(int(epoch_count), keep["epochs"])
    return keep


def summarize(log: RunLog) -> str:
    """One line about a log, for scripts."""
    acc = log.final["attrs"]["test_acc"] if log.final else float("nan")
    return (f"{log.path}: {log.status}, {log.config.get('mode', '?')} x {log.ranks} ranks, "
            f"{len(log.steps['step'])} steps, test acc {acc * 100 if not math.isnan(acc) else float('nan'):.1f}%")


