"""Loading: a located dataset's four IDX files, checked against each other, as float32 images in [0, 1] and
int32 labels; and the stratified k-fold split of a training set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from .idx import FILE_STEMS, read_idx
from .locate import AUTO, _locate

N_CLASSES = 10



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
    """The dataset `name` (see the package docstring) with pixels as float32 in [0, input_scale] (default
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
