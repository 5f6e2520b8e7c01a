"""Datasets: strict IDX files in, float32 arrays out, and how a data-parallel epoch is cut into shards.

Datasets
--------
`load_dataset(name, data_dir)` takes a name or a directory:

* ``mnist`` (60,000 train / 10,000 test) and ``fashion-mnist`` (same format), fetched with
  ``python -m cnnpar.data fetch mnist|fashion-mnist``;
* ``mnist-5k``: 5,000 real MNIST digits bundled with the project (4,000 train / 1,000 test, 400 / 100 per
  class; provenance in ``data/README.md``);
* ``auto`` (the default): ``mnist`` when it has been fetched, otherwise ``mnist-5k`` plus a one-line notice
  that `resolve_dataset` returns (it never prints: the trainer prints it from rank 0 only);
* any other value is a directory holding the four IDX files.

A dataset directory holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``; a plain file wins over its ``.gz`` twin).

Search order for a named dataset (the first directory holding any of its files is *the* one; if it lacks a
file, that is an error rather than a silent fall-through to an older copy):

1. ``<data_dir>/<name>/``: the explicit argument (the trainer's ``--data-dir``);
2. ``$CNNPAR_DATA/<name>/``;
3. ``<project>/data/<name>/``: the repository's ``data/`` next to the package (present in a source checkout
   or an editable install; absent when the package was installed from a wheel);
4. ``mnist-5k`` only: ``cnnpar/_mnist5k/`` inside the installed package, where a wheel build may put the
   bundled files as package data;
5. ``fashion-mnist`` only: ``/usr/share/datasets/fashion-mnist/``, where Debian's ``dataset-fashion-mnist``
   package installs it.

Pixels are scaled to float32 in [0, 1] (x / 255; times --input-scale if given) once, at load; images come out as C-contiguous
(N, 1, H, W) float32 (28 x 28 for the named datasets) and labels as int32. Every defect in a file (magic,
truncation, sizes, label range, counts, gzip) is a `UserError` naming the file. Training never downloads.

Sharding (data-parallel steps)
------------------------------
Every rank computes the same permutation of the training set for an epoch (`epoch_permutation`, seeded by
``[seed, epoch]``). With R ranks and k samples per rank the global batch is B = R*k, and step s of the
epoch takes ``perm[s*B : min((s+1)*B, N)]``; there are ceil(N / B) steps per epoch. Each step's batch of b
samples is cut into contiguous slices in rank order, rank r getting ``b // R + (1 if r < b % R else 0)``.
Full steps therefore give every rank exactly k samples; the last, short step gives ranks floor/ceil shares,
and when b < R some ranks get no sample: they contribute a zero gradient but still join the step's
exchange, so no rank is ever left out of a collective. Every sample is used exactly once per epoch.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import UserError, exit_on_user_error

# ----------------------------------------------------------------------------------------------------
# where data lives

N_CLASSES = 10
KNOWN = ("mnist", "fashion-mnist", "mnist-5k")
AUTO = "auto"
FETCH_HINT = "python -m cnnpar.data fetch mnist"

# role -> standard file stem; the .gz twin is accepted everywhere the plain name is
FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

PROJECT_DATA = Path(__file__).resolve().parents[1] / "data"
# A file only this project's data/ holds: a wheel install puts the package in site-packages, whose parent's
# `data` (if any) belongs to someone else.
_PROJECT_DATA_MARKER = "make_mnist5k.py"
PACKAGED_MNIST5K = Path(__file__).resolve().parent / "_mnist5k"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Published MD5s of the gzipped files (the same values torchvision and the datasets' own pages list).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# yann.lecun.com now refuses downloads; Fashion-MNIST's S3 website endpoint is http-only, so it is left
# out of the defaults (pass it with --mirror to use it).
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
}
CHECKSUMS = {"mnist": MNIST_MD5, "fashion-mnist": FASHION_MNIST_MD5}


def project_data_dir() -> Path | None:
    """The repository's data/ directory, or None when the package runs from a wheel install."""
    if (PROJECT_DATA / _PROJECT_DATA_MARKER).is_file():
        return PROJECT_DATA
    return None


