#!/usr/bin/env python3
"""The mechanism study's runs, resumably: the fit setting with 8 seeds, the collapse law, the threshold's observed
critical N per learning rate, and the climb search over axes the map never had.

    cnnpar study --out runs/predict --batches fit8,collapse,threshold   # map-style logs under OUT/map
    cnnpar study --out runs/predict --batches climb-lr                  # A(1, lr) logs under OUT/climb
    cnnpar study --out runs/predict --dry-run

Every run is one process (N ranks as 1 rank x N samples per rank, bit for bit the same training), run by
the map's worker pool (`--jobs` at once). Batches `fit8`, `collapse` and `threshold` are ordinary map
points (OUT/map/one-process/, read by `cnnpar report OUT/map`); the climb's runs set flags the map does not
have (--input-scale, --arch, --epochs 3, --momentum) and go to OUT/climb/, read by cnnpar.analysis.climb.
A point whose log is complete or diverged is skipped; anything else is moved aside and run again.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.experiments.map_grid import MapPoint, Part

SEEDS8 = tuple(range(1, 9))
RANKS = tuple(range(1, 13))
FIT_LR = "0.178"
# the learning rates whose observed critical N the predictor is tested against (mnist-5k, held out) and
# calibrated on (fashion-mnist)
THRESHOLD_LRS = {"mnist-5k": ("0.178", "0.237", "0.316", "0.422", "0.562"), "fashion-mnist": (FIT_LR,)}
COLLAPSE_LRS = {"mnist-5k": ("0.178",), "fashion-mnist": ("0.178",)}
SUM_LRS = {"mnist-5k": ("0.001",)}  # H1's best fit


def _lr_over(lr: str, n: int) -> str:
    return f"{float(lr) / n:.3g}"


def map_batches() -> dict:
    """name -> tuple of MapPoints (one epoch, sync, one process)."""
    fit8 = tuple(MapPoint("fashion-mnist", "epochs", n, "mean", FIT_LR, s, part="fit8")
                 for s in SEEDS8 for n in RANKS)
    # N = 1..8 first (the collapse law puts every critical N of these lrs at 2-6), 9..12 in `threshold-rest`
    threshold = [MapPoint(d, "epochs", n, "mean", lr, s, part="threshold")
                 for d, lrs in THRESHOLD_LRS.items() for lr in lrs for s in SEEDS8 for n in RANKS
                 if not (d == "fashion-mnist" and lr == FIT_LR)]
    collapse = []
    for d, lrs in COLLAPSE_LRS.items():
        seeds = SEEDS8 if d == "mnist-5k" else SEEDS8[:2]  # fashion-mnist's runs cost 15x more
        collapse += [MapPoint(d, "epochs", 1, "mean", _lr_over(lr, n), s, part="collapse")
                     for lr in lrs for s in seeds for n in RANKS[1:]]
    for d, lrs in SUM_LRS.items():
        ranks = RANKS
        collapse += [MapPoint(d, "epochs", n, "sum", lr, s, part="collapse")
                     for lr in lrs for s in SEEDS8[:2] for n in ranks]
    # the step-budget hypotheses' best settings on mnist-5k (H3 summed, H5 averaged; the map's fits)
    steps = tuple(MapPoint("mnist-5k", "steps", n, reduce, lr, s, part="hypotheses", steps=4000)
                  for reduce, lr in (("sum", "0.001"), ("mean", "0.178")) for s in SEEDS8[:3] for n in RANKS[1:])
    return {"fit8": fit8, "threshold": tuple(p for p in threshold if p.ranks <= 8),
            "threshold-rest": tuple(p for p in threshold if p.ranks > 8), "collapse": tuple(collapse),
            "hypotheses": steps}


@dataclass(frozen=True)
class ClimbPoint:
    """One run of the climb search: a map point's flags plus the axes the map never had."""
    dataset: str
    ranks: int
    lr: str
    seed: int
    axis: str            # a key of AXES
    how: str = "climb"
    mode: str = "sync"

    AXES = {"base": [], "scale255": ["--input-scale", "255"], "lenet": ["--arch", "lenet"],
            "epochs3": ["--epochs", "3"], "momentum": ["--momentum", "0.9"]}

    def flags(self) -> list:
        out = ["--dataset", self.dataset, "--reduce", "mean", "--lr", self.lr]
        extra = self.AXES[self.axis]
        return out + ([] if "--epochs" in extra else ["--epochs", "1"]) + extra

    @property
    def name(self) -> str:
        return f"d{self.dataset}-{self.axis}-n{self.ranks:02d}-seed{self.seed}-lr{self.lr}-mean.h5"

    def run_args(self, log_path) -> list:
        return self.flags() + ["--seed", str(self.seed), "--log", os.fspath(log_path), "--quiet",
                               "--samples-per-rank", str(self.ranks)]

    def samples(self) -> int:
        from cnnpar.experiments.runner import TRAIN_SIZES

        return TRAIN_SIZES.get(self.dataset, 60000) * (3 if self.axis == "epochs3" else 1)


