#!/usr/bin/env python3
"""The accuracy map, run cheaply and resumably: where does accuracy rise with ranks?

    cnnpar map --out runs/map                # every group, in order (many hours on 2 cores)
    cnnpar map --out runs/map --dry-run      # the groups, their run counts and the time estimate
    cnnpar map --out runs/map --parts mnist-epochs,race
    cnnpar map --out runs/map --complete-fits  # then the best settings at the rank counts skipped
    cnnpar map --out /tmp/m --tiny           # CI: a handful of points (preset `map-tiny`)
    cnnpar map --out runs/map --slurm-array 16 --dry-run   # a Slurm job array: the plan per task
    cnnpar map --out runs/map --slurm-array 16             # submit it, and the report job after it
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
point whose log is complete or diverged (the loss became NaN: a result, accuracy at chance) is skipped; a
point stopped after a checkpoint (points of more than 20,000 samples write one every 20,000) continues from
it, bit-identical to an uninterrupted run; anything else found there is moved to OUT/incomplete/ and run
again. One map at a time uses a folder (OUT/.cnnpar-lock names the holder); the slices of one map (the
tasks of a Slurm job array, or their resubmissions) share it, each running its own slice of the points
(every N-th point of the full list, so a requeued or resubmitted task runs the same points). The estimate of the time left is learnt from the runs done
(seconds per sample per dataset and mode, plus a per-run start cost).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.experiments.resumable import (Progress, array_task, drop_checkpoint, hms, log_state,
                                          move_aside, slice_of, sliced)
from cnnpar.experiments.map_grid import MapPoint, Part, fit_completion, parts  # noqa: F401 (the map's API)

# Seconds per sample and per run (start, data, evaluation), measured on this 2-core machine, for the estimate
# before any run of a kind has finished.
PRIOR_S_PER_SAMPLE = {"sync": 45e-6, "race": 1.2e-3}
PRIOR_S_PER_RUN = {"mnist-5k": 0.15, "fashion-mnist": 1.3, "mnist": 1.3, "race": 6.0, "real-ranks": 5.0}
# A real-ranks run past this is stopped and counted failed (fashion-mnist's 12-rank rma race took > 1800 s here).
RUN_TIMEOUT_S = 3600.0
EXIT_STOPPED = 75   # a signal stopped the map: resumable (the job scripts requeue on it), as for cnnpar sweep


# ----------------------------------------------------------------------------------------------------
# logs


def log_path(out: Path, point: MapPoint) -> Path:
    return out / point.how / point.name


def state_of(path: Path) -> str:
    """'todo', 'done', 'diverged', 'resumable', 'running' or 'stale' (cnnpar.experiments.resumable)."""
    return log_state(path).state


# ----------------------------------------------------------------------------------------------------
# running


class Stopped(BaseException):
    """SIGTERM or SIGUSR1 (a time limit, preemption, scancel): the running points checkpoint and stop."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


_children = set()   # real-ranks launchers running now, to pass a stop on to


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
    _children.add(job)
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
    finally:
        _children.discard(job)
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

    def remaining(self, points) -> tuple:
        """(seconds, how many points have no estimate: none, the priors cover every kind)."""
        return sum(self.predict(p) for p in points), 0

    def add(self, point, seconds: float) -> None:
        """Scale the kind's per-sample cost by the ratio measured/predicted (a running mean of ratios)."""
        sample_key, _ = self.kind(point)
        ratio = seconds / max(self.predict(point), 1e-9)
        n = self.seen.get(sample_key, 0)
        weight = 1.0 / min(n + 1, 50)
        self.s_per_sample[sample_key] *= (1 - weight) + weight * ratio
        self.seen[sample_key] = n + 1


def part_seconds(estimator, points, jobs: int) -> float:
    """Wall seconds of a part's points: the one-process ones `jobs` at a time, real-ranks ones in turn."""
    pooled = [p for p in points if p.how != "real-ranks"]
    return (sum(estimator.predict(p) for p in pooled) / max(1, min(jobs, len(pooled) or 1))
            + sum(estimator.predict(p) for p in points if p.how == "real-ranks"))


def say_now(text: str) -> None:
    print(text, flush=True)


def unique_points(selected) -> list:
    """Every point of the parts once, in order (a point two parts share runs once, into one log)."""
    seen, points = set(), []
    for part in selected:
        for p in part.points:
            if (p.how, p.name) not in seen:
                seen.add((p.how, p.name))
                points.append(p)
    return points


def slice_parts(selected, task: int, slices: int) -> list:
    """The parts restricted to array task `task`'s points (resumable.slice_of over all their points)."""
    mine = set(slice_of(unique_points(selected), task, slices))
    return [Part(part.name, part.doc, tuple(p for p in part.points if p in mine)) for part in selected]