def _checked_root(culprit: str, value: str) -> Path:
    root = Path(value).expanduser()
    if not root.exists():
        raise UserError(culprit, f"the data directory {value!r} does not exist; create it or fetch into it "
                                 f"with `python -m cnnpar.data fetch mnist --dir {value}`")
    if not root.is_dir():
        raise UserError(culprit, f"{value!r} is not a directory")
    return root


def data_roots(data_dir: str | None = None) -> list[tuple[str, Path]]:
    """(origin, root) pairs in search order; an explicit but missing root is an error, not a skip."""
    roots = []
    if data_dir:
        roots.append(("--data-dir", _checked_root("--data-dir", data_dir)))
    env_value = os.environ.get("CNNPAR_DATA", "")
    if env_value:
        roots.append(("$CNNPAR_DATA", _checked_root("$CNNPAR_DATA", env_value)))
    project = project_data_dir()
    if project is not None:
        roots.append(("project data/", project))
    return roots


def candidate_dirs(name: str, data_dir: str | None = None) -> list[tuple[str, Path]]:
    """Every directory where the named dataset is looked for, in order, with where each comes from."""
    candidates = [(origin, root / name) for origin, root in data_roots(data_dir)]
    if name == "mnist-5k":
        candidates.append(("installed package", PACKAGED_MNIST5K))
    if name == "fashion-mnist":
        candidates.append(("Debian dataset-fashion-mnist", DEBIAN_FASHION_MNIST))
    return candidates


def _holds_any_idx_file(directory: Path) -> bool:
    return directory.is_dir() and any((directory / stem).is_file() or (directory / f"{stem}.gz").is_file()
                                      for stem in FILE_STEMS.values())


def find_dataset_dir(name: str, data_dir: str | None = None) -> tuple[str, Path] | None:
    """(origin, directory) of the first candidate holding any of the dataset's files, else None."""
    for origin, directory in candidate_dirs(name, data_dir):
        if _holds_any_idx_file(directory):
            return origin, directory
    return None


def _not_found_message(name: str, data_dir: str | None) -> str:
    places = ", ".join(str(d) for _, d in candidate_dirs(name, data_dir))
    if name == "mnist-5k":
        how = ("the package seems installed without its bundled data: install it editable (pip install -e .) "
               "from the repository, or point $CNNPAR_DATA at a copy of the repository's data/")
    elif name == "fashion-mnist":
        how = ("fetch it with `python -m cnnpar.data fetch fashion-mnist` or install Debian's "
               "dataset-fashion-mnist package")
    else:
        how = f"fetch it with `python -m cnnpar.data fetch {name}`"
    return f"{name} not found (looked in {places or 'no data directory'}); {how}"


def resolve_dataset(name: str = AUTO, data_dir: str | None = None) -> tuple[str, str | None]:
    """The dataset `name` stands for (a known name or a directory path) and a notice to show, or None.

    Raises UserError('--dataset', ...) for an unknown name or a dataset that cannot be found.
    """
    resolved, _, notice = _locate(name, data_dir)
    return resolved, notice


