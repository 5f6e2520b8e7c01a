#!/usr/bin/env python3
"""How training throughput scales with ranks, per gradient exchange, measured on the real trainer.

    cnnpar bench scaling                    # ranks 1,2,4,8,12 x exchanges x samples/rank 1,16
    cnnpar bench scaling --vs-ddp           # ... and PyTorch DDP (gloo), same net and semantics
    cnnpar bench scaling --quick            # CI: ranks 1,2, a few hundred steps; checks it works
    cnnpar bench scaling --micro            # exchange microbenchmark (fake compute + reduce)

Every trainer point is one `mpiexec -n N python -m cnnpar.train --steps S --log DIR/x.h5 --quiet ...` run;
the figures come from its HDF5 log: /final samples_per_s (training time only) and the per-step, per-rank
compute_s / exchange_s / wait_s columns (means over ranks and over the steps after the first 10%).
`other` is the rest of a step's wall time (the SGD update, the loop's Python, statistics windows,
replica checks): step = global batch / samples_per_s.

Exchanges: mpi, shm, factored (1 sample per rank only), auto, hier (2 pretend nodes, only with --exchanges), local (--mode local, no exchange:
the compute-only bound) and the race modes race and atomic. With --repeats R
the whole grid runs R times, interleaved (so slow phases of a shared machine hit every point alike), and the
median of each point is reported.

Results: OUT/scaling.md (tables, the split, the targets with their ratios), OUT/scaling.h5 (one group per
point with every figure) and, as the last line on stdout, one JSON object with every figure.
--micro writes OUT/exchange_micro.md and .json instead. OUT defaults to runs/bench-scaling (runs/ is not
committed); the project's measured results live in analysis/results and are replaced only when asked:
`--out analysis/results`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnpar.bench import SOURCE_ROOT
from cnnpar.modes import ONE_SIDED_MODES, is_race_mode

RANKS = (1, 2, 4, 8, 12)
SAMPLES = (1, 16)
BASE_EXCHANGES = ("mpi", "shm", "factored", "auto", "local")
ONE_SAMPLE_ONLY = ("factored",)  # sends one sample's sufficient factors: refused with more per rank
RACE_EXCHANGES = ONE_SIDED_MODES
TARGET_SAMPLES = {1: 30_000, 16: 60_000}   # samples per trainer run (~1-2 s of training)
MIN_STEPS = 300


def exchange_flags(exchange: str) -> list:
    if exchange in ("mpi", "shm", "factored", "auto", "hier"):
        flags = ["--mode", "sync", "--allreduce", exchange]
        return flags + (["--pretend-nodes", "2"] if exchange == "hier" else [])
    if exchange == "local" or is_race_mode(exchange):
        return ["--mode", exchange]
    raise SystemExit(f"bench_scaling: unknown exchange {exchange!r}")


LAUNCH_FLAGS: list = []  # extra mpiexec flags (--launch-flags), e.g. "-bind-to core"


def mpiexec() -> str:
    from cnnpar.experiments.launchers import default_mpiexec

    return default_mpiexec()


def run_command(command: list, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    if env:
        full_env.update(env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


# ------------------------------------------------------------------------------------------------------
# trainer runs

def trainer_point(n: int, k: int, exchange: str, steps: int, workdir: Path, extra: list, timeout: float) -> dict:
    log = workdir / f"n{n:02d}-k{k:02d}-{exchange}-{time.monotonic_ns()}.h5"
    command = [mpiexec(), *LAUNCH_FLAGS, "-n", str(n), sys.executable, "-m", "cnnpar.train", "--steps", str(steps),
               "--samples-per-rank", str(k), "--log", str(log), "--quiet", "--eval-every", "0",
               *exchange_flags(exchange), *extra]
    load_before = load_average()
    started = time.perf_counter()
    proc = run_command(command, timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed (n={n}, k={k}, {exchange}), exit {proc.returncode}:\n"
                           f"{' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    point = read_log(log)
    point.update(ranks=n, samples_per_rank=k, exchange=exchange, steps=steps, run_wall_s=wall,
                 load_before=load_before, load_after=load_average())
    log.unlink(missing_ok=True)
    return point


def read_log(path: Path) -> dict:
    import numpy as np

    try:
        from cnnpar.runlog import open_log
    except ImportError:  # pragma: no cover - the log reader is part of the package
        open_log = None
    if open_log is not None:
        log = open_log(path)
        steps = {name: np.asarray(log.steps[name]) for name in ("compute_s", "exchange_s", "wait_s", "samples")}
        final = dict(log.final["attrs"]) if log.final is not None else {}
        env = dict(log.env)
    else:
        import h5py

        with h5py.File(path, "r") as f:
            steps = {name: f["steps"][name][:] for name in ("compute_s", "exchange_s", "wait_s", "samples")}
            final = dict(f["final"].attrs)
            env = {}
    samples_per_s = float(final["samples_per_s"])
    skip = len(steps["compute_s"]) // 10
    split = {name[:-2] + "_us": float(np.nanmean(steps[name][skip:]) * 1e6)
             for name in ("compute_s", "exchange_s", "wait_s")}
    global_batch = float(np.mean(steps["samples"][skip:]))
    step_us = global_batch / samples_per_s * 1e6 if samples_per_s > 0 else math.nan
    split["step_us"] = step_us
    split["other_us"] = step_us - split["compute_us"] - split["exchange_us"] - split["wait_us"]
    return {"samples_per_s": samples_per_s, "train_time_s": float(final.get("train_time_s", math.nan)),
            "oversubscribed": bool(env.get("oversubscribed", False)), "wait_mode": env.get("wait", ""), **split}


def steps_for(n: int, k: int, quick: bool) -> int:
    if quick:
        return 150
    return max(MIN_STEPS, TARGET_SAMPLES[k] // (n * k))


# ------------------------------------------------------------------------------------------------------
# PyTorch DDP (gloo): same network, same SGD-on-the-sum semantics

DDP_WORKER = r'''
import json, os, sys, time
import numpy as np
import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[5])
from cnnpar.data import load_dataset
from cnnpar.launcher import launcher_rank, launcher_tasks
rank, size = launcher_rank() or 0, (launcher_tasks() or (1, ""))[0]  # any launcher's variables, not one's
port, k, steps, warm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
data = load_dataset("mnist-5k")
images = torch.from_numpy(np.ascontiguousarray(data.train_images, np.float32))
labels = torch.from_numpy(data.train_labels.astype(np.int64))
torch.manual_seed(0)
# cnnpar's 'small': conv 1->8 5x5, relu, 2x2 max-pool, dense 1152->10
model = DDP(nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1152, 10)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
n = len(labels)
order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
def step(i):
    start = (i * size * k + rank * k) % (n - k)
    idx = order[start:start + k]
    opt.zero_grad(set_to_none=False)
    # DDP averages gradients over ranks; x size makes the step use their sum, as cnnpar --reduce sum does
    loss = F.cross_entropy(model(images[idx]), labels[idx], reduction="sum") * size
    loss.backward()
    opt.step()
for i in range(warm):
    step(i)
dist.barrier()
t0 = time.perf_counter()
for i in range(steps):
    step(warm + i)
elapsed = time.perf_counter() - t0
elapsed = torch.tensor([elapsed], dtype=torch.float64)
dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
if rank == 0:
    print(json.dumps({"samples_per_s": size * k * steps / float(elapsed[0]), "steps": steps}), flush=True)
dist.barrier()
sys.stdout.flush()
os._exit(0)  # gloo's teardown at 12 ranks sometimes aborts ("terminate called ..."); the figure is out already
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_point(n: int, k: int, steps: int, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix="_ddp_worker.py", delete=False) as fh:
        fh.write(DDP_WORKER)
        script = fh.name
    try:
        command = [mpiexec(), *LAUNCH_FLAGS, "-n", str(n), sys.executable, script, str(free_port()), str(k), str(steps),
                   str(max(20, steps // 10)), str(SOURCE_ROOT)]
        proc = run_command(command, timeout, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    finally:
        os.unlink(script)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"DDP run failed (n={n}, k={k}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    line = lines[-1]
    result = json.loads(line)
    result.update(ranks=n, samples_per_rank=k, exchange="ddp-gloo")
    return result


def ddp_steps(n: int, k: int, quick: bool) -> int:
    return 30 if quick else max(100, (1500 if k == 1 else 4000) // (n * k))


# ------------------------------------------------------------------------------------------------------
# reporting

def median_points(runs: list) -> list:
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["samples_per_rank"], run["exchange"], run["ranks"]), []).append(run)
    merged = []
    for key in sorted(groups):
        items = sorted(groups[key], key=lambda r: r["samples_per_s"])
        mid = dict(items[len(items) // 2])
        mid["repeats"] = len(items)
        mid["samples_per_s_all"] = [r["samples_per_s"] for r in groups[key]]
        merged.append(mid)
    return merged


def lookup(points: list, k: int, exchange: str, n: int) -> float:
    for p in points:
        if p["samples_per_rank"] == k and p["exchange"] == exchange and p["ranks"] == n:
            return p["samples_per_s"]
    return math.nan


def targets(runs: list, ddp_runs: list, ranks: list) -> list:
    """The targets as (name, value, threshold, passed). Each ratio is formed within one repeat (the two
    points ran minutes apart under the same conditions) and the median over repeats is reported."""
    out = []
    repeats = sorted({r.get("repeat", 0) for r in runs})

    def ratio(num, den):
        values = []
        for rep in repeats:
            a = lookup([r for r in num[0] if r.get("repeat", 0) == rep], *num[1:])
            b = lookup([r for r in den[0] if r.get("repeat", 0) == rep], *den[1:])
            if not (math.isnan(a) or math.isnan(b)) and b > 0:
                values.append(a / b)
        return (statistics.median(values) if values else math.nan), values

    def add(name, num, den, threshold):
        value, values = ratio(num, den)
        out.append({"target": name, "value": value, "per_repeat": values, "threshold": threshold,
                    "passed": bool(value >= threshold) if not math.isnan(value) else None})

    for ex in ("auto", "shm"):
        if 1 in ranks and 2 in ranks:
            add(f"k=1 {ex}: n=2 / n=1", (runs, 1, ex, 2), (runs, 1, ex, 1), 1.6)
            add(f"k=16 {ex}: n=2 / n=1", (runs, 16, ex, 2), (runs, 16, ex, 1), 1.85)
        if 12 in ranks:
            add(f"k=1 {ex}: n=12 / local bound n=12", (runs, 1, ex, 12), (runs, 1, "local", 12), 0.5)
            if 1 in ranks:
                add(f"k=1 {ex}: n=12 / n=1", (runs, 1, ex, 12), (runs, 1, ex, 1), 1.0)
    for k, threshold in ((1, 40.0), (16, 5.0)):
        for n in (1, 2, 12):
            if any(d["samples_per_rank"] == k and d["ranks"] == n for d in ddp_runs):
                add(f"k={k} n={n}: auto / DDP gloo", (runs, k, "auto", n), (ddp_runs, k, "ddp-gloo", n), threshold)
    return out


def fmt(value, digits=0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(points: list, ddp: list, goals: list, meta: dict) -> str:
    lines = ["# Scaling benchmark: samples/s of the real trainer", "",
             f"Machine: {meta['machine']}; {meta['cores']} usable cores; MPI {meta['mpi']}; "
             f"load average {fmt(meta['load_start'], 2)} at start, {fmt(meta['load_end'], 2)} at end "
             f"(the machine is shared: read ratios within this run, not absolute figures across runs). "
             f"Repeats per point: {meta['repeats']} (median shown). Command: `{meta['command']}`.", ""]
    ranks = sorted({p["ranks"] for p in points} | {p["ranks"] for p in ddp})
    for k in sorted({p["samples_per_rank"] for p in points}):
        lines += [f"## {k} sample{'s' if k > 1 else ''} per rank: samples/s", "",
                  "| exchange | " + " | ".join(f"n={n}" for n in ranks) + " |",
                  "|---|" + "---:|" * len(ranks)]
        exchanges = [e for e in dict.fromkeys(p["exchange"] for p in points if p["samples_per_rank"] == k)]
        for ex in exchanges:
            lines.append(f"| {ex} | " + " | ".join(fmt(lookup(points, k, ex, n)) for n in ranks) + " |")
        if any(d["samples_per_rank"] == k for d in ddp):
            lines.append("| PyTorch DDP gloo | " + " | ".join(fmt(lookup(ddp, k, "ddp-gloo", n)) for n in ranks)
                         + " |")
        lines += ["", f"Per-step split (us, mean over ranks and steps), k={k}: compute / exchange / wait / other "
                      "(= step - the three) / step", "",
                  "| exchange | " + " | ".join(f"n={n}" for n in ranks) + " |", "|---|" + "---|" * len(ranks)]
        for ex in exchanges:
            cells = []
            for n in ranks:
                p = next((q for q in points if q["samples_per_rank"] == k and q["exchange"] == ex
                          and q["ranks"] == n), None)
                cells.append("-" if p is None else
                             f"{p['compute_us']:.0f} / {p['exchange_us']:.0f} / {p['wait_us']:.0f} / "
                             f"{p['other_us']:.0f} / {p['step_us']:.0f}")
            lines.append(f"| {ex} | " + " | ".join(cells) + " |")
        lines.append("")
    if meta.get("failures"):
        lines += ["## Failed points", ""] + [f"* {f['point']}: {f['error'][-300:]!r}" for f in meta["failures"]]
        lines.append("")
    if goals:
        lines += ["## Targets", "", "Ratios formed within each repeat, median over repeats.", "",
                  "| target | value (median) | per repeat | threshold | met |", "|---|---:|---|---:|---|"]
        for g in goals:
            met = {True: "yes", False: "NO", None: "-"}[g["passed"]]
            per = ", ".join(f"{v:.2f}" for v in g.get("per_repeat", []))
            lines.append(f"| {g['target']} | {fmt(g['value'], 2)} | {per} | {g['threshold']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def write_h5(path: Path, points: list, ddp: list, meta: dict) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        for key, value in meta.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        for group_name, items in (("trainer", points), ("ddp", ddp)):
            group = f.create_group(group_name)
            for p in items:
                g = group.create_group(f"k{p['samples_per_rank']:02d}-{p['exchange']}-n{p['ranks']:02d}")
                for key, value in p.items():
                    if isinstance(value, list):
                        g.create_dataset(key, data=np.asarray(value, dtype=float))
                    elif value is not None:
                        g.attrs[key] = value


# ------------------------------------------------------------------------------------------------------
# exchange microbenchmark: fake compute + reduce, every exchange variant, interleaved rounds

def micro_worker(passes: int, steps: int, rounds: int, split: float, only: str = "") -> None:
    """Runs under mpiexec. Rank 0 prints one JSON line per variant."""
    from cnnpar import dist as dist_lib

    dist_lib.pin_threads()
    import numpy as np
    from mpi4py import MPI
    from numba import njit

    from types import SimpleNamespace

    from cnnpar.exchange import make_exchange
    from cnnpar.exchange import shm as X
    from cnnpar.exchange.local import LocalExchange
    from cnnpar.exchange.mpi import MpiAllreduce

    fake = njit(nogil=True, cache=True)(_fake_compute)
    d = dist_lib.setup()
    m = 11_738
    dense_lo = 208  # the small arch: conv weights+bias first (208), the dense layer after (11,530)

    variants = {"local": lambda: LocalExchange(), "mpi": lambda: MpiAllreduce(d)}
    if d.size > 1:
        waits = ("block", "yield-block", "yield", "spin") if d.yield_when_waiting else ("spin", "block")
        for protocol in ("slices", "single", "all"):
            for wait in waits:
                variants[f"shm-{protocol}-{wait}"] = (
                    lambda p=protocol, w=wait: X.ShmAllreduce(d, m, comm=d.comm, wait=w, protocol=p))
        if not d.yield_when_waiting:  # slot copies with ordinary vs streaming stores (auto probes the distance)
            for protocol in ("all", "slices"):
                for nt in (False, True):
                    variants[f"shm-{protocol}-spin-{'streaming' if nt else 'plain'}"] = (
                        lambda p=protocol, nt=nt: X.ShmAllreduce(d, m, comm=d.comm, wait="spin", protocol=p,
                                                                 nontemporal=nt))
        if d.yield_when_waiting:  # how many sched_yield calls before sleeping on the futex
            for protocol in ("single", "slices"):
                for y in (1, 16, 64):
                    variants[f"shm-{protocol}-yield{y}-block"] = (
                        lambda p=protocol, y=y: _with_yields(X.ShmAllreduce(d, m, comm=d.comm, wait="block",
                                                                            protocol=p), y))
        auto = SimpleNamespace(mode="sync", allreduce="auto")
        variants["auto"] = lambda: make_exchange(auto, d, m)
        pretend = dist_lib.setup(pretend_nodes=2)
        variants["hier(2 pretend nodes)"] = lambda: X.HierAllreduce(pretend, m)
        variants["mpi+overlap"] = "overlap-mpi"
        variants["auto+overlap"] = "overlap-auto"
    if d.yield_when_waiting:
        variants["mpi wait=yield+sleep"] = "mpi-sleepy"
        variants["mpi wait=Wait()"] = "mpi-wait"

    prefixes = [p for p in only.split(",") if p]
    if prefixes:
        variants = {k: v for k, v in variants.items() if any(k.startswith(p) for p in prefixes)}
    work = np.ones(m, np.float32)
    grads = np.ones(m, np.float32)
    first = max(1, int(passes * split))
    rest = max(0, passes - first)
    results: dict = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            overlap = None
            if make == "overlap-mpi":
                ex, overlap = MpiAllreduce(d), "mpi"
            elif make == "overlap-auto":
                ex, overlap = make_exchange(auto, d, m), "shm"
            elif make == "mpi-sleepy":
                ex = MpiAllreduce(d)
                ex._dist = _WaitWith(_wait_yield_then_sleep)
            elif make == "mpi-wait":
                ex = MpiAllreduce(d)
                ex._dist = _WaitWith(lambda request: request.Wait())
            else:
                ex = make()
            red = np.zeros(steps)
            wt = np.zeros(steps)
            total = 0.0
            for phase in ("warm", "timed"):
                count = min(100, steps) if phase == "warm" else steps
                d.comm.Barrier()
                usage0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                for i in range(count):
                    grads[:] = 1.0
                    if overlap is None:
                        fake(work, passes)
                        t = time.perf_counter()
                        w = ex.reduce(grads)
                    else:  # dense gradients ready after `split` of the compute: start on them, finish later
                        fake(work, first)
                        if overlap == "mpi":
                            request = d.comm.Iallreduce(MPI.IN_PLACE, grads[dense_lo:], MPI.SUM)
                            fake(work, rest)
                            t = time.perf_counter()
                            d.comm.Allreduce(MPI.IN_PLACE, grads[:dense_lo], MPI.SUM)
                            d.wait(request)
                            w = math.nan
                        else:
                            begin = getattr(ex, "reduce_begin", None)
                            if begin is not None:
                                begin(grads, dense_lo, m)
                            fake(work, rest)
                            t = time.perf_counter()
                            w = ex.reduce_end(grads) if begin is not None else ex.reduce(grads)
                    if phase == "timed":
                        red[i] = time.perf_counter() - t
                        wt[i] = w
                if phase == "timed":
                    total = d.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
                    usage1 = resource.getrusage(resource.RUSAGE_SELF)
                    # CPU time and context switches per step, summed over ranks: independent of other load
                    cpu = d.comm.allreduce((usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime)
                                           / steps)
                    vcsw = d.comm.allreduce((usage1.ru_nvcsw - usage0.ru_nvcsw) / steps)
                    ivcsw = d.comm.allreduce((usage1.ru_nivcsw - usage0.ru_nivcsw) / steps)
            ex.close()
            reduce_all = np.asarray(d.comm.gather(red, root=0))
            wait_all = np.asarray(d.comm.gather(wt, root=0))
            if d.rank == 0:
                finite = wait_all[np.isfinite(wait_all)]
                results[name].append({
                    "samples_per_s": d.size * steps / total, "step_us": total / steps * 1e6,
                    "reduce_us": float(np.median(reduce_all) * 1e6),
                    "reduce_mean_us": float(reduce_all.mean() * 1e6),
                    "wait_us": float(np.median(finite) * 1e6) if finite.size else None,
                    "exchange_us": float(np.median(reduce_all - np.where(np.isfinite(wait_all), wait_all, 0)) * 1e6)
                    if finite.size else None,
                    "cpu_us_per_step": cpu * 1e6, "voluntary_switches_per_step": vcsw,
                    "involuntary_switches_per_step": ivcsw,
                    "cpu_bound_samples_per_s": d.size / (cpu / min(d.size, len(os.sched_getaffinity(0)))),
                    "nontemporal": getattr(ex, "nontemporal", None),
                    "policy": getattr(ex, "wait_policy", None), "protocol": getattr(ex, "protocol", None),
                    "class": type(ex).__name__})
    if d.rank == 0:
        for name, items in results.items():
            items.sort(key=lambda r: r["samples_per_s"])
            mid = dict(items[len(items) // 2])
            mid.update(variant=name, ranks=d.size, oversubscribed=d.oversubscribed, rounds=len(items),
                       samples_per_s_all=[r["samples_per_s"] for r in items])
            print(json.dumps(mid), flush=True)


def _fake_compute(work, passes):
    """Stand-in for forward+backward: a fixed amount of arithmetic on a gradient-sized array (CPU time,
    not wall time, so a rank that is descheduled still owes the same work)."""
    for _ in range(passes):
        for i in range(work.shape[0]):
            work[i] = work[i] * 0.999 + 0.001


def _with_yields(exchange, yields: int):
    exchange._yields = yields
    exchange.wait_policy = f"yield{yields}-block"
    return exchange


class _WaitWith:
    yield_when_waiting = True

    def __init__(self, fn):
        self.wait = fn


def _wait_yield_then_sleep(request) -> None:
    """Candidate for dist.wait_for: yield for ~20 polls, then sleep with growing naps (50 us .. 0.5 ms)."""
    test = request.Test
    polls = 0
    while not test():
        if polls < 20:
            os.sched_yield()
        else:
            time.sleep(min(50e-6 * (polls - 19), 500e-6))
        polls += 1


def calibrate_passes(target_us: float) -> int:
    import numpy as np
    from numba import njit

    fake = njit(nogil=True, cache=True)(_fake_compute)
    work = np.ones(11_738, np.float32)
    fake(work, 1)
    best = math.inf
    for _ in range(100):
        t = time.perf_counter()
        fake(work, 10)
        best = min(best, (time.perf_counter() - t) / 10)
    return max(1, round(target_us * 1e-6 / best))


def micro(args) -> dict:
    passes = calibrate_passes(args.compute_us)
    rows = []
    for n in args.micro_ranks:
        command = [mpiexec(), *LAUNCH_FLAGS, "-n", str(n), sys.executable, str(Path(__file__).resolve()),
                   "--micro-worker",
                   "--passes", str(passes), "--micro-steps", str(args.micro_steps), "--repeats", str(args.repeats),
                   "--micro-variants", args.micro_variants]
        proc = run_command(command, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"micro worker failed at n={n}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                r = rows[-1]
                print(f"n={n:2d} {r['variant']:24s} {r['samples_per_s']:9.0f} samples/s  reduce median "
                      f"{r['reduce_us']:7.1f} us  wait {fmt(r['wait_us'], 1)}  cpu/step {r['cpu_us_per_step']:7.1f} "
                      f"us  cpu-bound {r['cpu_bound_samples_per_s']:8.0f}  csw {r['voluntary_switches_per_step']:.1f}"
                      f"/{r['involuntary_switches_per_step']:.1f}", file=sys.stderr, flush=True)
    meta = {"compute_us": args.compute_us, "passes": passes, "steps": args.micro_steps, "rounds": args.repeats,
            "machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "load_end": load_average(), "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Exchange microbenchmark", "",
             f"Each step: {args.compute_us:.0f} us of fake compute (calibrated on an idle core), then the "
             f"exchange of 11,738 float32. {args.micro_steps} timed steps per variant, {args.repeats} interleaved "
             f"rounds, median round shown. reduce = time in reduce() (median over steps and ranks), wait = the "
             f"part the exchange measured as waiting for other ranks. Load average at the end: "
             f"{fmt(meta['load_end'], 2)}.", "",
             "CPU us/step is the CPU time all ranks together spent per step (getrusage), and `CPU bound` the "
             "samples/s the cores could sustain at that cost (ranks / (CPU per step / min(ranks, cores))): "
             "unlike wall-clock figures it hardly depends on what else runs on a shared machine. Switches: "
             "voluntary / involuntary context switches per step, all ranks together.", "",
             "| ranks | variant | samples/s | step us | reduce us (median) | of which wait | CPU us/step | "
             "CPU bound samples/s | switches v/i |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['variant']} | {fmt(r['samples_per_s'])} | {fmt(r['step_us'], 1)} | "
                     f"{fmt(r['reduce_us'], 1)} | {fmt(r['wait_us'], 1)} | {fmt(r['cpu_us_per_step'], 1)} | "
                     f"{fmt(r['cpu_bound_samples_per_s'])} | {fmt(r['voluntary_switches_per_step'], 1)} / "
                     f"{fmt(r['involuntary_switches_per_step'], 1)} |")
    (out / "exchange_micro.md").write_text("\n".join(lines) + "\n")
    figures = {"micro": True, "meta": meta, "rows": rows}
    (out / "exchange_micro.json").write_text(json.dumps(figures, indent=1))
    return figures


# ------------------------------------------------------------------------------------------------------

def default_out_dir(quick: bool) -> Path:
    """Where results go unless --out says otherwise: never the committed analysis/results."""
    return Path("runs") / ("bench-scaling-quick" if quick else "bench-scaling")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2,4,8,12)")
    parser.add_argument("--samples-per-rank", default=None, help="comma-separated (default 1,16)")
    parser.add_argument("--exchanges", default=None,
                        help="comma-separated: mpi,shm,factored,auto,hier,local,race,atomic (default "
                             "mpi,shm,factored,auto,local,race,atomic)")
    parser.add_argument("--steps", type=int, default=0, help="trainer steps per point (default: ~30k samples "
                        "for k=1, 60k for k=16, at least 300 steps)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the median is reported")
    parser.add_argument("--vs-ddp", action="store_true", help="also run PyTorch DDP (gloo) on the same net")
    parser.add_argument("--quick", action="store_true", help="CI: ranks 1,2, k=1, auto/mpi/local, 150 steps, no DDP")
    parser.add_argument("--micro", action="store_true", help="exchange microbenchmark instead of the trainer")
    parser.add_argument("--micro-ranks", default="2,4,12", help="--micro: comma-separated rank counts (default "
                        "2,4,12)")
    parser.add_argument("--micro-steps", type=int, default=2000, help="--micro: exchange steps per variant "
                        "(default 2000)")
    parser.add_argument("--compute-us", type=float, default=40.0, help="--micro: fake compute per step")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mpiexec run")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for scaling.md/.json/.h5 (default runs/bench-scaling, or "
                             "runs/bench-scaling-quick with --quick; pass analysis/results to replace the "
                             "committed results)")
    parser.add_argument("--launch-flags", default="", help="extra mpiexec flags, e.g. '-bind-to core'")
    parser.add_argument("--micro-variants", default="", help="--micro: only variants starting with these "
                        "comma-separated prefixes")
    parser.add_argument("--from-runs", default="", help="rebuild the report from OUT/scaling_runs.jsonl of a "
                        "finished or interrupted run instead of running anything")
    parser.add_argument("--micro-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--overlap-split", type=float, default=0.6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    LAUNCH_FLAGS[:] = args.launch_flags.split()
    if args.micro_worker:
        micro_worker(args.passes, args.micro_steps, args.repeats, args.overlap_split, args.micro_variants)
        return 0
    if args.out is None:
        args.out = str(default_out_dir(args.quick))
    if args.from_runs:  # rebuild the report from a journal of an earlier run
        rows = [json.loads(line) for line in Path(args.from_runs).read_text().splitlines() if line.strip()]
        runs = [r for r in rows if r["exchange"] != "ddp-gloo"]
        ddp_runs = [r for r in rows if r["exchange"] == "ddp-gloo"]
        meta = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                "mpi": "", "load_start": math.nan, "load_end": math.nan,
                "repeats": len({r.get("repeat", 0) for r in runs}), "quick": False,
                "command": f"cnnpar bench scaling --from-runs {args.from_runs} (report rebuilt)"}
        beside = Path(args.from_runs).with_name("scaling.json")
        if beside.exists():  # keep the original run's machine, load and command
            meta.update(json.loads(beside.read_text()).get("meta", {}))
            meta["command"] += " (report rebuilt with --from-runs)"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return report(runs, ddp_runs, sorted({r["ranks"] for r in runs}), meta, [], out, False)
    if args.micro:
        args.micro_ranks = [int(x) for x in args.micro_ranks.split(",")]
        figures = micro(args)
        print(json.dumps(figures))
        return 0

    ranks = [int(x) for x in (args.ranks or ("1,2" if args.quick else ",".join(map(str, RANKS)))).split(",")]
    ks = [int(x) for x in (args.samples_per_rank or ("1" if args.quick else "1,16")).split(",")]
    if args.exchanges:
        exchanges = args.exchanges.split(",")
    elif args.quick:
        exchanges = ["auto", "mpi", "local"]
    else:
        exchanges = list(BASE_EXCHANGES) + list(RACE_EXCHANGES)
    for ex in exchanges:
        exchange_flags(ex)

    meta = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "mpi": "", "load_start": load_average(), "repeats": args.repeats, "quick": args.quick,
            "command": " ".join(["python", "cnnpar bench scaling", *(argv if argv is not None else sys.argv[1:])])}
    try:
        from mpi4py import MPI  # noqa: F401 - only for the library version; no MPI job in this process

        meta["mpi"] = MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]
    except Exception:  # pragma: no cover
        pass

    runs, ddp_runs, failures = [], [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = (out / "scaling_runs.jsonl").open("w")  # every run as it completes, in case the grid is cut short

    def attempt(what: str, fn):
        try:
            return fn()
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # one failed point must not lose the grid
            failures.append({"point": what, "error": str(err)[-1500:]})
            print(f"bench_scaling: {what} failed: {str(err)[-400:]}", file=sys.stderr, flush=True)
            return None

    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        workdir = Path(tmp)
        for repeat in range(args.repeats):
            for k in ks:
                for n in ranks:
                    for ex in exchanges:
                        if k > 1 and ex in ONE_SAMPLE_ONLY:
                            continue
                        steps = args.steps or steps_for(n, k, args.quick)
                        point = attempt(f"k={k} n={n} {ex}",
                                        lambda: trainer_point(n, k, ex, steps, workdir, [], args.timeout))
                        if point is None:
                            continue
                        point["repeat"] = repeat
                        runs.append(point)
                        journal.write(json.dumps(point) + "\n")
                        journal.flush()
                        print(f"k={k:2d} n={n:2d} {ex:7s} {point['samples_per_s']:9.0f} samples/s  step "
                              f"{point['step_us']:7.1f} us = compute {point['compute_us']:.1f} + exchange "
                              f"{point['exchange_us']:.1f} + wait {point['wait_us']:.1f} + other "
                              f"{point['other_us']:.1f}", file=sys.stderr, flush=True)
                    if args.vs_ddp:
                        d = attempt(f"k={k} n={n} ddp",
                                    lambda: ddp_point(n, k, ddp_steps(n, k, args.quick), args.timeout))
                        if d is None:
                            continue
                        d["repeat"] = repeat
                        ddp_runs.append(d)
                        journal.write(json.dumps(d) + "\n")
                        journal.flush()
                        print(f"k={k:2d} n={n:2d} ddp-gloo {d['samples_per_s']:9.0f} samples/s", file=sys.stderr,
                              flush=True)
    journal.close()
    meta["load_end"] = load_average()
    return report(runs, ddp_runs, ranks, meta, failures, out, args.quick)


def report(runs: list, ddp_runs: list, ranks: list, meta: dict, failures: list, out: Path, quick: bool) -> int:
    points, ddp = median_points(runs), median_points(ddp_runs)
    goals = targets(runs, ddp_runs, ranks)
    meta["failures"] = failures
    (out / "scaling.md").write_text(markdown(points, ddp, goals, meta))
    write_h5(out / "scaling.h5", points, ddp, meta)
    figures = {"quick": quick, "meta": meta, "runs": points, "ddp": ddp, "targets": goals}
    (out / "scaling.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
