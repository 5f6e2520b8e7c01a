"""Small HDF5 helpers shared by the writer and the reader: fixed-length strings, plain attributes,
and HDF5 error messages cut down to their cause."""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any

import numpy as np


def utc_now() -> str:
    return utc_stamp(datetime.datetime.now(datetime.timezone.utc))


def utc_stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fixed_str_dtype(nbytes: int):
    import h5py

    return h5py.string_dtype("utf-8", max(1, int(nbytes)))


def cut_utf8(text: str, nbytes: int) -> bytes:
    raw = str(text).encode("utf-8")
    if len(raw) <= nbytes:
        return raw
    return raw[: nbytes - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def fixed_str(text: str, nbytes: int):
    return np.array(cut_utf8(text, nbytes), dtype=fixed_str_dtype(nbytes))


def decode(value) -> Any:
    """An attribute or dataset value as plain Python: bytes -> str, numpy scalars -> Python scalars."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [decode(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_default(value):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def set_str_attr(attrs, name: str, text: str, nbytes: int | None = None) -> None:
    raw = str(text).encode("utf-8") if nbytes is None else cut_utf8(text, nbytes)
    dtype = fixed_str_dtype(nbytes or len(raw))
    attrs.create(name, np.array(raw, dtype=dtype), dtype=dtype)


def set_plain_attr(attrs, name: str, value) -> None:
    """One config/env value as an h5ls-friendly attribute (None is omitted; bools as uint8, because
    HDF5 1.10 tools misread the enum h5py makes of a bool; nested values as JSON)."""
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)):
        attrs.create(name, np.uint8(bool(value)))
    elif isinstance(value, (int, np.integer)):
        attrs.create(name, np.int64(value))
    elif isinstance(value, (float, np.floating)):
        attrs.create(name, np.float64(value))
    elif isinstance(value, str):
        set_str_attr(attrs, name, value)
    elif isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        raw = [v.encode("utf-8") for v in value]
        width = max(1, max(len(r) for r in raw))
        attrs.create(name, np.array(raw, dtype=fixed_str_dtype(width)), dtype=fixed_str_dtype(width))
    elif (isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
          and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)):
        attrs.create(name, np.asarray(value))
    else:
        set_str_attr(attrs, name, json.dumps(value, sort_keys=True, default=json_default))


def shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def shape_from_text(text: str) -> tuple:
    return tuple(int(d) for d in text.split("x")) if text else ()


def h5_reason(err: BaseException) -> str:
    """HDF5's long error text cut down to its cause, e.g. 'No such file or directory'."""
    text = str(err).strip()
    for prefix in ("Unable to synchronously open file (", "Unable to open file (", "Unable to create file ("):
        if prefix in text:
            text = text.split(prefix, 1)[1].rstrip(")")
    if "errno" in text and "error message" in text:
        text = text.split("error message = ", 1)[-1].split("'", 1)[0].strip(" '\"")
    return " ".join(text.split())[:200] or type(err).__name__


def write_failure_cause(err: BaseException) -> str:
    """What made a write fail, for one line: the OS's reason when there is one (`no space left on
    device`), else HDF5's."""
    number = getattr(err, "errno", None)
    if not isinstance(number, int):
        found = re.search(r"errno\s*=\s*(\d+)", str(err))
        number = int(found.group(1)) if found else None
    if number:
        text = os.strerror(number)
    else:
        text = h5_reason(err)
    return text[:1].lower() + text[1:]