def pending_points(out: Path, part, dry_run: bool) -> list:
    """The part's points still to run; leftovers without a checkpoint are moved aside (not in a dry run)."""
    pending = []
    for point in part.points:
        path = log_path(out, point)
        found = log_state(path)
        if found.state == "running":
            raise UserError(str(path), "is being written by a live process outside this map: stop it, or wait "
                            "for it")
        if found.state == "stale" and not dry_run:
            move_aside(path, out, reason=f"leftover found by the map: {found.detail}")
        if found.state in ("todo", "stale", "resumable"):
            pending.append(point)
    return pending


def run_map(out: Path, selected: list, jobs: int, dry_run: bool = False, say=say_now,
            run_timeout_s: float = RUN_TIMEOUT_S, launcher_spec: str | None = None) -> int:
    """Run every pending point of the selected parts; returns the number of failed runs."""
    estimator = Estimator()
    failures = 0
    for part in selected:
        if not part.points:
            continue   # none of this part's points is in this array task's slice
        pending = pending_points(out, part, dry_run)
        resumed = sum(log_state(log_path(out, p)).state == "resumable" for p in pending)
        say(f"map: part {part.name}: {len(part.points)} points, {len(part.points) - len(pending)} done, "
            f"{len(pending)} to run{f' ({resumed} resumed from checkpoints)' if resumed else ''}, "
            f"estimate {hms(part_seconds(estimator, pending, jobs))} -- {part.doc}")
        if dry_run or not pending:
            continue
        failures += _run_part(out, pending, jobs, estimator, say, run_timeout_s, launcher_spec)
    return failures


def _run_part(out, pending, jobs, estimator, say, run_timeout_s, launcher_spec) -> int:
    for how in {"one-process", "real-ranks", "noise"} | {p.how for p in pending}:
        (out / how).mkdir(parents=True, exist_ok=True)
    one_process = [p for p in pending if p.how != "real-ranks"]
    real = [p for p in pending if p.how == "real-ranks"]
    failures = 0
    progress = Progress(pending, estimator, jobs)
    if one_process:
        context = multiprocessing.get_context("spawn")  # workers initialise MPI themselves, each a singleton
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context)
        try:
            jobs_iter = ((p, log_path(out, p)) for p in one_process)
            for point, outcome in zip(one_process, pool.map(run_in_process, jobs_iter, chunksize=1)):
                failures += _record(out, point, outcome, estimator, progress, say)
        except Stopped:
            # the running points get the signal too, checkpoint and end; no new one starts
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
            raise
        pool.shutdown()
    if real:
        from cnnpar.experiments.launchers import make_launcher

        launcher = make_launcher(launcher_spec)
        for point in real:
            try:
                outcome = run_real_ranks(point, log_path(out, point), launcher, run_timeout_s)
            except Stopped:
                for child in list(_children):
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=60)
                raise
            failures += _record(out, point, outcome, estimator, progress, say)
    return failures


def _record(out, point, outcome, estimator, progress, say) -> int:
    path = log_path(out, point)
    state = state_of(path)
    progress.step(point)
    if state in ("done", "diverged"):
        estimator.add(point, outcome["seconds"])
        drop_checkpoint(path)
        ok = 0
    else:
        say(f"map: FAILED {point.name} (exit {outcome['rc']}):\n{outcome['output']}")
        move_aside(path, out, outcome["output"])
        ok = 1
    if progress.elapsed_s() >= getattr(progress, "next_line_s", 0.0) or not progress.pending:
        say(f"map: {progress.finished}/{progress.total} runs in {hms(progress.elapsed_s())}, about "
            f"{hms(part_seconds(estimator, progress.pending, progress.jobs))} left (last: {point.name}, "
            f"{outcome['seconds']:.1f} s)")
        progress.next_line_s = progress.elapsed_s() + 60.0
    return ok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpar map", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
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
    parser.add_argument("--launcher", help="MPI launcher of the real-ranks points, as for cnnpar sweep, e.g. "
                        "\"srun --mpi=pmi2 --ntasks={n}\" (default: the mpiexec next to this Python)")
    parser.add_argument("--slices", type=int, default=0, help="run one slice of the points: every N-th of the "
                        "full list (with --task, or Slurm's SLURM_ARRAY_TASK_ID inside a job array)")
    parser.add_argument("--task", type=int, help="which slice, 0..N-1 (default: SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--slurm-array", type=int, default=0, metavar="N",
                        help="submit the map as a Slurm job array of N tasks (launch/slurm/map.sbatch) and the "
                             "report as a job that runs when the array ends; with --dry-run, print the plan: "
                             "points and estimated time per task, and the sbatch commands")
    parser.add_argument("--sbatch", default="", help="extra sbatch options for --slurm-array's array job, "
                        "e.g. \"--ntasks=12 --time=04:00:00 --partition=standard\"")
    parser.add_argument("--dry-run", action="store_true", help="print the parts, counts and estimates only")
    return parser


