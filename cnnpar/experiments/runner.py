"""Running a sweep: existing logs classified, time estimates, one run per point through the launcher."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cnnpar.config import SAME_RUN_FIELDS
from cnnpar.errors import UserError
from cnnpar.modes import is_race_mode
from cnnpar.experiments.grid import Point
from cnnpar.experiments.launchers import Launcher
from cnnpar.experiments.resumable import (Progress, drop_checkpoint, hms, log_state,  # noqa: F401
                                          move_aside, slice_of, sliced)

# Training-set sizes, for the time estimate of epoch-budget runs before any run of that shape finished.
TRAIN_SIZES = {"mnist-5k": 4000, "mnist": 60000, "fashion-mnist": 60000}
TIMES_FILE = "sweep-times.json"
DIVERGED_DIR = "diverged"
TAIL_LINES = 15
# The sweep gives up when its first runs all fail the same way: a launcher or install problem, which every
# later run would hit too (a sweep under the wrong srun plugin used to fail all 72 runs, one by one).
STARTUP_FAILURE_LIMIT = 3
# Exit status of a sweep that a signal or the scheduler stopped (EX_TEMPFAIL): the job scripts requeue it.
EXIT_STOPPED = 75
# What srun prints when the scheduler ends the step or the job under it: an interruption, not a failure.
SCHEDULER_STOP = re.compile(r"DUE TO (?:TIME LIMIT|PREEMPTION|NODE FAILURE)|Unable to create step for job|"
                            r"Job/step already completing")
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
# How long a run stopped by a signal may take to checkpoint and exit before it is killed.
STOP_GRACE_S = 60.0
KILL_GRACE_S = 5.0  # after ^C or a --timeout, how long a run may take to stop before it is SIGKILLed


class Stopped(BaseException):
    """A signal (time limit, preemption) or the scheduler stopped the sweep; `why` says which."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# ----------------------------------------------------------------------------------------------------
# existing logs


def expected_config(point: Point) -> dict:
    """The Config fields (as a dict) that `point` would run with; validates the flags."""
    from cnnpar.config import parse_config

    config = parse_config(point.train_args("sweep-check.h5"))
    return dataclasses.asdict(config)


def config_differences(log_config: dict, log_ranks: int, point: Point) -> list:
    """'field: log value vs sweep value' for every field that changes what the run computes."""
    want = expected_config(point)
    diffs = []
    if log_ranks != point.ranks:
        diffs.append(f"ranks: {log_ranks} (log) vs {point.ranks} (sweep)")
    for key, value in want.items():
        if key not in SAME_RUN_FIELDS:  # config.py: it changes neither the numbers, the tables nor the timings
            continue
        if key not in log_config:
            continue  # a field newer than the log: its default is assumed
        have = log_config[key]
        if isinstance(value, float) and isinstance(have, (int, float)):
            same = math.isclose(float(have), value, rel_tol=1e-12, abs_tol=0.0)
        else:
            same = have == value
        if not same:
            diffs.append(f"{key}: {have!r} (log) vs {value!r} (sweep)")
    return diffs


def classify(path: Path, point: Point) -> tuple:
    """('todo' | 'done' | 'diverged' | 'resumable' | 'running' | 'stale' | 'conflict', detail) for the point's
    log path (cnnpar.experiments.resumable.log_state, and the sweep's settings checked against the log's).

    A run whose loss became NaN is a result, not a failure: its log lives in OUT/diverged/ and the point
    counts as done (rerunning it would diverge again)."""
    from cnnpar import runlog

    found = log_state(path)
    if found.state == "todo":
        kept = path.parent / DIVERGED_DIR / path.name
        if log_state(kept).state == "diverged":
            log = runlog.open_log(kept)
            diffs = config_differences(log.config, log.ranks, point)
            return ("conflict", "; ".join(diffs)) if diffs else ("diverged", log.status_message)
        return "todo", ""
    if found.state in ("done", "resumable"):
        log = runlog.open_log(path)
        diffs = config_differences(log.config, log.ranks, point)
        if diffs:  # a stopped run with other settings cannot be continued; a complete one is not reused
            return ("conflict", "; ".join(diffs)) if found.state == "done" else ("stale", "; ".join(diffs))
        return found.state, found.detail
    if found.state == "running":
        return "running", found.detail
    return "stale", found.detail or f"status {found.status}"


# ----------------------------------------------------------------------------------------------------
# time estimates


