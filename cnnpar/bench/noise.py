"""What --noise-scale costs a training step: the same run with and without it, side by side.

    cnnpar bench noise                       # n = 2 and 12 ranks x 1 sample, 1 rank x 12 samples
    cnnpar bench noise --cases 2x1 4x1 --repeats 7 --steps 2000

Each case is `mpiexec -n N python -m cnnpar.train --samples-per-rank K --steps S --seed 1` on mnist-5k,
run with and without --noise-scale, alternating (ABAB...) `--repeats` times so drifting machine load hits
both alike. The figure is the log's training time (/final@train_time_s: the loop only, no start-up or
evaluation) per step; the overhead is the median over repeats of each pair's ratio, with its range. With
several ranks the flag adds one squared norm of the rank's gradient per step (rank 0: also of the sum)
and a few floats to the rows the window gathers anyway; with one rank it computes the samples' gradients
one at a time, so that their norms can be taken apart. Ends with one JSON line holding every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CASES = ("2x1", "12x1", "1x12")


def _mpiexec() -> str:
    from cnnpar.experiments.launchers import default_mpiexec

    return default_mpiexec()


def parse_case(text: str) -> tuple:
    ranks, _, per_rank = text.partition("x")
    try:
        return int(ranks), int(per_rank or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANKSxSAMPLES like 2x1, got {text!r}") from None


def train_seconds(ranks: int, per_rank: int, steps: int, noise: bool, folder: Path, tag: str) -> float:
    from cnnpar.runlog import open_log

    log = folder / f"{tag}.h5"
    command = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "cnnpar.train", "--dataset", "mnist-5k",
               "--steps", str(steps), "--samples-per-rank", str(per_rank), "--seed", "1", "--quiet",
               "--log", str(log)] + (["--noise-scale"] if noise else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench_noise: {' '.join(command[3:])} failed (exit {done.returncode}):\n{done.stderr}")
    return float(open_log(log).final["attrs"]["train_time_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=parse_case, nargs="+", default=[parse_case(c) for c in DEFAULT_CASES],
                        help=f"RANKSxSAMPLES per rank (default {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int, default=1500, help="steps per run (default 1500)")
    parser.add_argument("--repeats", type=int, default=5, help="with/without pairs per case (default 5)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        folder = Path(tmp)
        for ranks, per_rank in args.cases:
            train_seconds(ranks, per_rank, 50, True, folder, f"warm-{ranks}x{per_rank}")  # compile, page in
            pairs = []
            for i in range(args.repeats):
                first_noise = i % 2 == 1  # alternate which of the pair goes first
                times = {}
                for noise in (first_noise, not first_noise):
                    times[noise] = train_seconds(ranks, per_rank, args.steps, noise, folder,
                                                 f"{ranks}x{per_rank}-{i}-{int(noise)}")
                pairs.append((times[False], times[True]))
            ratios = [with_ / without for without, with_ in pairs]
            row = {"ranks": ranks, "samples_per_rank": per_rank, "steps": args.steps, "repeats": args.repeats,
                   "median_step_us_without": 1e6 * statistics.median(p[0] for p in pairs) / args.steps,
                   "median_step_us_with": 1e6 * statistics.median(p[1] for p in pairs) / args.steps,
                   "median_overhead": statistics.median(ratios) - 1, "min_overhead": min(ratios) - 1,
                   "max_overhead": max(ratios) - 1}
            rows.append(row)
            print(f"{ranks:>3} ranks x {per_rank:>2} samples: step {row['median_step_us_without']:8.1f} us -> "
                  f"{row['median_step_us_with']:8.1f} us with --noise-scale; overhead median "
                  f"{100 * row['median_overhead']:+.1f}% (range {100 * row['min_overhead']:+.1f}% .. "
                  f"{100 * row['max_overhead']:+.1f}%, {args.repeats} pairs)", flush=True)
    print(json.dumps({"bench": "noise_scale_overhead", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