def _locate(name: str, data_dir: str | None) -> tuple[str, Path, str | None]:
    name = str(name).strip()
    if not name:
        raise UserError("--dataset", f"is empty; use {AUTO}, {', '.join(KNOWN)} or a directory")
    if name == AUTO:
        found = find_dataset_dir("mnist", data_dir)
        if found is not None:
            return "mnist", found[1], None
        found = find_dataset_dir("mnist-5k", data_dir)
        if found is None:
            raise UserError("--dataset", _not_found_message("mnist-5k", data_dir))
        notice = (f"note: training on the bundled mnist-5k (4,000 train / 1,000 test images); "
                  f"for the full 60,000-image MNIST run `{FETCH_HINT}`")
        return "mnist-5k", found[1], notice
    if name in KNOWN:
        found = find_dataset_dir(name, data_dir)
        if found is None:
            raise UserError("--dataset", _not_found_message(name, data_dir))
        return name, found[1], None
    directory = Path(name).expanduser()
    if directory.is_dir():
        return name, directory, None
    if directory.exists():
        raise UserError(name, "is a file; --dataset takes a dataset name or a directory holding the four "
                              "IDX files")
    raise UserError("--dataset", f"unknown dataset {name!r}: use {AUTO}, {', '.join(KNOWN)}, or a directory "
                                 f"holding the four IDX files ({', '.join(FILE_STEMS.values())}, plain or .gz)")


# ----------------------------------------------------------------------------------------------------
# IDX files

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


# ----------------------------------------------------------------------------------------------------
# loading

@dataclass(frozen=True)
class Dataset:
    name: str  # 'mnist', 'mnist-5k', 'fashion-mnist' or the directory path
    source: str  # directory the files were read from
    train_images: np.ndarray  # float32 (N, 1, H, W), C-contiguous, in [0, 1]
    train_labels: np.ndarray  # int32 (N,)
    test_images: np.ndarray  # float32 (M, 1, H, W)
    test_labels: np.ndarray  # int32 (M,)
    n_classes: int = N_CLASSES


def dataset_file(directory, role: str) -> Path:
    """The file for `role` (a FILE_STEMS key) in `directory`: plain if present, else .gz (which may not exist)."""
    directory = Path(directory)
    plain = directory / FILE_STEMS[role]
    return plain if plain.is_file() else directory / f"{FILE_STEMS[role]}.gz"


def _read_role(directory: Path, role: str) -> tuple[Path, np.ndarray]:
    path = dataset_file(directory, role)
    if not path.exists():
        raise UserError(path, f"missing: a dataset directory needs {FILE_STEMS[role]} (plain or .gz) next to "
                              f"the other three IDX files")
    array = read_idx(path)
    want_images = role.endswith("images")
    if want_images and array.ndim != 3:
        raise UserError(path, "holds labels (magic 0x00000801), expected images (0x00000803); "
                              "are the files swapped?")
    if not want_images and array.ndim != 1:
        raise UserError(path, "holds images (magic 0x00000803), expected labels (0x00000801); "
                              "are the files swapped?")
    if len(array) == 0:
        raise UserError(path, "holds no samples")
    if want_images and 0 in array.shape[1:]:
        raise UserError(path, f"holds images of size {array.shape[1]} x {array.shape[2]}")
    if not want_images and array.max() >= N_CLASSES:
        index = int(np.argmax(array >= N_CLASSES))
        raise UserError(path, f"label {int(array[index])} at index {index} is out of range 0-{N_CLASSES - 1}")
    return path, array


def read_split_uint8(directory) -> dict[str, np.ndarray]:
    """The four arrays of a dataset directory as stored (uint8), checked against each other."""
    directory = Path(directory)
    paths, arrays = {}, {}
    for role in FILE_STEMS:
        paths[role], arrays[role] = _read_role(directory, role)
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images != n_labels:
            raise UserError(paths[f"{split}_labels"], f"holds {n_labels} labels but "
                                                      f"{paths[f'{split}_images'].name} holds {n_images} "
                                                      f"images; both must come from the same dataset")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
        raise UserError(paths["test_images"], f"holds {test_hw[0]} x {test_hw[1]} images but the training set "
                                              f"{train_hw[0]} x {train_hw[1]}; both must come from the same "
                                              f"dataset")
    return arrays


def _scaled(images: np.ndarray, input_scale: float = 1.0) -> np.ndarray:
    scaled = images.astype(np.float32).reshape(images.shape[0], 1, *images.shape[1:])
    # one division by 255 / scale: scale 1 gives the usual [0, 1] bits, scale 255 the raw bytes exactly
    scaled /= np.float32(255 / input_scale)
    return scaled