def expected_samples(point: Point) -> float:
    """Samples the run will process (for comparing runs of different shapes)."""
    flags = point.flags()
    per_rank = int(flags.get("samples_per_rank", 1))
    steps = int(flags.get("steps", 0))
    if steps:
        return float(steps * point.ranks * per_rank)
    epochs = int(flags.get("epochs", 3))
    return float(epochs * TRAIN_SIZES.get(flags.get("dataset", "auto"), 4000))


class Estimator:
    """Predicts a run's wall time from the runs done so far.

    Model: seconds = k(shape) x samples x u(ranks). u(ranks), the wall time per sample at a rank count, is
    learned from all runs and interpolated linearly between rank counts (extrapolated from the nearest
    two beyond them): bigger rank counts take longer per sample once ranks outnumber cores, and the start-up
    of more processes costs more. k(shape) corrects it for runs of the same shape (mode, flags) once one
    has finished; runs of the same shape and rank count are simply averaged.
    """

    def __init__(self, seconds: dict | None = None):
        self.done = []   # (point, seconds)
        self.known = dict(seconds or {})   # name -> seconds (from earlier sweeps into the same folder)

    def add(self, point: Point, seconds: float) -> None:
        self.done.append((point, float(seconds)))
        self.known[point.name] = float(seconds)

    def adopt(self, point: Point) -> None:
        """Use a time recorded by an earlier sweep for a point already complete."""
        if point.name in self.known and all(p.name != point.name for p, _ in self.done):
            self.done.append((point, self.known[point.name]))

    @staticmethod
    def _interpolate(table: dict, x: float) -> float:
        xs = sorted(table)
        if len(xs) == 1:
            return table[xs[0]]
        if x <= xs[0]:
            lo, hi = xs[0], xs[1]
        elif x >= xs[-1]:
            lo, hi = xs[-2], xs[-1]
        else:
            hi = next(v for v in xs if v >= x)
            lo = max(v for v in xs if v <= x)
            if hi == lo:
                return table[lo]
        y = table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)
        return max(y, 0.5 * min(table[lo], table[hi]))

    def predict(self, point: Point) -> float | None:
        if not self.done:
            return None
        same = [s for p, s in self.done if p.shape == point.shape]
        if same:
            return sum(same) / len(same)
        per_ranks = {}
        for p, s in self.done:
            per_ranks.setdefault(p.ranks, []).append(s / expected_samples(p))
        u = self._interpolate({r: sum(v) / len(v) for r, v in per_ranks.items()}, point.ranks)
        ratios = [s / (expected_samples(p) * self._interpolate(
            {r: sum(v) / len(v) for r, v in per_ranks.items()}, p.ranks))
            for p, s in self.done if p.shape[1:] == point.shape[1:]]
        k = sum(ratios) / len(ratios) if ratios else 1.0
        return k * expected_samples(point) * u

    def remaining(self, points) -> tuple:
        """(seconds, how many of the points have no estimate)."""
        total, unknown = 0.0, 0
        for p in points:
            t = self.predict(p)
            if t is None:
                unknown += 1
            else:
                total += t
        return total, unknown


