#!/usr/bin/env python3
"""Training throughput of this tree against another source tree, measured side by side in one run.

    cnnpar bench compare --base /path/to/other/checkout            # n = 1 and 12, 5 repeats
    cnnpar bench compare --base ../old --ranks 1,2,12 --repeats 7 -- --mode race

For refactors and for changes to the loop or the log that must not cost step time: every repeat runs each
rank count once with the base tree and once with this one, alternating which goes first, so a slow phase
of a shared machine hits both alike. Each point is one `mpiexec -n N python -m cnnpar.train --steps S
--quiet --log ...` run (extra trainer flags after `--`); its figure is the log's training-only samples/s.
Printed: per rank count the median samples/s of each tree, the median of the per-repeat ratios
this/base with its range, and as the last line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cnnpar.bench import SOURCE_ROOT as REPO  # this tree
from cnnpar.runpaths import checkpoint_path


def mpiexec() -> str:
    from cnnpar.experiments.launchers import default_mpiexec

    return default_mpiexec()


def samples_per_s(tree: Path, ranks: int, steps: int, flags: list, folder: Path, tag: str) -> float:
    import h5py

    log = folder / f"{tag}-n{ranks}.h5"
    for stale in (log, Path(checkpoint_path(str(log)))):
        stale.unlink(missing_ok=True)
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "cnnpar.train", "--steps", str(steps),
               "--quiet", "--log", str(log), *flags]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"cnnpar: error: {tree}: the trainer failed at n={ranks}: "
                         f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    with h5py.File(log, "r") as f:
        return float(f["final"].attrs["samples_per_s"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     epilog="Trainer flags after -- are passed to both trees.")
    parser.add_argument("--base", required=True, metavar="DIR", help="the other source tree (a checkout "
                        "holding cnnpar/), e.g. made with `git worktree add /tmp/base <commit>`")
    parser.add_argument("--ranks", default="1,12", help="comma-separated rank counts (default 1,12)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 30,000 samples' worth, "
                        "at least 3,000 steps)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported "
                        "(default 5)")
    args = parser.parse_args(argv)
    base = Path(args.base).resolve()
    if not (base / "cnnpar" / "train.py").is_file():
        print(f"cnnpar: error: --base: {base} holds no cnnpar/train.py", file=sys.stderr)
        return 2
    ranks = [int(r) for r in args.ranks.split(",")]
    figures = {n: {"base": [], "this": []} for n in ranks}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as scratch:
        folder = Path(scratch)
        for n in ranks:  # compile both trees' kernels before anything is timed
            for tree, tag in ((base, "base"), (REPO, "this")):
                samples_per_s(tree, n, 50, extra, folder, f"warm-{tag}")
        for repeat in range(args.repeats):
            for n in ranks:
                steps = args.steps or max(3000, 30000 // n)
                order = [(base, "base"), (REPO, "this")]
                for tree, tag in order if repeat % 2 == 0 else order[::-1]:
                    figures[n][tag].append(samples_per_s(tree, n, steps, extra, folder, tag))
    summary = {"base": str(base), "this": str(REPO), "flags": extra, "repeats": args.repeats, "points": []}
    print(f"{'ranks':>5} {'base samples/s':>15} {'this samples/s':>15} {'this/base (median, range)':>28}")
    for n in ranks:
        ratios = [t / b for t, b in zip(figures[n]["this"], figures[n]["base"])]
        point = {"ranks": n, "base_samples_per_s": statistics.median(figures[n]["base"]),
                 "this_samples_per_s": statistics.median(figures[n]["this"]),
                 "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                 "base_runs": figures[n]["base"], "this_runs": figures[n]["this"]}
        summary["points"].append(point)
        print(f"{n:5d} {point['base_samples_per_s']:15.0f} {point['this_samples_per_s']:15.0f} "
              f"{point['ratio_median']:10.3f} ({point['ratio_min']:.3f}-{point['ratio_max']:.3f})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