def load_dataset(name: str = AUTO, data_dir: str | None = None, input_scale: float = 1.0) -> Dataset:
    """The dataset `name` (see the module docstring) with pixels as float32 in [0, input_scale] (default
    [0, 1]); never downloads."""
    resolved, directory, _ = _locate(name, data_dir)
    arrays = read_split_uint8(directory)
    return Dataset(
        name=resolved,
        source=str(directory),
        train_images=_scaled(arrays["train_images"], input_scale),
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=_scaled(arrays["test_images"], input_scale),
        test_labels=arrays["test_labels"].astype(np.int32),
    )


def fold_split(dataset: Dataset, folds: int, fold: int, seed: int) -> Dataset:
    """Fold `fold` of a stratified `folds`-way split of the training set: it becomes the test set, the
    other folds the training set (the original test set is not used). Same on every rank for a seed."""
    if not 2 <= folds <= len(dataset.train_labels):
        raise UserError("--folds", f"must be between 2 and the {len(dataset.train_labels)} training samples, "
                                   f"got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} out of range for {folds} folds")
    shuffled = np.random.default_rng([seed, folds]).permutation(len(dataset.train_labels))
    # stable sort by class keeps the shuffled order within each class; dealing each class round-robin
    # gives every fold the same share of every class, +-1
    by_class = shuffled[np.argsort(dataset.train_labels[shuffled], kind="stable")]
    position_in_class = np.empty(len(by_class), np.int64)
    class_sizes = np.bincount(dataset.train_labels, minlength=dataset.n_classes)
    class_starts = np.concatenate(([0], np.cumsum(class_sizes)[:-1]))
    position_in_class[by_class] = np.arange(len(by_class)) - np.repeat(class_starts, class_sizes)
    held_out = position_in_class % folds == fold
    return replace(
        dataset,
        name=f"{dataset.name} fold {fold + 1}/{folds}",
        train_images=np.ascontiguousarray(dataset.train_images[~held_out]),
        train_labels=dataset.train_labels[~held_out],
        test_images=np.ascontiguousarray(dataset.train_images[held_out]),
        test_labels=dataset.train_labels[held_out],
    )


# ----------------------------------------------------------------------------------------------------
# sharding

