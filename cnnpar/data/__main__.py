"""`python -m cnnpar.data list | check [DATASET] | fetch NAME`: which datasets cnnpar finds, one loaded as
the trainer loads it, or a download."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..errors import UserError, exit_on_user_error
from .download import fetch
from .load import N_CLASSES, load_dataset, read_split_uint8
from .locate import (AUTO, DEBIAN_FASHION_MNIST, FETCH_HINT, KNOWN, PACKAGED_MNIST5K, data_roots, find_dataset_dir,
                     resolve_dataset)


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
