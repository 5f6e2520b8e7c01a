#!/usr/bin/env python3
"""How long a run takes to start, cold (no kernel cache) and warm, measured on the real trainer.

    cnnpar bench startup                  # n = 1, 2, 12 x cold, warm; 3 repeats -> analysis/results/startup.md
    cnnpar bench startup --quick          # CI: n = 1, 2, one repeat, 100 steps, into a temp folder
    cnnpar bench startup --ranks 1,12 --repeats 5 --out /tmp/startup

Each point is one `mpiexec -n N python -m cnnpar.train --log TMP/x.h5` (the default job: 3 epochs of
mnist-5k; --quick: --steps 100). Cold: CNNPAR_CACHE_DIR is a fresh empty folder, so every kernel
compiles; warm: the same folder straight after, so every kernel loads. The repeats interleave the points
(cold and warm of each n, then the next n) so a busy spell of a shared machine hits all of them alike;
medians are reported.

Measured from here: wall time (launch to exit), the first output line (any byte on stdout or stderr),
the job's CPU seconds (user + system of every rank and the launcher). From rank 0's start-up trace
($CNNPAR_STARTUP_TRACE, see cnnpar.progress.milestone), in seconds since launch: the process started
(`python`), its imports done (`imports`: numpy, numba, cnnpar), MPI initialised, ranks and nodes set up,
data loaded and the network built, kernels compiled or loaded, the exchange built, the first step
(`first step`) and the end of training with its evaluations; and the run's training samples/s from its
summary line.

Results: OUT/startup.md (the table, the split, the targets) and, as the last line on stdout, one JSON
object with every figure. OUT defaults to analysis/results (a temp folder for --quick, which is a check
that the benchmark works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


EVENTS = ("imported", "mpi_init", "ranks", "data", "kernels", "exchange", "first_step", "trained", "done")
SPLIT = (("python", None, "process_start"), ("imports", "process_start", "imported"),
         ("MPI init", "imported", "mpi_init"), ("ranks", "mpi_init", "ranks"), ("data", "ranks", "data"),
         ("kernels", "data", "kernels"), ("exchange", "kernels", "exchange"),
         ("to first step", "exchange", "first_step"), ("training + eval", "first_step", "trained"),
         ("close", "trained", "done"))
SUMMARY = re.compile(r"\((\d+) samples/s, training only\)")


def mpiexec() -> list:
    """The launcher next to this Python (the mpich wheel's), else the one on PATH; Open MPI gets the flags
    it needs for more ranks than cores (and for root, as in containers)."""
    from cnnpar.experiments.launchers import default_mpiexec, detect_flavour

    found = default_mpiexec()
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if detect_flavour(version)[0] == "openmpi":
        return [found, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [found]


def run_point(launcher: list, ranks: int, cache_dir: str, job_flags: list, work: str, timeout_s: float) -> dict:
    """One launch; returns its figures (times in seconds since launch)."""
    trace = os.path.join(work, f"trace-{ranks}-{time.monotonic_ns()}.jsonl")
    log = os.path.join(work, f"run-{ranks}-{time.monotonic_ns()}.h5")
    env = dict(os.environ, CNNPAR_CACHE_DIR=cache_dir, CNNPAR_STARTUP_TRACE=trace, PYTHONUNBUFFERED="1")
    env.pop("NUMBA_CACHE_DIR", None)
    command = launcher + ["-n", str(ranks), sys.executable, "-m", "cnnpar.train", "--log", log] + job_flags
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first_byte = process.stdout.read(1)
    first_output = time.time() - launched if first_byte else None
    try:
        rest, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise SystemExit(f"bench_startup: error: {ranks} ranks ran past {timeout_s:.0f} s")
    wall = time.time() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = (first_byte + rest).decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"bench_startup: error: the run with {ranks} ranks failed (exit {process.returncode}):\n"
                         f"{output[-2000:]}")
    match = SUMMARY.search(output)
    point = {"ranks": ranks, "wall_s": wall, "first_output_s": first_output,
             "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
             "samples_per_s": float(match.group(1)) if match else None,
             "compile_notice": "compiling numba kernels" in output}
    try:
        with open(trace) as f:
            record = json.loads(f.readline())
        marks = {name: t - launched for name, t in record["events"]}
        if record.get("process_start"):
            marks["process_start"] = record["process_start"] - launched
        point["marks"] = marks
    except (OSError, ValueError, KeyError):
        point["marks"] = {}
    for path in (trace, log):
        if os.path.exists(path):
            os.remove(path)
    return point


def split_of(marks: dict) -> dict:
    parts = {}
    for name, start, end in SPLIT:
        t0 = 0.0 if start is None else marks.get(start)
        t1 = marks.get(end)
        parts[name] = None if t0 is None or t1 is None else t1 - t0
    return parts


def median_point(points: list) -> dict:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out = {key: med([p[key] for p in points]) for key in ("wall_s", "first_output_s", "cpu_s", "samples_per_s")}
    out["first_step_s"] = med([p["marks"].get("first_step") for p in points])
    splits = [split_of(p["marks"]) for p in points]
    out["split_s"] = {name: med([s[name] for s in splits]) for name, _, _ in SPLIT}
    out["compile_notice"] = all(p["compile_notice"] for p in points)
    out["repeats"] = len(points)
    return out


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(results: dict, ranks: list) -> list:
    """(target, measured, met) rows for the issue's targets that these ranks allow."""
    rows = []
    cold = {n: results[f"cold-{n}"] for n in ranks}
    warm = {n: results[f"warm-{n}"] for n in ranks}
    if 1 in ranks:
        rows.append(("`-n 1` cold wall <= 10 s", f"{fmt(cold[1]['wall_s'])} s", cold[1]["wall_s"] <= 10))
        rows.append(("`-n 1` warm wall <= 1.2 s", f"{fmt(warm[1]['wall_s'])} s", warm[1]["wall_s"] <= 1.2))
    if 1 in ranks and 12 in ranks:
        ratio = cold[12]["wall_s"] / cold[1]["wall_s"]
        rows.append(("`-n 12` cold wall <= 1.3x `-n 1` cold", f"{ratio:.2f}x", ratio <= 1.3))
    if 12 in ranks:
        rows.append(("default 12-rank job warm <= 4 s", f"{fmt(warm[12]['wall_s'])} s", warm[12]["wall_s"] <= 4))
    for n in ranks:
        if cold[n]["samples_per_s"] and warm[n]["samples_per_s"]:
            ratio = cold[n]["samples_per_s"] / warm[n]["samples_per_s"]
            rows.append((f"first run's samples/s within 20% of warm, n={n}", f"{ratio:.2f}", abs(ratio - 1) <= 0.2))
    worst = max(p["first_output_s"] or 0 for p in results.values())
    rows.append(("first output line <= 2 s, cold or warm", f"{worst:.2f} s (worst point)", worst <= 2))
    return rows


def markdown(results: dict, ranks: list, command: str, machine: str) -> str:
    lines = ["# Start-up: cold (no kernel cache) and warm", "",
             f"`{command}` on {machine}. Medians over the repeats; times in seconds since launch.", "",
             "| n | cache | wall s | first output s | first step s | job CPU s | samples/s | compile notice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ranks:
        for kind in ("cold", "warm"):
            p = results[f"{kind}-{n}"]
            lines.append(f"| {n} | {kind} | {fmt(p['wall_s'])} | {fmt(p['first_output_s'])} | {fmt(p['first_step_s'])} "
                         f"| {fmt(p['cpu_s'], 1)} | {fmt(p['samples_per_s'], 0)} | {'yes' if p['compile_notice'] else 'no'} |")
    lines += ["", "Rank 0's split (seconds; `python` = launch to the interpreter starting, `kernels` = compile "
              "or cache load, `training + eval` = the loop with its evaluations):", "",
              "| n | cache | " + " | ".join(name for name, _, _ in SPLIT) + " |",
              "| --- | --- | " + " | ".join("---" for _ in SPLIT) + " |"]
    for n in ranks:
        for kind in ("cold", "warm"):
            split = results[f"{kind}-{n}"]["split_s"]
            lines.append(f"| {n} | {kind} | " + " | ".join(fmt(split[name]) for name, _, _ in SPLIT) + " |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(results, ranks)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Cold and warm start-up of the trainer for a few rank counts: "
                                        "a Markdown table and, last on stdout, one JSON object.")
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2,12; --quick 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats, medians reported "
                                                                  "(default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="CI check that the benchmark works: n = 1, 2, "
                                                             "one repeat, --steps 100, output in a temp folder")
    parser.add_argument("--out", default=None, help="folder for startup.md (default analysis/results; "
                                                    "--quick: a temp folder)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take (default 900)")
    parser.add_argument("train_flags", nargs="*", help="after --: flags for cnnpar.train (default: the "
                                                       "default job; --quick: --steps 100)")
    args = parser.parse_args(argv)
    try:
        ranks = [int(v) for v in (args.ranks or ("1,2" if args.quick else "1,2,12")).split(",") if v.strip()]
    except ValueError:
        parser.error(f"--ranks: expected comma-separated integers, got {args.ranks!r}")
    if not ranks or min(ranks) < 1:
        parser.error("--ranks: every rank count must be >= 1")
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats: must be >= 1")
    job_flags = args.train_flags or (["--steps", "100"] if args.quick else [])
    launcher = mpiexec()
    work = tempfile.mkdtemp(prefix="cnnpar-startup-")
    if args.out:
        out = Path(args.out)
    else:  # --quick checks that the benchmark works: it never overwrites the measured results
        out = Path(tempfile.mkdtemp(prefix="cnnpar-startup-quick-")) if args.quick else Path("analysis") / "results"
    points: dict = {}
    try:
        for repeat in range(repeats):
            for n in ranks:
                cache = tempfile.mkdtemp(prefix="cache-", dir=work)
                for kind in ("cold", "warm"):
                    point = run_point(launcher, n, cache, job_flags, work, args.timeout)
                    points.setdefault(f"{kind}-{n}", []).append(point)
                    print(f"repeat {repeat + 1}/{repeats} n={n} {kind}: wall {point['wall_s']:.2f} s, first output "
                          f"{fmt(point['first_output_s'])} s, cpu {point['cpu_s']:.1f} s", file=sys.stderr, flush=True)
                shutil.rmtree(cache, ignore_errors=True)
        results = {key: median_point(value) for key, value in points.items()}
        import platform

        machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, {os.path.basename(launcher[0])}"
        command = "cnnpar bench startup " + " ".join(argv if argv is not None else sys.argv[1:])
        out.mkdir(parents=True, exist_ok=True)
        (out / "startup.md").write_text(markdown(results, ranks, command.strip(), machine))
        print(f"bench_startup: wrote {out / 'startup.md'}", file=sys.stderr)
        summary = {"ranks": ranks, "repeats": repeats, "job_flags": job_flags, "results": results,
                   "targets": [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in targets(results, ranks)],
                   "out": str(out / "startup.md")}
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
