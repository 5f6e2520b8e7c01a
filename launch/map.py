#!/usr/bin/env python3
"""The accuracy map of issue 13, run cheaply and resumably: where does accuracy rise with ranks?

    python launch/map.py --out runs/map                # everything, in priority order (hours on 2 cores)
    python launch/map.py --out runs/map --dry-run      # the parts, their run counts and the time estimate
    python launch/map.py --out runs/map --parts mnist-epochs,race
    python launch/map.py --out /tmp/m --tiny           # CI: a handful of points
    python analysis/map_report.py runs/map             # the report from the logs

Each map point is a training run with the flags of `mpirun -n N python -m cnnpar.train --seed S FLAGS`.
How a point runs is a property of the point, recorded in the log folder it goes to:

- `one-process` (sync points): the project guarantees that N ranks x 1 sample per rank give bit-for-bit the
  same training as 1 rank x N samples (tests/test_train.py, shm exchange). So a sync point with N ranks runs
  as one process with `--samples-per-rank N`, and many of them run inside one Python process that calls the
  trainer's `main` again and again (start-up ~0.1 s instead of ~1 s per run). `--jobs` such processes run at
  once.
- `real-ranks`: race points (the race's losses depend on real concurrent ranks) and a few sync points kept as
  a check that the one-process runs agree with real N-rank runs; each is one `mpiexec -n N` launch.

Logs: OUT/<how>/<name>.h5, name = `d<dataset>-<budget>-n<N>-<mode>-seed<S>-lr<lr>-<reduce>.h5`. Resuming: a
point whose log is complete or diverged (the loss became NaN: a result, accuracy at chance) is skipped;
anything else found there is moved to OUT/incomplete/ and run again. The estimate of the time left is
learnt from the runs done (seconds per sample per dataset and mode, plus a per-run start cost).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "launch"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cnnpar.errors import UserError, exit_on_user_error  # noqa: E402

# Learning rates: a quarter-decade log grid 0.001 .. 1 (13 values), and a finer one where one rank's
# averaged-gradient run stops training on mnist-5k.
LRS = ["0.001", "0.00178", "0.00316", "0.00562", "0.01", "0.0178", "0.0316", "0.0562", "0.1", "0.178", "0.316",
       "0.562", "1"]
FINE_LRS = ["0.133", "0.15", "0.2", "0.237", "0.266"]
# The 60,000-image set: 10 of the 13 (three of the low ones left out: nothing rises there on mnist-5k).
LRS_LARGE_SET = ["0.001", "0.00316", "0.01", "0.0316", "0.0562", "0.1", "0.178", "0.316", "0.562", "1"]
ALL_RANKS = list(range(1, 13))
MAP_RANKS = [1, 2, 3, 4, 6, 8, 12]
TRAIN_SIZES = {"mnist-5k": 4000, "fashion-mnist": 60000, "mnist": 60000}
REDUCES = ["sum", "mean"]
NOISE_WINDOW_STEPS = 50  # the noise part's --log-window: one estimate per 50 steps
RACE_WINDOWS = ["shared", "rma"]
# Seconds per sample and per run (start, data, evaluation), measured on this 2-core machine, for the estimate
# before any run of a kind has finished.
PRIOR_S_PER_SAMPLE = {"sync": 45e-6, "race": 1.2e-3}
PRIOR_S_PER_RUN = {"mnist-5k": 0.15, "fashion-mnist": 1.3, "mnist": 1.3, "race": 6.0, "real-ranks": 5.0}


@dataclass(frozen=True)
class MapPoint:
    dataset: str
    budget: str        # 'epochs': one epoch at every rank count; 'steps': the 1-rank epoch's step count
    ranks: int
    reduce: str
    lr: str
    seed: int
    mode: str = "sync"
    race_window: str = ""
    how: str = "one-process"   # or 'real-ranks', or 'noise' (one process, with --noise-scale)
    part: str = ""

    def flags(self) -> list:
        """cnnpar.train flags other than -n/--seed/--log that reproduce the point."""
        out = ["--dataset", self.dataset, "--reduce", self.reduce, "--lr", self.lr]
        out += ["--epochs", "1"] if self.budget == "epochs" else ["--steps", str(TRAIN_SIZES[self.dataset])]
        if self.mode != "sync":
            out += ["--mode", self.mode, "--race-window", self.race_window]
        return out

    @property
    def name(self) -> str:
        mode = self.mode + (f"~{self.race_window}" if self.race_window else "")
        return (f"d{self.dataset}-{self.budget}-n{self.ranks:02d}-{mode}-seed{self.seed}-lr{self.lr}-"
                f"{self.reduce}.h5")

    def samples(self) -> int:
        per_rank_step = self.ranks if self.budget == "steps" else 1
        return TRAIN_SIZES[self.dataset] * per_rank_step

    def run_args(self, log_path) -> list:
        """Arguments of the run that computes this point: one process with N samples per rank, or N ranks."""
        args = self.flags() + ["--seed", str(self.seed), "--log", os.fspath(log_path), "--quiet"]
        if self.how in ("one-process", "noise"):
            args += ["--samples-per-rank", str(self.ranks)]
        if self.how == "noise":
            args += ["--noise-scale", "--log-window", str(NOISE_WINDOW_STEPS)]
        return args


@dataclass(frozen=True)
class Part:
    name: str
    doc: str
    points: tuple


def _grid(part, datasets, budgets, ranks, reduces, lrs, seeds, mode="sync", windows=("",), how="one-process"):
    points = []
    for seed in seeds:  # seed outermost: a complete picture of seed 1 comes first
        for dataset in datasets:
            for budget in budgets:
                for reduce in reduces:
                    for lr in lrs:
                        for window in windows:
                            for n in ranks:
                                if budget == "steps" and n == 1:
                                    continue  # the same run as the one-epoch point at 1 rank
                                points.append(MapPoint(dataset, budget, n, reduce, lr, seed, mode, window, how,
                                                       part))
    return tuple(points)


def parts(tiny: bool = False) -> list:
    """The map, in the order it runs: the most important (and cheapest) first."""
    if tiny:
        return [Part("tiny", "CI: mnist-5k, same epochs, mean, two learning rates, ranks 1,2,3, seed 1",
                     _grid("tiny", ["mnist-5k"], ["epochs"], [1, 2, 3], ["mean"], ["0.01", "0.178"], [1])),
                Part("tiny-check", "CI: one real 2-rank run beside its one-process twin, and a --noise-scale rerun",
                     _grid("tiny-check", ["mnist-5k"], ["epochs"], [2], ["mean"], ["0.178"], [1],
                           how="real-ranks")
                     + _grid("tiny-check", ["mnist-5k"], ["epochs"], [2], ["mean"], ["0.178"], [1], how="noise"))]
    seeds3 = [1, 2, 3]
    race_lrs = ["0.01", "0.0316", "0.1"]
    return [
        Part("mnist-epochs", "mnist-5k, one epoch at every rank count 1..12, 13 lr x sum/mean x 3 seeds",
             _grid("mnist-epochs", ["mnist-5k"], ["epochs"], ALL_RANKS, REDUCES, LRS, seeds3)),
        Part("mnist-steps", "mnist-5k, 4000 SGD steps at ranks 2,3,4,6,8,12 (1 rank: the epoch point)",
             _grid("mnist-steps", ["mnist-5k"], ["steps"], MAP_RANKS, REDUCES, LRS, seeds3)),
        Part("mnist-epochs-fine", "mnist-5k, one epoch, mean, the lr between 0.1 and 0.316 where n=1 stops "
                                  "training, ranks 1..12, 3 seeds",
             _grid("mnist-epochs-fine", ["mnist-5k"], ["epochs"], ALL_RANKS, ["mean"], FINE_LRS, seeds3)),
        Part("check", "real N-rank sync runs beside their one-process twins (mnist-5k, same epochs)",
             _grid("check", ["mnist-5k"], ["epochs"], [2, 4, 12], ["mean"], ["0.178"], [1], how="real-ranks")
             + _grid("check", ["mnist-5k"], ["epochs"], [3, 8], ["sum"], ["0.01"], [1], how="real-ranks")),
        Part("race", f"--mode race, shared and rma windows, summed, same epochs, lr {'/'.join(race_lrs)}, "
                     "ranks 1..12, seeds 1,2 (real ranks)",
             _grid("race", ["mnist-5k"], ["epochs"], ALL_RANKS, ["sum"], race_lrs, [1, 2], mode="race",
                   windows=RACE_WINDOWS, how="real-ranks")),
        Part("fashion-epochs", "fashion-mnist (60,000), one epoch, ranks 1..12, 10 lr x sum/mean, seed 1",
             _grid("fashion-epochs", ["fashion-mnist"], ["epochs"], ALL_RANKS, REDUCES, LRS_LARGE_SET, [1])),
        Part("fashion-steps", "fashion-mnist, 60,000 steps at ranks 2,3,4,6,8,12, 10 lr x sum/mean, seed 1",
             _grid("fashion-steps", ["fashion-mnist"], ["steps"], MAP_RANKS, REDUCES, LRS_LARGE_SET, [1])),
        Part("noise", "--noise-scale reruns of map settings (one process, B_small = 1 sample, B_big = N): "
                      "same epochs, ranks 2,4,12, seed 1",
             _grid("noise", ["mnist-5k"], ["epochs"], [2, 4, 12], ["mean"], ["0.01", "0.0562", "0.178", "0.316"],
                   [1], how="noise")
             + _grid("noise", ["mnist-5k"], ["epochs"], [2, 4, 12], ["sum"], ["0.01", "0.0562"], [1], how="noise")
             + _grid("noise", ["fashion-mnist"], ["epochs"], [2, 12], ["mean"], ["0.0562", "0.178", "0.316"], [1],
                     how="noise")
             + _grid("noise", ["fashion-mnist"], ["epochs"], [2, 12], ["sum"], ["0.01"], [1], how="noise")),
        Part("fashion-epochs-seeds23", "fashion-mnist, one epoch: seeds 2 and 3",
             _grid("fashion-epochs-seeds23", ["fashion-mnist"], ["epochs"], ALL_RANKS, REDUCES, LRS_LARGE_SET,
                   [2, 3])),
        Part("fashion-steps-seeds23", "fashion-mnist, 60,000 steps: seeds 2 and 3",
             _grid("fashion-steps-seeds23", ["fashion-mnist"], ["steps"], MAP_RANKS, REDUCES, LRS_LARGE_SET,
                   [2, 3])),
    ]


def fit_completion(points_needed) -> Part:
    """Points that complete a Table I fit at rank counts the map skipped (see analysis/map_report.py)."""
    return Part("fit-completion", "the best settings of each hypothesis at the rank counts the map skipped",
                tuple(points_needed))


# ----------------------------------------------------------------------------------------------------
# logs


def log_path(out: Path, point: MapPoint) -> Path:
    return out / point.how / point.name


def state_of(path: Path) -> str:
    """'todo', 'done', 'diverged' or 'stale' (something else is there)."""
    if not path.exists():
        return "todo"
    import h5py

    try:
        with h5py.File(path, "r") as f:
            status = f.attrs["status"]
    except Exception:  # noqa: BLE001 - an unreadable leftover is stale, whatever the reason
        return "stale"
    status = status.decode().rstrip("\0") if isinstance(status, bytes) else str(status)
    return {"complete": "done", "diverged": "diverged"}.get(status, "stale")


def move_aside(out: Path, path: Path, output: str = "") -> None:
    folder = out / "incomplete"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
    if path.exists():
        os.replace(path, target)
    if output:
        target.with_suffix(".txt").write_text(output)


# ----------------------------------------------------------------------------------------------------
# running


def run_in_process(job) -> dict:
    """Worker side: one run through the trainer's main() in this (long-lived) process."""
    point, path = job
    from cnnpar import train

    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            rc = train.main(point.run_args(path))
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
    return {"rc": rc, "seconds": time.perf_counter() - start, "output": buffer.getvalue()[-3000:]}


