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

Pixels are scaled to float32 in [0, 1] (x / 255; times --input-scale if given) once, at load; images come out
as C-contiguous (N, 1, H, W) float32 (28 x 28 for the named datasets) and labels as int32. Every defect in a
file (magic, truncation, sizes, label range, counts, gzip) is a `UserError` naming the file. Training never
downloads.

Sharding (data-parallel steps)
------------------------------
Every rank computes the same permutation of the training set for an epoch (`epoch_permutation`, seeded by
``[seed, epoch]``). With R ranks and k samples per rank the global batch is B = R*k, and step s of the
epoch takes ``perm[s*B : min((s+1)*B, N)]``; there are ceil(N / B) steps per epoch. Each step's batch of b
samples is cut into contiguous slices in rank order, rank r getting ``b // R + (1 if r < b % R else 0)``.
Full steps therefore give every rank exactly k samples; the last, short step gives ranks floor/ceil shares,
and when b < R some ranks get no sample: they contribute a zero gradient but still join the step's
exchange, so no rank is ever left out of a collective. Every sample is used exactly once per epoch.

The package, one module a concern (imports point one way: __main__ -> download, load -> locate -> idx; shard
on its own):

    locate    where a named dataset is found, and what `auto` means
    idx       the IDX format, and the four files of a dataset directory
    load      Dataset, load_dataset, fold_split
    shard     epoch_permutation, steps_per_epoch, rank_slices: the trainer's hot path
    download  fetch: the published MD5s and the mirrors
    __main__  the command line, `python -m cnnpar.data`
"""

from .download import CHECKSUMS, FASHION_MNIST_MD5, MIRRORS, MNIST_MD5, default_fetch_root, fetch
from .idx import FILE_STEMS, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx, write_idx
from .load import N_CLASSES, Dataset, dataset_file, fold_split, load_dataset, read_split_uint8
from .locate import (AUTO, DEBIAN_FASHION_MNIST, FETCH_HINT, KNOWN, PACKAGED_MNIST5K, PROJECT_DATA, candidate_dirs,
                     data_roots, find_dataset_dir, project_data_dir, resolve_dataset)
from .shard import epoch_permutation, rank_slices, steps_per_epoch

__all__ = ["AUTO", "CHECKSUMS", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_MD5", "FETCH_HINT", "FILE_STEMS",
           "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "KNOWN", "MIRRORS", "MNIST_MD5", "N_CLASSES", "PACKAGED_MNIST5K",
           "PROJECT_DATA", "Dataset", "candidate_dirs", "data_roots", "dataset_file", "default_fetch_root",
           "epoch_permutation", "fetch", "find_dataset_dir", "fold_split", "load_dataset", "main",
           "project_data_dir", "rank_slices", "read_idx", "read_split_uint8", "resolve_dataset", "steps_per_epoch",
           "write_idx"]


def main(argv=None) -> int:
    """The command line (`python -m cnnpar.data`, `cnnpar data`), loaded only when asked for."""
    from .__main__ import main as command_line

    return command_line(argv)