def load_times(out: Path) -> dict:
    try:
        data = json.loads((out / TIMES_FILE).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def save_times(out: Path, times: dict) -> None:
    """Merged with what is there: the tasks of a job array share the file."""
    times = dict(load_times(out), **times)
    tmp = out / f"{TIMES_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
    os.replace(tmp, out / TIMES_FILE)


# ----------------------------------------------------------------------------------------------------
# running


@dataclass
class Outcome:
    point: Point
    ok: bool
    seconds: float
    returncode: int
    output: str
    message: str = ""
    diverged: bool = False
    stopped: bool = False   # the scheduler ended it (time limit, preemption): to resume, not a failure


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = [line for line in text.rstrip().splitlines()][-lines:]
    return "\n".join("    | " + line for line in kept)


class Runner:
    def __init__(self, launcher: Launcher, python: str, out: Path, timeout: float | None):
        self.launcher = launcher
        self.python = python
        self.out = out
        self.timeout = timeout
        self.procs = set()
        self.lock = threading.Lock()
        self.stopping = False

    def env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def command(self, point: Point) -> list:
        return self.launcher.command(point.ranks, self.python, point.train_args(self.out / point.name)
                                     + (["--resume", "auto"] if checkpointed(point) else []))

    def run(self, point: Point) -> Outcome:
        from cnnpar import runlog

        path = self.out / point.name
        cmd = self.command(point)
        start = time.monotonic()
        with self.lock:
            if self.stopping:
                return Outcome(point, False, 0.0, -1, "", "interrupted")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=self.env(), start_new_session=True)
            self.procs.add(proc)
        try:
            output, _ = proc.communicate(timeout=self.timeout)
            message = ""
        except subprocess.TimeoutExpired:
            self.kill(proc)
            output, _ = proc.communicate()
            message = f"killed after the --timeout of {self.timeout:g} s"
        except Stopped:  # pass the signal on so the run can checkpoint, then make sure it ends
            self.kill(proc, first=signal.SIGUSR1, grace_s=STOP_GRACE_S)
            raise
        except BaseException:  # Ctrl-C: the run is in its own session, so it must be stopped here
            self.kill(proc)
            raise
        finally:
            with self.lock:
                self.procs.discard(proc)
        seconds = time.monotonic() - start
        rc = proc.returncode
        if self.stopping:
            return Outcome(point, False, seconds, rc, output or "", "interrupted")
        if rc != 0 and SCHEDULER_STOP.search(output or ""):
            return Outcome(point, False, seconds, rc, output or "", "stopped by the scheduler", stopped=True)
        ok = rc == 0 and not message and runlog.is_complete_log(path)
        if ok:
            drop_checkpoint(path)
        if not ok and not message and path.exists():
            try:
                log = runlog.open_log(path)
            except UserError:
                log = None
            if log is not None and log.status == "diverged":
                (self.out / DIVERGED_DIR).mkdir(exist_ok=True)
                os.replace(path, self.out / DIVERGED_DIR / point.name)
                return Outcome(point, False, seconds, rc, output or "", f"diverged ({log.status_message}); "
                               f"log kept in {DIVERGED_DIR}/", diverged=True)
        if rc == 0 and not message and not ok:
            message = "exited 0 but its log is missing or not complete"
        elif rc != 0 and not message:
            message = f"exit status {rc}"
        if not ok and path.exists():
            moved = move_aside(path, self.out, output or "", f"{shlex.join(cmd)}\n# {message}")
            message += f"; partial log moved to {moved}"
        return Outcome(point, ok, seconds, rc, output or "", message)

    @staticmethod
    def kill(proc, first=signal.SIGTERM, grace_s: float = KILL_GRACE_S) -> None:
        for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self, first=signal.SIGTERM, grace_s: float = KILL_GRACE_S) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            self.kill(proc, first, grace_s)


def checkpointed(point: Point) -> bool:
    """Whether the point's runs write checkpoints (a preset's `checkpoint_every`, or the flag after `--`):
    then a stopped run continues from its latest one (`--resume auto`) instead of starting over."""
    given = dict(point.base, **dict(point.named)).get("checkpoint_every")
    extra = [a for a in point.extra if a == "--checkpoint-every" or a.startswith("--checkpoint-every=")]
    return bool(given) or bool(extra)


def failure_signature(outcome: Outcome) -> tuple:
    """What makes two failures the same: the exit status and the first error line, numbers blanked."""
    lines = [line.strip() for line in outcome.output.splitlines() if line.strip()]
    first = next((line for line in lines if re.search(r"error|fatal|abort|traceback", line, re.I)),
                 lines[-1] if lines else outcome.message)
    return outcome.returncode, re.sub(r"\d+", "#", first)