def run_real_ranks(point: MapPoint, path: Path, launcher) -> dict:
    cmd = launcher.command(point.ranks, sys.executable, point.run_args(path))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    return {"rc": done.returncode, "seconds": time.perf_counter() - start,
            "output": (done.stdout + done.stderr)[-3000:]}


class Estimator:
    """Seconds left = sum over pending runs of (per-run cost + samples x seconds per sample), both learnt
    per kind (dataset for sync, 'race' for race) from the finished runs; priors before any finished."""

    def __init__(self):
        self.s_per_sample = dict(PRIOR_S_PER_SAMPLE)
        self.s_per_run = dict(PRIOR_S_PER_RUN)
        self.seen = {}

    @staticmethod
    def kind(point):
        if point.mode != "sync":
            return "race", "race"
        return "sync", "real-ranks" if point.how == "real-ranks" else point.dataset  # noise runs: ~2x

    def predict(self, point) -> float:
        sample_key, run_key = self.kind(point)
        return self.s_per_run[run_key] + point.samples() * self.s_per_sample[sample_key]

    def add(self, point, seconds: float) -> None:
        """Scale the kind's per-sample cost by the ratio measured/predicted (a running mean of ratios)."""
        sample_key, _ = self.kind(point)
        ratio = seconds / max(self.predict(point), 1e-9)
        n = self.seen.get(sample_key, 0)
        weight = 1.0 / min(n + 1, 50)
        self.s_per_sample[sample_key] *= (1 - weight) + weight * ratio
        self.seen[sample_key] = n + 1


def hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say_now(text: str) -> None:
    print(text, flush=True)


def run_map(out: Path, selected: list, jobs: int, dry_run: bool = False, say=say_now) -> int:
    """Run every pending point of the selected parts; returns the number of failed runs."""
    estimator = Estimator()
    failures = 0
    for part in selected:
        pending = []
        for point in part.points:
            path = log_path(out, point)
            state = state_of(path)
            if state == "stale" and not dry_run:
                move_aside(out, path)
                state = "todo"
            if state in ("todo", "stale"):
                pending.append(point)
        estimate = sum(estimator.predict(p) for p in pending) / (jobs if pending and pending[0].how !=
                                                                  "real-ranks" else 1)
        say(f"map: part {part.name}: {len(part.points)} points, {len(part.points) - len(pending)} done, "
            f"{len(pending)} to run, estimate {hms(estimate)} -- {part.doc}")
        if dry_run or not pending:
            continue
        failures += _run_part(out, pending, jobs, estimator, say)
    return failures


def _run_part(out, pending, jobs, estimator, say) -> int:
    for how in ("one-process", "real-ranks", "noise"):
        (out / how).mkdir(parents=True, exist_ok=True)
    one_process = [p for p in pending if p.how != "real-ranks"]
    real = [p for p in pending if p.how == "real-ranks"]
    failures = 0
    progress = _Progress(len(pending), estimator, pending, jobs, say)
    if one_process:
        context = multiprocessing.get_context("spawn")  # workers initialise MPI themselves, each a singleton
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            jobs_iter = ((p, log_path(out, p)) for p in one_process)
            for point, outcome in zip(one_process, pool.map(run_in_process, jobs_iter, chunksize=1)):
                failures += _record(out, point, outcome, estimator, progress, say)
    if real:
        from sweep import make_launcher

        launcher = make_launcher(None)
        for point in real:
            outcome = run_real_ranks(point, log_path(out, point), launcher)
            failures += _record(out, point, outcome, estimator, progress, say)
    progress.finish()
    return failures