# A(1, lr) over each axis: log-spaced learning rates from 1e-4 to 1 (13 values, x ~2.15 apart); the raw
# pixels' useful range is ~255^2 below the [0, 1] pixels' (the first layer's gradient and its effect scale
# with the input each), so each axis runs the part of the grid where one rank goes from training to not
CLIMB_LRS = tuple(f"{10 ** (-4 + k / 3):.3g}" for k in range(13))


def climb_batches() -> dict:
    lr_points = []
    low, high = CLIMB_LRS[:7], CLIMB_LRS[5:]
    for axis, dataset, lrs, seeds in (("scale255", "mnist-5k", low, SEEDS8), ("lenet", "mnist-5k", high, SEEDS8[:3]),
                                      ("epochs3", "mnist-5k", high, SEEDS8[:3]),
                                      ("momentum", "mnist-5k", CLIMB_LRS[3:10], SEEDS8[:3]),
                                      ("scale255", "fashion-mnist", low[1:6], SEEDS8[:2])):
        lr_points += [ClimbPoint(dataset, 1, lr, s, axis) for lr in lrs for s in seeds]
    return {"climb-lr": tuple(lr_points)}


def climb_map(dataset: str, axis: str, lr: str, seeds=SEEDS8) -> Part:
    """N = 1..12 at one candidate of the climb search."""
    return Part(f"climb-map-{axis}-{dataset}-{lr}", "the climb's candidate over N = 1..12",
                tuple(ClimbPoint(dataset, n, lr, s, axis) for s in seeds for n in RANKS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpar study", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default="runs/predict", help="the study's folder (default runs/predict)")
    parser.add_argument("--batches", default="fit8,threshold,collapse", help="comma-separated batch names")
    parser.add_argument("--climb-map", default="", help="DATASET:AXIS:LR: map N = 1..12 at a climb candidate")
    parser.add_argument("--jobs", type=int, default=2, help="one-process runners at once (default 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the batches and their counts only")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    from cnnpar.experiments.map import run_map

    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1, got {args.jobs}")
    known = dict(map_batches(), **climb_batches())
    selected = []
    for name in filter(None, (b.strip() for b in args.batches.split(","))):
        if name not in known:
            raise UserError("--batches", f"no batch {name!r}; the batches are: {', '.join(known)}")
        selected.append(Part(name, name, known[name]))
    if args.climb_map:
        try:
            dataset, axis, lr = args.climb_map.split(":")
        except ValueError:
            raise UserError("--climb-map", f"expected DATASET:AXIS:LR, got {args.climb_map!r}") from None
        if axis not in ClimbPoint.AXES:
            raise UserError("--climb-map", f"no axis {axis!r}; the axes are: {', '.join(ClimbPoint.AXES)}")
        selected.insert(0, climb_map(dataset, axis, lr))  # a candidate is what the other batches wait for
    out = Path(args.out)
    failures = 0
    for part in selected:
        folder = out if part.points and part.points[0].how == "climb" else out / "map"
        failures += run_map(folder, [part], args.jobs, args.dry_run)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
