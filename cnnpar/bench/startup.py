#!/usr/bin/env python3
"""How long a run takes to start, cold (no kernel cache) and warm, measured on the real trainer.

    cnnpar bench startup                  # n = 1, 2, 12 x floor, cold, warm; 3 repeats -> analysis/results/startup.md
    cnnpar bench startup --quick          # CI: n = 1, 2, one repeat, 100 steps, into a temp folder
    cnnpar bench startup --ranks 1,12 --repeats 5 --out /tmp/startup

Each point is one `mpiexec -n N python -m cnnpar.train --log TMP/x.h5` (the default job: 3 epochs of
mnist-5k; --quick: --steps 100). Cold: CNNPAR_CACHE_DIR is a fresh empty folder, so every kernel
compiles; warm: the same folder straight after, so every kernel loads. The repeats interleave the points
(the import-only floor, cold and warm of each n, then the next n) so a busy spell of a shared machine hits all of them alike;
medians are reported.

Measured from here: wall time (launch to exit), the first output line (any byte on stdout or stderr),
the job's CPU seconds (user + system of every rank and the launcher), and beside every point, in the same
interleaved repeat, the import-only floor `mpiexec -n N python -c "from mpi4py import MPI; import numpy,
numba, h5py"`. From every rank's start-up trace ($CNNPAR_STARTUP_TRACE, see cnnpar.progress.milestone):
each phase's wall seconds on rank 0 and on the slowest rank and its CPU seconds summed over the ranks
(interpreter and package, imports, MPI init, ranks and nodes, numba import with the data and network,
kernels, exchange, log open, the first window of steps, training with its evaluations, log close, MPI
finalise, atexit, and from the last rank's exit mark to the launcher's exit), and the parts inside them
(the big imports, numba's target set-up, each kernel's load or compile, the data load, the evaluations);
and the run's training samples/s from its summary line.

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


# (phase, from milestone, to milestone) in the order a run passes them; None: the launch (or, for the last
# phase, the launcher's exit). See cnnpar.progress's start-up trace.
PHASES = (("launch to python", None, "process_start"), ("interpreter + cnnpar package", "process_start", "package"),
          ("imports (numpy, cnnpar)", "package", "imported"), ("mpi4py + MPI init", "imported", "mpi_init"),
          ("ranks and nodes", "mpi_init", "ranks"), ("numba import, data, network", "ranks", "data"),
          ("kernels (target, loads or compile)", "data", "kernels"), ("exchange set-up", "kernels", "exchange"),
          ("log open, optimizer", "exchange", "first_step"), ("first window of steps", "first_step", "first_window"),
          ("training + evaluation", "first_window", "trained"), ("final check, log close", "trained", "log_closed"),
          ("summary line", "log_closed", "done"), ("MPI finalise", "done", "finalized"),
          ("atexit handlers", "finalized", "exit"), ("interpreter exit, launcher", "exit", None))
SUMMARY = re.compile(r"\((\d+) samples/s, training only\)")
FLOOR_CODE = "from mpi4py import MPI; import numpy, numba, h5py"


def mpiexec() -> list:
    """The launcher next to this Python (the mpich wheel's), else the one on PATH; Open MPI gets the flags
    it needs for more ranks than cores (and for root, as in containers)."""
    from cnnpar.experiments.launchers import default_mpiexec, detect_flavour

    found = default_mpiexec()
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if detect_flavour(version)[0] == "openmpi":
        return [found, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [found]


def _launch(command: list, env: dict, what: str, timeout_s: float) -> tuple:
    """Run one job; returns (wall s, first output s or None, job CPU s, output text, launch time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first_byte = process.stdout.read(1)
    first_output = time.time() - launched if first_byte else None
    try:
        rest, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise SystemExit(f"bench_startup: error: {what} ran past {timeout_s:.0f} s")
    wall = time.time() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = (first_byte + rest).decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"bench_startup: error: {what} failed (exit {process.returncode}):\n{output[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, first_output, cpu, output, launched


def run_floor(launcher: list, ranks: int, timeout_s: float) -> dict:
    """The import-only floor: the job's launcher, interpreters, MPI and big imports, and nothing else."""
    command = launcher + ["-n", str(ranks), sys.executable, "-c", FLOOR_CODE]
    env = dict(os.environ)
    env.pop("CNNPAR_STARTUP_TRACE", None)
    wall, _, cpu, _, _ = _launch(command, env, f"the import-only floor at {ranks} ranks", timeout_s)
    return {"ranks": ranks, "wall_s": wall, "cpu_s": cpu}


def run_point(launcher: list, ranks: int, cache_dir: str, job_flags: list, work: str, timeout_s: float) -> dict:
    """One launch; returns its figures (times in seconds since launch) and every rank's trace."""
    trace = os.path.join(work, f"trace-{ranks}-{time.monotonic_ns()}.jsonl")
    log = os.path.join(work, f"run-{ranks}-{time.monotonic_ns()}.h5")
    env = dict(os.environ, CNNPAR_CACHE_DIR=cache_dir, CNNPAR_STARTUP_TRACE=trace, PYTHONUNBUFFERED="1")
    env.pop("NUMBA_CACHE_DIR", None)
    command = launcher + ["-n", str(ranks), sys.executable, "-m", "cnnpar.train", "--log", log] + job_flags
    wall, first_output, cpu, output, launched = _launch(command, env, f"the run with {ranks} ranks", timeout_s)
    match = SUMMARY.search(output)
    point = {"ranks": ranks, "wall_s": wall, "first_output_s": first_output, "cpu_s": cpu,
             "samples_per_s": float(match.group(1)) if match else None,
             "compile_notice": "compiling numba kernels" in output}
    point["per_rank"] = rank_traces(trace, launched, wall)
    point["marks"] = point["per_rank"][0]["marks"] if 0 in point["per_rank"] else {}
    for path in (trace, log):
        if os.path.exists(path):
            os.remove(path)
    return point


def rank_traces(path: str, launched: float, wall_s: float) -> dict:
    """world rank -> {"marks": {milestone: s since launch}, "cpu": {milestone: CPU s}, "spans": ...}. A helper
    process (a lone rank's compile helper) writes no record: it never reaches a milestone."""
    ranks = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ranks
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("rank") is None:
            continue
        marks = {name: t - launched for name, t, _ in record["events"]}
        cpu = {name: c for name, _, c in record["events"]}
        if record.get("process_start"):
            marks["process_start"] = record["process_start"] - launched
            cpu["process_start"] = 0.0
        ranks[record["rank"]] = {"marks": marks, "cpu": cpu, "spans": record.get("spans", {}), "end_s": wall_s}
    return ranks


def phases_of(per_rank: dict) -> dict:
    """phase -> {"rank0_s", "slowest_s" (wall, the slowest rank), "cpu_s" (summed over ranks)}; the last
    phase runs from the last rank's exit mark to the launcher's exit (its CPU: not seen by the ranks)."""
    parts = {}
    last_exit = max((r["marks"].get("exit", 0.0) for r in per_rank.values()), default=None)
    for name, start, end in PHASES:
        walls, cpus = {}, []
        for rank, record in per_rank.items():
            marks, cpu = record["marks"], record["cpu"]
            t0 = 0.0 if start is None else marks.get(start)
            t1 = record["end_s"] if end is None else marks.get(end)
            if t0 is None or t1 is None:
                continue
            walls[rank] = t1 - t0
            if start is not None and end is not None and start in cpu and end in cpu:
                cpus.append(cpu[end] - cpu[start])
        if end is None and last_exit is not None:
            walls = {rank: record["end_s"] - last_exit for rank, record in per_rank.items()}
        parts[name] = {"rank0_s": walls.get(0), "slowest_s": max(walls.values()) if walls else None,
                       "cpu_s": sum(cpus) if cpus else None}
    return parts


def spans_of(per_rank: dict) -> dict:
    """span -> {"median_s": wall, median over the ranks that ran it, "cpu_s": summed over ranks, "ranks"}."""
    names = sorted({name for record in per_rank.values() for name in record["spans"]})
    out = {}
    for name in names:
        values = [record["spans"][name] for record in per_rank.values() if name in record["spans"]]
        out[name] = {"median_s": statistics.median(v[0] for v in values), "cpu_s": sum(v[1] for v in values),
                     "ranks": len(values)}
    return out


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_point(points: list) -> dict:
    out = {key: _median([p[key] for p in points]) for key in ("wall_s", "first_output_s", "cpu_s", "samples_per_s")}
    out["first_step_s"] = _median([p["marks"].get("first_step") for p in points])
    out["traced_cpu_s"] = _median([sum(r["cpu"].get("exit", 0.0) for r in p["per_rank"].values()) or None
                                   for p in points])
    phases = [phases_of(p["per_rank"]) for p in points]
    out["phases"] = {name: {key: _median([ph[name][key] for ph in phases]) for key in ("rank0_s", "slowest_s", "cpu_s")}
                     for name, _, _ in PHASES}
    spans = [spans_of(p["per_rank"]) for p in points]
    names = sorted({name for sp in spans for name in sp})
    out["spans"] = {name: {key: _median([sp[name][key] for sp in spans if name in sp])
                           for key in ("median_s", "cpu_s", "ranks")} for name in names}
    out["compile_notice"] = all(p["compile_notice"] for p in points)
    out["repeats"] = len(points)
    return out


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(results: dict, floors: dict, ranks: list) -> list:
    """(target, measured, met) rows for the targets that these ranks allow."""
    rows = []
    cold = {n: results[f"cold-{n}"] for n in ranks}
    warm = {n: results[f"warm-{n}"] for n in ranks}
    if 1 in ranks:
        rows.append(("`-n 1` cold wall <= 10 s", f"{fmt(cold[1]['wall_s'])} s", cold[1]["wall_s"] <= 10))
        rows.append(("`-n 1` warm wall <= 1.2 s", f"{fmt(warm[1]['wall_s'])} s", warm[1]["wall_s"] <= 1.2))
    if 1 in ranks and 12 in ranks:
        ratio = cold[12]["wall_s"] / cold[1]["wall_s"]
        rows.append(("`-n 12` cold wall <= 1.3x `-n 1` cold", f"{ratio:.2f}x", ratio <= 1.3))
    for n in ranks:
        ratio = warm[n]["wall_s"] / floors[n]["wall_s"]
        cpu_ratio = warm[n]["cpu_s"] / floors[n]["cpu_s"]
        rows.append((f"`-n {n}` warm wall <= 1.3x the import-only floor", f"{ratio:.2f}x (CPU {cpu_ratio:.2f}x)",
                     ratio <= 1.3))
    if 12 in ranks:
        rows.append(("default 12-rank job warm <= 4 s", f"{fmt(warm[12]['wall_s'])} s", warm[12]["wall_s"] <= 4))
    for n in ranks:
        if cold[n]["samples_per_s"] and warm[n]["samples_per_s"]:
            ratio = cold[n]["samples_per_s"] / warm[n]["samples_per_s"]
            rows.append((f"first run's samples/s within 20% of warm, n={n}", f"{ratio:.2f}", abs(ratio - 1) <= 0.2))
    worst = max(p["first_output_s"] or 0 for p in results.values())
    rows.append(("first output line <= 2 s, cold or warm", f"{worst:.2f} s (worst point)", worst <= 2))
    return rows


def markdown(results: dict, floors: dict, ranks: list, command: str, machine: str) -> str:
    points = [(n, kind) for n in ranks for kind in ("cold", "warm")]
    lines = ["# Start-up: cold (no kernel cache) and warm, phase by phase", "",
             f"`{command}` on {machine}. Medians over the repeats, which interleave the points (per n: the "
             f"import-only floor, cold, warm); times in seconds since launch.", "",
             "| n | job | wall s | first output s | first step s | job CPU s | samples/s | compile notice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ranks:
        lines.append(f"| {n} | import-only floor | {fmt(floors[n]['wall_s'])} | - | - | {fmt(floors[n]['cpu_s'], 1)} "
                     f"| - | - |")
        for kind in ("cold", "warm"):
            p = results[f"{kind}-{n}"]
            lines.append(f"| {n} | {kind} | {fmt(p['wall_s'])} | {fmt(p['first_output_s'])} | {fmt(p['first_step_s'])} "
                         f"| {fmt(p['cpu_s'], 1)} | {fmt(p['samples_per_s'], 0)} | {'yes' if p['compile_notice'] else 'no'} |")
    lines += ["", f"The import-only floor is `mpiexec -n N python -c \"{FLOOR_CODE}\"`.", "",
              "Phase by phase, every rank: `rank 0 s / slowest rank s / CPU s summed over the ranks` (wall "
              "seconds of the phase; CPU from each rank's own clock, so the last phase, after the ranks' "
              "last mark, has none):", "",
              "| phase | " + " | ".join(f"n={n} {kind}" for n, kind in points) + " |",
              "| --- | " + " | ".join("---" for _ in points) + " |"]
    for name, _, _ in PHASES:
        cells = []
        for n, kind in points:
            ph = results[f"{kind}-{n}"]["phases"][name]
            cells.append(f"{fmt(ph['rank0_s'])} / {fmt(ph['slowest_s'])} / {fmt(ph['cpu_s'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{fmt(results[f'{kind}-{n}']['traced_cpu_s'])} of {fmt(results[f'{kind}-{n}']['cpu_s'])}"
             for n, kind in points]
    lines.append("| CPU the ranks saw, of the job's | " + " | ".join(cells) + " |")
    names = sorted({name for p in results.values() for name in p["spans"]})
    lines += ["", "Inside the phases (`median over the ranks that ran it s / CPU s summed over the ranks`; an "
              "import is counted without the timed imports nested in it; `numba target` is numba's CPU "
              "target set-up, `kernel X` its compile or cache load):", "",
              "| part | " + " | ".join(f"n={n} {kind}" for n, kind in points) + " |",
              "| --- | " + " | ".join("---" for _ in points) + " |"]
    for name in names:
        cells = []
        for n, kind in points:
            sp = results[f"{kind}-{n}"]["spans"].get(name)
            cells.append("-" if sp is None else f"{fmt(sp['median_s'])} / {fmt(sp['cpu_s'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(results, floors, ranks)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Cold and warm start-up of the trainer for a few rank counts, phase by "
                                        "phase on every rank, beside the import-only floor: a Markdown table "
                                        "and, last on stdout, one JSON object.")
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
    floor_points: dict = {}
    try:
        for repeat in range(repeats):
            for n in ranks:
                floor = run_floor(launcher, n, args.timeout)
                floor_points.setdefault(n, []).append(floor)
                print(f"repeat {repeat + 1}/{repeats} n={n} import-only floor: wall {floor['wall_s']:.2f} s, "
                      f"cpu {floor['cpu_s']:.1f} s", file=sys.stderr, flush=True)
                cache = tempfile.mkdtemp(prefix="cache-", dir=work)
                for kind in ("cold", "warm"):
                    point = run_point(launcher, n, cache, job_flags, work, args.timeout)
                    points.setdefault(f"{kind}-{n}", []).append(point)
                    print(f"repeat {repeat + 1}/{repeats} n={n} {kind}: wall {point['wall_s']:.2f} s, first output "
                          f"{fmt(point['first_output_s'])} s, cpu {point['cpu_s']:.1f} s", file=sys.stderr, flush=True)
                shutil.rmtree(cache, ignore_errors=True)
        results = {key: median_point(value) for key, value in points.items()}
        floors = {n: {key: _median([f[key] for f in values]) for key in ("wall_s", "cpu_s")}
                  for n, values in floor_points.items()}
        import platform

        machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, {os.path.basename(launcher[0])}"
        command = "cnnpar bench startup " + " ".join(argv if argv is not None else sys.argv[1:])
        out.mkdir(parents=True, exist_ok=True)
        (out / "startup.md").write_text(markdown(results, floors, ranks, command.strip(), machine))
        print(f"bench_startup: wrote {out / 'startup.md'}", file=sys.stderr)
        summary = {"ranks": ranks, "repeats": repeats, "job_flags": job_flags, "results": results,
                   "floors": {str(n): f for n, f in floors.items()},
                   "targets": [{"target": t, "measured": m, "met": bool(ok)}
                               for t, m, ok in targets(results, floors, ranks)],
                   "out": str(out / "startup.md")}
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
