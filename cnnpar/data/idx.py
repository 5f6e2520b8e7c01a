"""The IDX format: strict reading and atomic writing of uint8 label and image files, plain or gzipped, and
the four standard files a dataset directory holds."""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError

# role -> standard file stem; the .gz twin is accepted everywhere the plain name is
FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_GZIP_MAGIC = b"\x1f\x8b"


def _read_raw(path: Path) -> bytes:
    if not path.exists():
        raise UserError(path, "no such file")
    if path.is_dir():
        raise UserError(path, "is a directory, expected an IDX file")
    try:
        if path.name.endswith(".gz"):
            with open(path, "rb") as raw_file:
                if raw_file.read(2) != _GZIP_MAGIC:
                    raise UserError(path, "is not gzip data although its name ends in .gz; gunzip-ed files "
                                          "must lose the .gz suffix (or fetch the file again)")
            with gzip.open(path, "rb") as unzipped:
                return unzipped.read()
        return path.read_bytes()
    except PermissionError:
        raise UserError(path, "cannot be read: permission denied") from None
    except EOFError:
        raise UserError(path, "the gzip stream ends early (an interrupted download?); fetch it again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise UserError(path, f"corrupt gzip data ({err}); fetch it again") from None
    except OSError as err:
        raise UserError(path, f"cannot be read: {err.strerror or err}") from None


def read_idx(path) -> np.ndarray:
    """A uint8 IDX file (labels 0x00000801 or images 0x00000803, plain or .gz) as an array of its dims.

    Strict: the magic, the header and the payload length must agree exactly; anything else raises
    UserError(path, ...).
    """
    path = Path(path)
    raw = _read_raw(path)
    if not raw:
        raise UserError(path, "is empty (0 bytes); fetch or regenerate it")
    if len(raw) < 4:
        raise UserError(path, f"is truncated: {len(raw)} bytes, shorter than an IDX header")
    if raw[:2] == _GZIP_MAGIC and not path.name.endswith(".gz"):
        raise UserError(path, "is gzip-compressed but its name lacks .gz: rename it to "
                              f"{path.name}.gz or gunzip it")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
        raise UserError(path, f"not an IDX file of uint8 labels or images: magic 0x{magic:08x}, expected "
                              f"0x{IDX_LABELS_MAGIC:08x} (labels) or 0x{IDX_IMAGES_MAGIC:08x} (images)")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise UserError(path, f"is truncated inside its header: {len(raw)} bytes, the header alone needs "
                              f"{header_size}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = math.prod(dims)
    payload = len(raw) - header_size
    shape_text = " x ".join(str(d) for d in dims)
    if payload < expected:
        raise UserError(path, f"is truncated: the header promises {shape_text} = {expected} bytes of data, "
                              f"the file holds {payload}; fetch or regenerate it")
    if payload > expected:
        raise UserError(path, f"has {payload - expected} bytes beyond the {shape_text} = {expected} its header "
                              f"describes; the header and the data disagree")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header_size).reshape(dims)


def write_idx(path, array) -> None:
    """Write a uint8 array of 1 dim (labels) or 3 dims (images) as IDX, gzipped if `path` ends in .gz.

    Atomic: written to a temporary file in the same directory, then renamed over `path`. Gzip output is
    reproducible (mtime 0, the final file name in the header).
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"IDX files here hold uint8, got {array.dtype}")
    if array.ndim not in (1, 3):
        raise ValueError(f"IDX arrays here have 1 dim (labels) or 3 (images), got shape {array.shape}")
    if any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX dimensions must fit in 32 bits, got shape {array.shape}")
    path = Path(path)
    magic = IDX_LABELS_MAGIC if array.ndim == 1 else IDX_IMAGES_MAGIC
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    payload = np.ascontiguousarray(array).tobytes()

    def write(out_file) -> None:
        if path.name.endswith(".gz"):
            # the file name in the gzip header is the final one, not the temporary one
            with gzip.GzipFile(filename=path.name, mode="wb", fileobj=out_file, compresslevel=9, mtime=0) as zipped:
                zipped.write(header)
                zipped.write(payload)
        else:
            out_file.write(header)
            out_file.write(payload)

    _write_atomically(path, write)


def _write_atomically(path: Path, write: Callable) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise UserError(directory, "no such directory")
    try:
        fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".part")
    except OSError as err:
        raise UserError(directory, f"cannot write here: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as out_file:
            write(out_file)
            out_file.flush()
            os.fsync(out_file.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes 0600; data files are for everyone who may read the dir
        os.replace(temp_name, path)
    except OSError as err:
        raise UserError(path, f"cannot write: {err.strerror or err}") from None
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