class GiveUp(Exception):
    """The first runs of a sweep all failed the same way."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def final_accuracy(path: Path) -> float | None:
    from cnnpar import runlog

    try:
        log = runlog.open_log(path)
        return float(log.final["attrs"]["test_acc"]) if log.final else None
    except (UserError, KeyError, TypeError, ValueError):
        return None


# Wall seconds of one run on the 2-core reference machine, shared with other work (load ~10; measured, see
# launch/README.md): start-up + samples x per-sample time (sync), race/atomic slower by a factor that grows
# with the ranks (their per-step synchronisation when ranks outnumber cores).
PRIOR_STARTUP_S = {1: 5.0, 2: 6.0, 4: 8.0, 8: 8.0, 12: 10.0}
PRIOR_PER_SAMPLE_S = {1: 1.5e-4, 2: 2.0e-4, 4: 2.5e-4, 8: 1.5e-4, 12: 1.5e-4}
PRIOR_ONE_SIDED_FACTOR = {1: 1.0, 2: 2.0, 4: 3.0, 8: 7.0, 12: 7.0}


def prior_seconds(points) -> float:
    """A rough duration from timings on the 2-core reference machine, before any run of this sweep."""
    total = 0.0
    for p in points:
        startup = Estimator._interpolate(PRIOR_STARTUP_S, p.ranks)
        per_sample = Estimator._interpolate(PRIOR_PER_SAMPLE_S, p.ranks)
        factor = Estimator._interpolate(PRIOR_ONE_SIDED_FACTOR, p.ranks) \
            if is_race_mode(p.mode) else 1.0
        audit = 1.5 if dict(p.base).get("race_audit") == "true" else 1.0
        total += startup + expected_samples(p) * per_sample * factor * audit
    return total


def sweep(points, out: Path, launcher: Launcher, python: str, jobs: int = 1, timeout: float | None = None,
          dry_run: bool = False, preset: str | None = None, stream=None, task: int | None = None,
          slices: int = 1) -> int:
    """Run the points that have no complete log in `out`; with `task`, only that array task's slice of them
    (resumable.slice_of), beside the grid's other slices."""
    stream = stream or sys.stdout
    whole = list(points)
    if task is not None:
        print(f"sweep: array task {task} of {slices}: {len(slice_of(points, task, slices))} of the "
              f"{len(points)} runs", file=stream, flush=True)
        points = slice_of(points, task, slices)
    if dry_run:
        return _sweep(points, out, launcher, python, jobs, timeout, dry_run, preset, stream)
    out.mkdir(parents=True, exist_ok=True)
    with sliced(out, whole, task, slices) as notes:
        for note in notes:
            print(f"sweep: {note}", file=stream, flush=True)
        return _sweep(points, out, launcher, python, jobs, timeout, dry_run, preset, stream)