def _record(out, point, outcome, estimator, progress, say) -> int:
    path = log_path(out, point)
    state = state_of(path)
    progress.step(point, outcome["seconds"])
    if state == "done" or state == "diverged":
        estimator.add(point, outcome["seconds"])
        return 0
    say(f"map: FAILED {point.name} (exit {outcome['rc']}):\n{outcome['output']}")
    move_aside(out, path, outcome["output"])
    return 1


class _Progress:
    def __init__(self, total, estimator, pending, jobs, say):
        self.total, self.done, self.estimator, self.jobs, self.say = total, 0, estimator, jobs, say
        self.left = list(pending)
        self.start = time.perf_counter()
        self.next_line = 0.0

    def step(self, point, seconds):
        self.done += 1
        self.left.remove(point)
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.next_line or self.done == self.total:
            rest = sum(self.estimator.predict(p) for p in self.left)
            rest /= self.jobs if self.left and self.left[0].how != "real-ranks" else 1
            self.say(f"map: {self.done}/{self.total} runs in {hms(elapsed)}, about {hms(rest)} left "
                     f"(last: {point.name}, {seconds:.1f} s)")
            self.next_line = elapsed + 60.0

    def finish(self):
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/map.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/map", help="the map's folder (default runs/map)")
    parser.add_argument("--parts", default="", help="comma-separated part names (default: all, in order)")
    parser.add_argument("--jobs", type=int, default=2, help="one-process runners at once (default 2)")
    parser.add_argument("--tiny", action="store_true", help="the CI map: a few points")
    parser.add_argument("--complete-fits", action="store_true",
                        help="after the map: run the best settings of each hypothesis at the rank counts the "
                             "map skipped (needs analysis/map_report.py)")
    parser.add_argument("--dry-run", action="store_true", help="print the parts, counts and estimates only")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1, got {args.jobs}")
    available = parts(args.tiny)
    by_name = {p.name: p for p in available}
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    for name in wanted:
        if name not in by_name:
            raise UserError("--parts", f"no part {name!r}; the parts are: {', '.join(by_name)}")
    selected = [by_name[n] for n in wanted] if wanted else available
    out = Path(args.out)
    failures = run_map(out, selected, args.jobs, args.dry_run)
    if args.complete_fits and not args.dry_run:
        sys.path.insert(0, str(REPO / "analysis"))
        from map_report import completion_points

        extra = completion_points(out)
        failures += run_map(out, [fit_completion(extra)], args.jobs)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