def _check_shard_args(n_samples: int, ranks: int, samples_per_rank: int) -> None:
    if n_samples < 1 or ranks < 1 or samples_per_rank < 1:
        raise ValueError(f"need n_samples, ranks, samples_per_rank >= 1, got {n_samples}, {ranks}, "
                         f"{samples_per_rank}")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's sample order (int64), identical on every rank and in every process for (seed, epoch)."""
    if seed < 0 or epoch < 0 or n < 0:
        raise ValueError(f"seed, epoch and n must not be negative, got {seed}, {epoch}, {n}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n_samples: int, ranks: int, samples_per_rank: int) -> int:
    """ceil(n_samples / (ranks * samples_per_rank)): the last step may be short."""
    _check_shard_args(n_samples, ranks, samples_per_rank)
    return -(-n_samples // (ranks * samples_per_rank))


def global_batch_size(n_samples: int, ranks: int, samples_per_rank: int, step: int) -> int:
    """Samples in step `step` of an epoch over all ranks: ranks*k, less on the last step."""
    _check_shard_args(n_samples, ranks, samples_per_rank)
    batch = ranks * samples_per_rank
    if not 0 <= step < steps_per_epoch(n_samples, ranks, samples_per_rank):
        raise ValueError(f"step {step} out of range for an epoch of {n_samples} samples in batches of {batch}")
    return min(batch, n_samples - step * batch)


def step_slice(n_samples: int, ranks: int, samples_per_rank: int, step: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s samples in the epoch permutation at `step`; may be empty on a short step."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range for {ranks} ranks")
    size = global_batch_size(n_samples, ranks, samples_per_rank, step)
    base, extra = divmod(size, ranks)
    start = step * ranks * samples_per_rank + rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_slices(n_samples: int, ranks: int, samples_per_rank: int, rank: int) -> tuple:
    """step_slice for every step of an epoch at once: (starts, stops, global batch sizes), int64 arrays of
    steps_per_epoch entries. The trainer computes them once instead of on every step."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range for {ranks} ranks")
    n_steps = steps_per_epoch(n_samples, ranks, samples_per_rank)
    batch = ranks * samples_per_rank
    steps = np.arange(n_steps, dtype=np.int64)
    sizes = np.minimum(batch, n_samples - steps * batch)
    base, extra = np.divmod(sizes, ranks)
    starts = steps * batch + rank * base + np.minimum(rank, extra)
    return starts, starts + base + (rank < extra), sizes


# ----------------------------------------------------------------------------------------------------
# fetching

def default_fetch_root() -> Path:
    env_value = os.environ.get("CNNPAR_DATA", "")
    if env_value:
        return Path(env_value).expanduser()
    project = project_data_dir()
    if project is None:
        raise UserError("--dir", "no default data directory: the package is not running from the repository; "
                                 "pass --dir DIR or set $CNNPAR_DATA")
    return project


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_mirror(url: str, explicit: bool) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("https", "http") or (scheme == "http" and not explicit):
        raise UserError("--mirror", f"{url!r}: only https:// mirrors (or http:// ones given explicitly with "
                                    f"--mirror) are used")
    return url if url.endswith("/") else url + "/"


def _opener():
    import urllib.error
    import urllib.request

    class NoDowngrade(urllib.request.HTTPRedirectHandler):
        # an https mirror must not be able to send us to plain http
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if req.full_url.lower().startswith("https://") and not newurl.lower().startswith("https://"):
                raise urllib.error.URLError(f"refused redirect from https to {newurl}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(NoDowngrade)


def _download(opener, url: str, target: Path, expected_md5: str, timeout: float) -> int:
    """Download `url` to `target` atomically if its MD5 matches; returns bytes written. Raises on failure,
    leaving nothing behind."""
    import urllib.request

    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest, size = hashlib.md5(usedforsecurity=False), 0
        request = urllib.request.Request(url, headers={"User-Agent": "cnnpar-fetch"})
        with os.fdopen(fd, "wb") as out_file, opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out_file.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            if declared is not None and int(declared) != size:
                raise OSError(f"transfer cut short: {size} of {declared} bytes")
            out_file.flush()
            os.fsync(out_file.fileno())
        if digest.hexdigest() != expected_md5:
            raise _WrongFile(_wrong_file_reason(temp_name, digest.hexdigest(), expected_md5))
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
        return size
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


class _WrongFile(OSError):
    """The mirror answered, with something other than the published file: trying again will not help."""


def _wrong_file_reason(path: str, md5: str, expected_md5: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":
        return f"a gzip file with MD5 {md5}, expected {expected_md5}: not the published file"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML page, not a gzip file (the URL is not a mirror of these files)"
    return f"not a gzip file (it starts with {head[:8]!r})"


def fetch(name: str, root=None, mirrors: Sequence[str] | None = None, checksums: Mapping[str, str] | None = None,
          timeout: float = 60.0, report: Callable[[str], None] | None = None) -> Path:
    """Download dataset `name` into `<root>/<name>/`, verifying each file's MD5; returns that directory.

    Files already present with the right MD5 are kept. Each file is written atomically; a mismatch or an
    interrupted transfer leaves nothing behind. `mirrors` (explicit, so http:// is allowed) replace the
    default https ones; `checksums` (file name -> MD5) replace the published ones (tests serve their own
    files). `report` receives one line per file.
    """
    if name not in CHECKSUMS:
        raise UserError(name, f"unknown dataset to fetch; choose {' or '.join(CHECKSUMS)} (mnist-5k is bundled)")
    explicit = mirrors is not None
    mirror_urls = [_check_mirror(url, explicit) for url in (mirrors if explicit else MIRRORS[name])]
    if not mirror_urls:
        raise UserError("--mirror", "no mirror to fetch from")
    expected = dict(checksums if checksums is not None else CHECKSUMS[name])
    root = Path(root).expanduser() if root is not None else default_fetch_root()
    if any(Path(file_name).name != file_name or not file_name.endswith(".gz") for file_name in expected):
        raise ValueError(f"checksum keys are bare .gz file names, got {sorted(expected)}")
    target_dir = root / name
    created = [d for d in (target_dir, *target_dir.parents) if not d.exists()]  # deepest first
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError("--dir", f"cannot create {target_dir}: {err.strerror or err}") from None
    try:
        if not os.access(target_dir, os.W_OK | os.X_OK):
            raise UserError("--dir", f"{target_dir} is not writable")
        _fetch_files(target_dir, expected, mirror_urls, timeout, report or (lambda line: None))
    except BaseException:
        # a failed first fetch leaves the file system as it found it: no empty folders either
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return target_dir


def _fetch_files(target_dir: Path, expected: Mapping[str, str], mirror_urls: list[str], timeout: float,
                 say: Callable[[str], None]) -> None:
    import http.client
    import urllib.error

    opener = _opener()
    for file_name, md5 in expected.items():
        target = target_dir / file_name
        if target.is_file() and _md5_of(target) == md5:
            say(f"{target}: already present, MD5 verified")
            continue
        failures, transient = [], False
        for mirror in mirror_urls:
            url = mirror + file_name
            try:
                size = _download(opener, url, target, md5, timeout)
            except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as err:
                failures.append(f"{url} ({_reason(err)})")
                transient = transient or not isinstance(err, _WrongFile)
                continue
            say(f"{target}: {size:,} bytes from {url}, MD5 verified")
            break
        else:
            advice = "try again later or pass another --mirror URL" if transient else "pass another --mirror URL"
            raise UserError(target, f"could not be downloaded: {'; '.join(failures)}; {advice}")


def _reason(err: BaseException) -> str:
    import urllib.error

    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


# ----------------------------------------------------------------------------------------------------
# command line

def _per_class_text(train_labels: np.ndarray, test_labels: np.ndarray) -> str:
    def spread(labels):
        counts = np.bincount(labels, minlength=N_CLASSES)
        low, high = int(counts.min()), int(counts.max())
        return f"{low:,}" if low == high else f"{low:,}-{high:,}"

    return f"{spread(train_labels)} / {spread(test_labels)}"


def list_datasets(data_dir: str | None = None) -> tuple[list[dict], list[UserError]]:
    """One row per known dataset: found or not, where, counts; plus the errors met reading them."""
    rows, errors = [], []
    for name in KNOWN:
        row = {"name": name, "found": False, "source": "", "origin": "", "train": None, "test": None,
               "per_class": ""}
        found = find_dataset_dir(name, data_dir)
        if found is not None:
            row["origin"], directory = found[0], found[1]
            row["source"] = str(directory)
            try:
                arrays = read_split_uint8(directory)
            except UserError as err:
                errors.append(err)
                row["per_class"] = "unreadable (see below)"
            else:
                row["found"] = True
                row["train"], row["test"] = len(arrays["train_labels"]), len(arrays["test_labels"])
                row["per_class"] = _per_class_text(arrays["train_labels"], arrays["test_labels"])
        rows.append(row)
    return rows, errors


def _print_list(data_dir: str | None) -> int:
    rows, errors = list_datasets(data_dir)
    header = ("dataset", "found", "train", "test", "per class train / test", "source")
    table = [header]
    for row in rows:
        if row["found"]:
            table.append((row["name"], "yes", f"{row['train']:,}", f"{row['test']:,}", row["per_class"],
                          f"{row['source']} ({row['origin']})"))
        elif row["source"]:
            table.append((row["name"], "BROKEN", "-", "-", row["per_class"], row["source"]))
        else:
            hint = ("bundled; missing from this install" if row["name"] == "mnist-5k"
                    else f"python -m cnnpar.data fetch {row['name']}")
            table.append((row["name"], "no", "-", "-", "-", f"({hint})"))
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        cells = [cell.rjust(w) if i in (2, 3) else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]).rstrip())
    print()
    places = [f"{root}/<name> ({origin})" for origin, root in data_roots(data_dir)]
    places += [f"mnist-5k also {PACKAGED_MNIST5K} (installed package)",
               f"fashion-mnist also {DEBIAN_FASHION_MNIST} (Debian dataset-fashion-mnist)"]
    print("search order: " + "; ".join(places))
    try:
        resolved, notice = resolve_dataset(AUTO, data_dir)
        print(f"default (--dataset auto): {resolved}" + ("" if notice is None else
                                                         f" (full MNIST not fetched: {FETCH_HINT})"))
    except UserError as err:
        errors.append(err)
    for err in errors:
        print(err.line(), file=sys.stderr)
    return 2 if errors else 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one `cnnpar: error:` line with exit 2, like every other user error."""

    def error(self, message):
        raise UserError("command line", message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(allow_abbrev=False, prog="python -m cnnpar.data",
                            description="List the datasets cnnpar can find, check one as the trainer loads it, "
                                        "or fetch MNIST / Fashion-MNIST (training itself never downloads).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,check,fetch}")
    listing = commands.add_parser("list", allow_abbrev=False,
                                  help="every dataset: found where, samples train/test, per class")
    listing.add_argument("--data-dir", default=None, help="look here first (as the trainer's --data-dir)")
    checking = commands.add_parser("check", allow_abbrev=False,
                                   help="load one dataset exactly as the trainer does and report it")
    checking.add_argument("dataset", nargs="?", default=AUTO,
                          help=f"{AUTO} (default), {', '.join(KNOWN)}, or a directory holding the four IDX files")
    checking.add_argument("--data-dir", default=None, help="look here first (as the trainer's --data-dir)")
    fetching = commands.add_parser("fetch", allow_abbrev=False,
                                   help="download a dataset's four IDX files and verify their MD5s")
    fetching.add_argument("name", help="mnist or fashion-mnist")
    fetching.add_argument("--dir", default=None,
                          help="data root; files go to DIR/NAME/ (default: $CNNPAR_DATA, else the project's data/)")
    fetching.add_argument("--mirror", action="append", default=None, metavar="URL",
                          help="base URL to fetch from instead of the defaults; repeat for several, tried in "
                               "order (http:// is accepted only here)")
    fetching.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation (default 60)")
    return parser


def _print_check(name: str, data_dir: str | None) -> int:
    try:
        dataset = load_dataset(name, data_dir)
    except UserError as err:  # the trainer's flag is this command's positional argument
        if err.culprit != "--dataset":
            raise
        raise UserError("dataset", err.message) from None
    height, width = dataset.train_images.shape[2:]
    print(f"{dataset.name}: {dataset.source}")
    print(f"  train {len(dataset.train_labels):,} / test {len(dataset.test_labels):,} images of {height} x {width}, "
          f"per class {_per_class_text(dataset.train_labels, dataset.test_labels)}; every file checked")
    return 0


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _print_list(args.data_dir)
    if args.command == "check":
        return _print_check(args.dataset, args.data_dir)
    if not args.timeout > 0:
        raise UserError("--timeout", f"must be positive, got {args.timeout}")
    target_dir = fetch(args.name, args.dir, args.mirror, timeout=args.timeout, report=print)
    print(f"{args.name} is ready in {target_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