def array_commands(args, out: Path, passed: list) -> tuple:
    """(the array job's sbatch command, the report job's sbatch command with DEPENDENCY as a placeholder)."""
    array = (["sbatch", "--parsable", f"--array=0-{args.slurm_array - 1}"] + shlex.split(args.sbatch)
             + ["launch/slurm/map.sbatch", "--out", str(out), "--slices", str(args.slurm_array)] + passed)
    report = (["sbatch", "--parsable", "--dependency=afterany:DEPENDENCY"] + shlex.split(args.sbatch)
              + ["--job-name=cnnpar-map-report", "--ntasks=1", f"--output={out}/report.out",
                 "launch/slurm/map.sbatch", "--report", str(out)])
    return array, report


def array_plan(args, out: Path, selected: list, passed: list, say=say_now) -> int:
    """Print (--dry-run) or submit the map as a job array and its report job."""
    estimator = Estimator()
    say(f"map: job array of {args.slurm_array} tasks over {out}, {args.jobs} one-process runs at once per task")
    worst = 0.0
    for task in range(args.slurm_array):
        mine = slice_parts(selected, task, args.slurm_array)
        pending = [p for part in mine for p in pending_points(out, part, dry_run=True)]
        seconds = part_seconds(estimator, pending, args.jobs)
        worst = max(worst, seconds)
        ranks = max((p.ranks for p in pending if p.how == "real-ranks"), default=1)
        say(f"  task {task}: {sum(len(part.points) for part in mine)} points, {len(pending)} to run "
            f"({sum(p.how == 'real-ranks' for p in pending)} with real ranks, up to {ranks}), "
            f"estimate {hms(seconds)}")
    say(f"map: the array ends in about {hms(worst)} once all its tasks run at once")
    array, report = array_commands(args, out, passed)
    if args.dry_run:
        say("then: " + shlex.join(array))
        say("then: " + shlex.join(report).replace("DEPENDENCY", "<array job id>"))
        return 0
    done = subprocess.run(array, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError("sbatch", (done.stderr or done.stdout).strip().splitlines()[-1] if
                        (done.stderr or done.stdout).strip() else f"exit status {done.returncode}")
    job = done.stdout.strip().split(";")[0]
    after = subprocess.run([w.replace("DEPENDENCY", job) for w in report], capture_output=True, text=True)
    if after.returncode != 0:
        raise UserError("sbatch", f"the array is job {job}, but its report job was refused: "
                                  f"{after.stderr.strip() or after.returncode}")
    say(f"map: submitted job array {job} ({args.slurm_array} tasks) and report job {after.stdout.strip()} "
        f"(runs when the array ends); their output: slurm-{job}_*.out, {out}/report.out")
    return 0


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
    if args.slurm_array:
        if args.slurm_array < 1 or args.slices or args.task is not None:
            raise UserError("--slurm-array", "takes a task count of at least 1, and no --slices/--task")
        passed = (["--tiny"] if args.tiny else []) + (["--parts", args.parts] if args.parts else []) + \
            (["--run-timeout", f"{args.run_timeout:g}"] if args.run_timeout != RUN_TIMEOUT_S else [])
        return array_plan(args, out, selected, passed)
    task = args.task if args.task is not None else array_task()
    whole = unique_points(selected)
    if args.slices:
        if task is None or not 0 <= task < args.slices:
            raise UserError("--task", f"a slice of 0..{args.slices - 1} is needed with --slices {args.slices} "
                            f"(got {task}; inside a job array it is SLURM_ARRAY_TASK_ID)")
        total = len(unique_points(selected))
        selected = slice_parts(selected, task, args.slices)
        print(f"map: task {task} of {args.slices}: {len(unique_points(selected))} of the {total} points",
              flush=True)
    elif args.task is not None:
        raise UserError("--task", "needs --slices")
    if args.dry_run:
        run_map(out, selected, args.jobs, True, run_timeout_s=args.run_timeout, launcher_spec=args.launcher)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    previous = {name: signal.signal(getattr(signal, name), _raise_stopped) for name in ("SIGTERM", "SIGUSR1")}
    try:
        with sliced(out, whole, task if args.slices else None, args.slices) as notes:
            for note in notes:
                print(f"map: {note}", flush=True)
            failures = run_map(out, selected, args.jobs, run_timeout_s=args.run_timeout,
                               launcher_spec=args.launcher)
            if args.complete_fits:
                from cnnpar.analysis.map_report import completion_points

                extra = completion_points(out)
                failures += run_map(out, [fit_completion(extra)], args.jobs, run_timeout_s=args.run_timeout,
                                    launcher_spec=args.launcher)
    except Stopped as stop:
        print(f"map: stopped by {stop} (time limit, preemption or scancel); the running points checkpoint "
              "where they can. Run the same command again, or let the requeued job, resume.", flush=True)
        return EXIT_STOPPED
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