def _sweep(points, out, launcher, python, jobs, timeout, dry_run, preset, stream) -> int:
    def say(text=""):
        print(text, file=stream, flush=True)

    states = {}
    for p in points:
        states[p.name] = classify(out / p.name, p) if out.is_dir() else ("todo", "")
    conflicts = [(p, states[p.name][1]) for p in points if states[p.name][0] == "conflict"]
    if conflicts:
        listing = "; ".join(f"{p.name} ({detail})" for p, detail in conflicts[:3])
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise UserError(str(out), f"{len(conflicts)} complete log(s) there were made with other settings than "
                                  f"this sweep asks for: {listing}{more}. Use another --out, or move them away")
    live = [p.name for p in points if states[p.name][0] == "running"]
    if live:
        raise UserError(str(out / live[0]), f"is being written by a live process outside this sweep"
                        f"{f' (and {len(live) - 1} more)' if len(live) > 1 else ''}: stop it, or wait for it")
    done = [p for p in points if states[p.name][0] in ("done", "diverged")]
    stale = [p for p in points if states[p.name][0] == "stale"]
    resumed = [p for p in points if states[p.name][0] == "resumable"]
    todo = [p for p in points if states[p.name][0] not in ("done", "diverged")]
    estimator = Estimator(load_times(out) if out.is_dir() else {})
    for p in done:
        estimator.adopt(p)
    left, unknown = estimator.remaining(todo)
    if unknown:
        left = prior_seconds(todo) if not estimator.done else left + prior_seconds(
            [p for p in todo if estimator.predict(p) is None])
    left /= min(jobs, max(len(todo), 1))
    flavour = launcher.flavour + (f" {launcher.version}" if launcher.version else "")
    say(f"sweep{' ' + preset if preset else ''}: {len(points)} runs into {out}: {len(done)} already complete, "
        f"{len(todo)} to run{f' ({len(stale)} over incomplete leftovers)' if stale else ''}"
        f"{f' ({len(resumed)} resumed from their checkpoints)' if resumed else ''}; "
        f"estimated {hms(left) if todo else '0s'}{' (prior from the reference machine)' if unknown and todo else ''}")
    say(f"launcher: {shlex.join(launcher.argv)} ({flavour}); {launcher.cores} usable cores here")
    if dry_run:
        runner = Runner(launcher, python, out, timeout)
        for i, p in enumerate(points, 1):
            state, detail = states[p.name]
            note = {"done": "# skip: complete log exists", "diverged": f"# skip: diverged earlier "
                    f"({DIVERGED_DIR}/)", "stale": f"# rerun: leftover log ({detail}) "
                    "would be moved to incomplete/", "resumable": f"# resume: {detail}", "todo": ""}[state]
            say(f"[{i}/{len(points)}] {shlex.join(runner.command(p))}{'  ' + note if note else ''}")
        return 0
    if not todo:
        say("nothing to run.")
        return 0

    for p in stale:
        moved = move_aside(out / p.name, out, reason=f"leftover found by the sweep: {states[p.name][1]}")
        say(f"moved incomplete {p.name} ({states[p.name][1]}) to {moved.relative_to(out)}")

    runner = Runner(launcher, python, out, timeout)
    times = dict(estimator.known)
    failures, diverged = [], []
    succeeded = []
    lock = threading.Lock()
    counter = itertools.count(len(done) + 1)
    progress = Progress(todo, estimator, jobs, fallback=prior_seconds)
    pending = progress.pending

    def report(outcome: Outcome) -> None:
        with lock:
            i = next(counter)
            p = outcome.point
            progress.step(p)
            if outcome.ok:
                estimator.add(p, outcome.seconds)
                times[p.name] = outcome.seconds
                save_times(out, times)
                acc = final_accuracy(out / p.name)
                acc_text = f", test acc {100 * acc:.1f}%" if acc is not None else ""
                result = f"ok in {hms(outcome.seconds)}{acc_text}"
                succeeded.append(p)
            elif outcome.diverged:
                diverged.append(outcome)
                estimator.add(p, outcome.seconds)
                times[p.name] = outcome.seconds
                save_times(out, times)
                result = f"{outcome.message} after {hms(outcome.seconds)}"
            elif outcome.stopped:
                raise Stopped(f"the scheduler ({tail(outcome.output, 1).strip(' |')})")
            else:
                failures.append(outcome)
                result = f"FAILED after {hms(outcome.seconds)}: {outcome.message}"
            say(f"[{i}/{len(points)}] {p.name}: {result} | elapsed {hms(progress.elapsed_s())}, "
                f"left ~{hms(progress.left_s())}")
            if not outcome.ok and not outcome.diverged and outcome.message != "interrupted":
                say(f"    command: {shlex.join(runner.command(p))}")
                if outcome.output.strip():
                    say(tail(outcome.output))
            if not succeeded and not diverged and len(failures) >= STARTUP_FAILURE_LIMIT and \
                    len({failure_signature(f) for f in failures}) == 1:
                raise GiveUp(f"the first {len(failures)} runs all failed the same way ({failures[0].message}: "
                             f"{failure_signature(failures[0])[1]}), so the other {len(pending)} would too")

    pool = None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            previous[name] = signal.signal(getattr(signal, name), _raise_stopped)
    try:
        if jobs == 1:
            for p in todo:
                report(runner.run(p))
        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
            futures = [pool.submit(runner.run, p) for p in todo]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
            pool.shutdown()
    except KeyboardInterrupt:
        runner.stop_all()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        say(f"sweep: interrupted; {len(todo) - len(pending)} of {len(todo)} runs finished. Run the same "
            "command again to resume (complete logs are kept, the interrupted one is rerun).")
        return 130
    except Stopped as stop:
        runner.stop_all(signal.SIGUSR1, STOP_GRACE_S)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        say(f"sweep: stopped by {stop.why} (time limit or preemption); {len(todo) - len(pending)} of {len(todo)} "
            "runs finished. The requeued job, or the same command, resumes (complete logs are kept).")
        return EXIT_STOPPED
    except GiveUp as give_up:
        runner.stop_all()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        say(f"sweep: stopping: {give_up}. Fix that and run the same command again.")
        return 1
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)

    ok = len(todo) - len(failures) - len(diverged)
    say(f"sweep: {ok} run(s) done now, {len(done)} earlier, {len(failures)} failed"
        f"{f', {len(diverged)} diverged (logs in {DIVERGED_DIR}/)' if diverged else ''}; "
        f"{hms(progress.elapsed_s())}; logs in {out}")
    if failures:
        say("failed: " + ", ".join(f.point.name for f in failures))
        return 1
    say(f"next: cnnpar table {out}/*.h5 --paper   |   cnnpar plots {out}/*.h5 "
        f"--out {out}/figures" + (f"   |   cnnpar explain {out} --out {out}/report"
                                  if preset == "explain" else ""))
    return 0
