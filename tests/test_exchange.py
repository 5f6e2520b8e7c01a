"""The sync gradient exchanges (mpi, shm, hier, auto): exact sums, agreement, safe close, and the benchmark.

The MPI checks run tests/mpi_exchange_driver.py under mpiexec (one job per rank count runs every exchange);
the synchronisation kernels are also checked in-process with threads, which share memory exactly as the
ranks' processes share the window."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from numba import njit

from cnnpar.exchange import primitives as P
from cnnpar.exchange import shm as X
from mpi_util import REPO, run_mpi

DRIVER = REPO / "tests" / "mpi_exchange_driver.py"
FIXED_ORDER = {"rank_order", "node_order"}
CLASS_KERNELS = {"MpiAllreduce": "", "ShmAllreduce": "shm", "HierAllreduce": "shm", "FactoredShmAllreduce": "factored"}


def _driver_results(n: int, steps: int = 25) -> dict:
    proc = run_mpi(n, [DRIVER, "--steps", str(steps)], timeout=120)
    assert proc.returncode == 0, f"driver failed at n={n}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("done"), proc.stdout[-2000:]
    return {line["exchange"]: line for line in lines[:-1]}, lines[-1]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_exchange_sums_like_mpi_allreduce(n):
    results, summary = _driver_results(n)
    assert summary["ranks"] == n
    expected = {"mpi", "shm", "auto"}
    if n > 1:
        waits = ("spin", "block", "yield", "yield-block") if n <= 3 else (None,)
        expected |= {f"shm-{p}-{w}" for p in ("slices", "single", "all") for w in waits}
        expected |= {"shm-short-slices", "hier", "hier-spin", "hier-block", "auto-pretend", "shm-pretend"}
        expected |= {f"shm-overlap-{p}" for p in ("slices", "single", "all")}
        expected |= {f"shm-{p}-streaming" for p in ("slices", "all")}
    assert expected <= set(results), sorted(expected - set(results))
    for label, result in results.items():
        # within float32 summation-order tolerance of MPI_Allreduce on every step (the driver raises otherwise)
        assert result["worst_err_over_bound"] <= 1.0, label
        if result["reference"] in FIXED_ORDER:  # and bitwise equal to the fixed-order numpy sum on every step
            assert result["bitwise_steps"] == result["steps"], label
    # the warm-up compiles the kernels of what the factory builds, on one node and across pretend nodes
    forecast = {label: result["forecast"] for label, result in results.items() if "forecast" in result}
    assert {"shm", "auto"} <= set(forecast) and (n == 1 or {"hier", "auto-pretend", "shm-pretend"} <= set(forecast))
    for label, kernels in forecast.items():
        assert CLASS_KERNELS[results[label]["class"]] == kernels, label
    # what each choice builds
    if n == 1:
        assert results["auto"]["class"] == results["shm"]["class"] == "MpiAllreduce"
    else:
        assert results["auto"]["class"] == "ShmAllreduce"
        # pretend nodes stand for real ones: hier, unless every node holds one rank (then plain MPI)
        assert results["auto-pretend"]["class"] == ("HierAllreduce" if n >= 3 else "MpiAllreduce")
        assert results["hier"]["class"] == "HierAllreduce"
        assert results["shm-pretend"]["class"] == "ShmAllreduce"  # pretend nodes do share memory
        for label in ("shm", "auto") + tuple(k for k in results if k.startswith("shm-")):
            assert results[label]["wait_measured"], f"{label} must measure its own wait"
        assert results["shm-short-slices"]["resumed"] >= 1, "a late rank must make a 1 ms wait slice resume"
        oversubscribed = summary["oversubscribed"]
        assert results["auto"]["policy"] == ("yield-block" if oversubscribed else "spin")


def test_the_warm_up_forecasts_the_factory_s_choice_for_the_node_layout():
    from cnnpar.exchange import KERNELS, choose
    from cnnpar.warmup import exchange_kernels

    # one node: factored at one float32 sample per rank, else shm; across nodes hier, or mpi at one rank a node
    assert exchange_kernels("sync", "auto", 4, 1, "float32") == "factored"
    assert exchange_kernels("sync", "auto", 4, 2, "float32") == "shm"
    assert exchange_kernels("sync", "auto", 4, 1, "float32", nodes=2) == KERNELS["hier"] == "shm"
    assert exchange_kernels("sync", "auto", 4, 1, "float32", nodes=4) == KERNELS["mpi"] == ""
    assert exchange_kernels("sync", "auto", 5, 1, "float32", nodes=4, max_node_size=2) == "shm"
    assert exchange_kernels("sync", "mpi", 4, 1, "float32") == exchange_kernels("sync", "auto", 1, 1) == ""
    for mode in ("race", "atomic", "hogwild"):
        assert exchange_kernels(mode, "auto", 4, 1, nodes=2) == "race"
    assert exchange_kernels("local", "auto", 4, 1) == ""
    # the factory's questions are asked only where the answer matters (they are collectives there)
    def never():
        raise AssertionError("asked")
    assert choose("sync", "auto", 4, 1, never, lambda: False) == "shm"
    assert choose("sync", "auto", 4, 2, lambda: 2, never) == "hier"
    assert choose("sync", "shm", 4, 2, never, never) == "shm"


def test_slices_partition_the_parameters():
    for m in (1, 15, 16, 17, 11_738, 100_000):
        for n in (1, 2, 3, 7, 12, 40):
            parts = X._slices(m, n)
            assert len(parts) == n
            assert parts[0][0] == 0 and parts[-1][1] == m
            for (lo, hi), (lo2, _) in zip(parts, parts[1:]):
                assert lo <= hi == lo2
            assert all(lo % 16 == 0 for lo, hi in parts if lo < m)


def test_atomic_primitives():
    ctrl = np.zeros(16, np.int64)

    @njit
    def probe(c):
        old = P.fetch_add(c, 3, 5)
        now = P.load_acquire(c, 3)
        t0 = P.now_ns()
        P.cpu_relax()
        P.sched_yield()
        again = P.futex(c, 8, P.FUTEX_WAIT, 12345, 1_000_000) if P.HAVE_FUTEX else -1  # value differs: returns
        return old, now, P.now_ns() - t0, again

    old, now, elapsed, again = probe(ctrl)
    assert (old, now) == (0, 5) and ctrl[3] == 5
    assert 0 <= elapsed < 50_000_000
    assert again == -1  # EAGAIN at once (the word is 0, not 12345), never a 1 ms sleep
    ctrl[:] = 0
    X.warm_kernels()


@pytest.mark.parametrize("protocol", ["slices", "single", "all"])
@pytest.mark.parametrize("yields", [0, 4, -1])  # sleep at once; yield 4 times then sleep; only yield
def test_kernels_synchronise_threads(protocol, yields):
    """n threads play n ranks on one control block and slot array, for many steps, with random delays:
    the nogil kernels run truly in parallel, like processes on a shared window."""
    if yields >= 0 and not P.HAVE_FUTEX:
        pytest.skip("no futex on this platform")
    n, m, steps = 3, 1000, 300
    rows = 2 * n if protocol == "all" else n
    ctrl = np.zeros(P.N_FIELDS * P.LINE, np.int64)
    slots = np.zeros((rows, 1024), np.float32)
    result = np.zeros(1024, np.float32)
    bounds = X._slices(m, n)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((steps, n, m)).astype(np.float32) * np.float32(1e3) ** rng.integers(
        -2, 2, (steps, n, m)).astype(np.float32)
    outputs = np.zeros((steps, n, m), np.float32)
    delays = rng.random((steps, n)) < 0.05
    errors = []

    def rank_main(r):
        try:
            for s in range(steps):
                if delays[s, r]:
                    time.sleep(0.001)
                g = inputs[s, r].copy()
                lo, hi = bounds[r]
                phase = P.PH_START
                while phase != P.PH_FINISHED:
                    code = X._shm_step(ctrl, slots, result, g, r, n, lo, hi, s + 1, phase, 2000 if r == 0 else 0,
                                       yields, X.PROTOCOLS[protocol], False, 5_000_000, 0, 0,
                                       P.IS_X86 and r == 1)  # rank 1 writes its slot with streaming stores
                    phase = code & 7
                outputs[s, r] = g
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a thread is stuck: lost wake-up or ordering bug"
    expected = inputs[:, 0].copy()
    for r in range(1, n):
        expected += inputs[:, r]
    for r in range(n):
        assert np.array_equal(outputs[:, r].view(np.uint32), expected.view(np.uint32))


def test_quick_benchmark_runs(tmp_path):
    if importlib.util.find_spec("cnnpar.data") is None:
        pytest.skip("the trainer's data module (cnnpar/data.py) is not in this tree yet")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench_scaling.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["quick"] is True
    runs = figures["runs"]
    assert {(r["ranks"], r["exchange"]) for r in runs} >= {(1, "auto"), (2, "auto"), (2, "mpi"), (2, "local")}
    for run in runs:
        assert run["samples_per_s"] > 0, run
    assert (tmp_path / "scaling.md").exists() and (tmp_path / "scaling.h5").exists()
