#!/usr/bin/env python3
"""The accuracy map of issue 13, run cheaply and resumably: where does accuracy rise with ranks?

    cnnpar map --out runs/map                # every group, in order (many hours on 2 cores)
    cnnpar map --out runs/map --dry-run      # the groups, their run counts and the time estimate
    cnnpar map --out runs/map --parts mnist-epochs,race
    cnnpar map --out runs/map --complete-fits  # then the best settings at the rank counts skipped
    cnnpar map --out /tmp/m --tiny           # CI: a handful of points (preset `map-tiny`)
    cnnpar report runs/map             # the report from the logs

The grid is the `map` preset of cnnpar/experiments/presets.py: each of its groups is a part here, run in its order.
Each map point is a training run with the flags of `mpirun -n N python -m cnnpar.train --seed S FLAGS`.
How a point runs is a property of the point, recorded in the log folder it goes to:

- `one-process` (sync points): the project guarantees that N ranks x 1 sample per rank give bit-for-bit the
  same training as 1 rank x N samples (tests/test_train.py, shm exchange). So a sync point with N ranks runs
  as one process with `--samples-per-rank N`, and many of them run inside one Python process that calls the
  trainer's `main` again and again (start-up ~0.1 s instead of ~1 s per run). `--jobs` such processes run at
  once.
- `real-ranks`: race points (the race's losses depend on real concurrent ranks) and the groups that name an
  --allreduce (a check that the one-process runs agree with real N-rank runs); one `mpiexec -n N` each.
- `noise`: one-process reruns with --noise-scale (B_small = 1 sample, B_big = N).

Logs: OUT/<how>/<name>.h5, name = `d<dataset>-<budget>-n<N>-<mode>-seed<S>-lr<lr>-<reduce>.h5`. Resuming: a
point whose log is complete or diverged (the loss became NaN: a result, accuracy at chance) is skipped;
anything else found there is moved to OUT/incomplete/ and run again. The estimate of the time left is
learnt from the runs done (seconds per sample per dataset and mode, plus a per-run start cost).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.experiments.map_grid import MapPoint, Part, fit_completion, parts  # noqa: F401 (the map's API)

# Seconds per sample and per run (start, data, evaluation), measured on this 2-core machine, for the estimate
# before any run of a kind has finished.
PRIOR_S_PER_SAMPLE = {"sync": 45e-6, "race": 1.2e-3}
PRIOR_S_PER_RUN = {"mnist-5k": 0.15, "fashion-mnist": 1.3, "mnist": 1.3, "race": 6.0, "real-ranks": 5.0}
# A real-ranks run past this is stopped and counted failed (fashion-mnist's 12-rank rma race took > 1800 s here).
RUN_TIMEOUT_S = 3600.0


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


def run_real_ranks(point: MapPoint, path: Path, launcher, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """One point with real ranks. Past `timeout_s` the launcher gets SIGTERM, which stops every rank at a
    step boundary (the log says `preempted`; the next map moves it aside and runs the point again)."""
    cmd = launcher.command(point.ranks, sys.executable, point.run_args(path))
    start = time.perf_counter()
    # env: Python's copy of the environment, not the C one, which an Open MPI singleton in this process (a
    # test's) fills with variables that make a child mpirun take itself for part of that job and exit 1
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ))
    try:
        output, _ = job.communicate(timeout=timeout_s)
        rc = job.returncode
    except subprocess.TimeoutExpired:
        job.terminate()
        try:
            output, _ = job.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
            output, _ = job.communicate()
        output = (output or "") + f"\nmap: stopped after {timeout_s:g} s (--run-timeout)"
        rc = 124
    return {"rc": rc, "seconds": time.perf_counter() - start, "output": (output or "")[-3000:]}


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


def run_map(out: Path, selected: list, jobs: int, dry_run: bool = False, say=say_now,
            run_timeout_s: float = RUN_TIMEOUT_S) -> int:
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
        failures += _run_part(out, pending, jobs, estimator, say, run_timeout_s)
    return failures


def _run_part(out, pending, jobs, estimator, say, run_timeout_s) -> int:
    for how in {"one-process", "real-ranks", "noise"} | {p.how for p in pending}:
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
        from cnnpar.experiments.launchers import make_launcher

        launcher = make_launcher(None)
        for point in real:
            outcome = run_real_ranks(point, log_path(out, point), launcher, run_timeout_s)
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
    parser = argparse.ArgumentParser(prog="cnnpar map", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/map", help="the map's folder (default runs/map)")
    parser.add_argument("--parts", default="", help="comma-separated part names (default: all, in order)")
    parser.add_argument("--jobs", type=int, default=2, help="one-process runners at once (default 2)")
    parser.add_argument("--tiny", action="store_true", help="the CI map: a few points")
    parser.add_argument("--complete-fits", action="store_true",
                        help="after the map: run the best settings of each hypothesis at the rank counts the "
                             "map skipped (needs cnnpar report)")
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S,
                        help=f"seconds a real-ranks run may take before it is stopped and counted as failed "
                             f"(default {RUN_TIMEOUT_S:g})")
    parser.add_argument("--dry-run", action="store_true", help="print the parts, counts and estimates only")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1, got {args.jobs}")
    if not args.run_timeout > 0:
        raise UserError("--run-timeout", f"must be a positive number of seconds, got {args.run_timeout:g}")
    available = parts(args.tiny)
    by_name = {p.name: p for p in available}
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    for name in wanted:
        if name not in by_name:
            raise UserError("--parts", f"no part {name!r}; the parts are: {', '.join(by_name)}")
    selected = [by_name[n] for n in wanted] if wanted else available
    out = Path(args.out)
    failures = run_map(out, selected, args.jobs, args.dry_run, run_timeout_s=args.run_timeout)
    if args.complete_fits and not args.dry_run:
        from cnnpar.analysis.map_report import completion_points

        extra = completion_points(out)
        failures += run_map(out, [fit_completion(extra)], args.jobs, run_timeout_s=args.run_timeout)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
