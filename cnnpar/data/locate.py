"""Where datasets live: the search order for a named dataset (the package docstring gives it), `auto`,
and a directory given as a dataset."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .idx import FILE_STEMS

KNOWN = ("mnist", "fashion-mnist", "mnist-5k")
AUTO = "auto"
FETCH_HINT = "python -m cnnpar.data fetch mnist"

PROJECT_DATA = Path(__file__).resolve().parents[2] / "data"
# A file only this project's data/ holds: a wheel install puts the package in site-packages, whose parent's
# `data` (if any) belongs to someone else.
_PROJECT_DATA_MARKER = "make_mnist5k.py"
PACKAGED_MNIST5K = Path(__file__).resolve().parents[1] / "_mnist5k"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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
