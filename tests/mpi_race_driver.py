"""MPI driver for tests/test_race.py and launch/bench_race.py: run under mpiexec -n N.

    python mpi_race_driver.py check             race/atomic x shared/rma: results, audit, rotation, close
    python mpi_race_driver.py hogwild           shared params, racy updates, audit
    python mpi_race_driver.py contention WINDOW:MODE:SIZE:ROUNDS ...
                                                every rank adds ones at once; one JSON line per spec (rank 0)
    python mpi_race_driver.py choose MODE WINDOW [PRETEND_NODES]
                                                make_race_exchange under a layout; prints the window chosen

Failures raise AssertionError; a failure on any rank aborts the job (non-zero exit).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnnpar import dist as dist_lib  # noqa: E402
from cnnpar.exchange import race  # noqa: E402
from cnnpar.config import Config  # noqa: E402

P = 11_738  # the small architecture's parameter count


def _say(dist, *parts) -> None:
    if dist.is_root:
        print(*parts, flush=True)


def _same_everywhere(comm, array) -> bool:
    reference = comm.bcast(array if comm.Get_rank() == 0 else None, root=0)
    return comm.allreduce(int(np.array_equal(reference.view(np.uint32), array.view(np.uint32))), op=MPI.MIN) == 1


def _grads(rank: int, step: int, size: int = P) -> np.ndarray:
    rng = np.random.default_rng(1000 * step + rank)
    g = rng.standard_normal(size).astype(np.float32)
    g[rng.random(size) < 0.3] = 0.0  # gradients have many exact zeros (relu, max-pool)
    return g


def check(dist) -> None:
    """Both windows x race/atomic, audit on and off: every rank gets the same sum; n=1 returns the gradient
    bit for bit; atomic equals the exact sum within float32 summation tolerance and its audit shows no
    loss; race's audit is self-consistent; the three accumulators rotate correctly under random skew (the
    owner among the slow ones); close() twice is fine and frees every window."""
    comm, n = dist.comm, dist.size
    windows = ["shared", "rma"] if dist.n_nodes == 1 else ["rma"]
    steps = 8
    jitter = np.random.default_rng(77 + dist.rank)
    for window in windows:
        for op in ("race", "atomic"):
            for audit in (False, True):
                config = Config(mode=op, race_window=window, race_audit=audit)
                ex = race.make_race_exchange(config, dist, P)
                assert ex.window == window and ex.name == op
                params = np.zeros(P, np.float32)
                assert ex.bind(params) is params
                for step in range(steps):
                    own = _grads(dist.rank, step)
                    every = np.stack([_grads(r, step) for r in range(n)])
                    time.sleep(jitter.random() * 0.003)  # skew arrivals: the rotation must not care
                    got = own.copy()
                    waited = ex.reduce(got)
                    assert waited >= 0.0
                    assert (ex.excluded_s > 0.0) == audit, (audit, ex.excluded_s)
                    assert _same_everywhere(comm, got), f"{window}/{op}: ranks read different sums"
                    if n == 1:
                        assert np.array_equal(got.view(np.uint32), own.view(np.uint32)), "n=1 must be bitwise"
                    exact, deficit, tol, differ, lost = race.lost_per_element(every, got)
                    if op == "atomic":
                        assert not differ.any(), f"atomic lost updates at step {step} ({window})"
                    if n <= 2:  # a + b == b + a: with two terms the order cannot matter
                        if op == "atomic":
                            assert np.array_equal(got, functools_sum(every)), "atomic n<=2 must be exact"
                    time.sleep(jitter.random() * 0.002 if dist.rank == 0 else 0.0)
                rows = ex.drain_audit()
                if audit and dist.is_root:
                    assert rows is not None and len(rows["step"]) == steps
                    assert list(rows["step"]) == list(range(steps))
                    _check_audit_rows(rows, n, P, lossless=(op == "atomic"))
                    assert ex.drain_audit() is None, "drain_audit must empty the rows"
                else:
                    assert rows is None
                win = ex._acc.win
                ex.close()
                ex.close()  # twice is fine
                assert win == MPI.WIN_NULL, "close() must free the window"
                _say(dist, f"ok {window} {op} audit={audit} n={n}")


def functools_sum(every: np.ndarray) -> np.ndarray:
    total = np.full(every.shape[1], -0.0, np.float32)
    for row in every:
        total = total + row
    return total


def _check_audit_rows(rows, n, size, lossless, params_audit=False) -> None:
    rel, frac, lost = rows["rel_l2_error"], rows["frac_elements_differ"], rows["lost_contributions"]
    assert np.all(rel >= 0) and np.all((frac >= 0) & (frac <= 1)) and np.all(lost >= 0)
    # an element differs iff at least one contribution is missing from it; each misses at most n-1
    assert np.array_equal(frac == 0, lost == 0), (frac, lost)
    assert np.all(lost <= frac * size * max(n - 1, 1) + 1e-6)
    assert np.all(lost >= np.round(frac * size) - 1e-6)
    if n == 1:  # nothing to lose; a gradient sum of one term is exact, a param update rounds
        assert np.all(lost == 0) and (params_audit or np.all(rel == 0)), (rel, lost)
    if lossless:
        assert np.all(lost == 0) and np.all(frac == 0)
        # only float32 summation order: gamma_n relative (a loose form of the per-element bound)
        assert np.all(rel <= 4 * n * race.UNIT_ROUNDOFF * 10), rel


def hogwild(dist) -> None:
    from cnnpar.optim import SGD

    comm, n = dist.comm, dist.size
    for audit in (False, True):
        config = Config(mode="hogwild", race_audit=audit)
        ex = race.make_race_exchange(config, dist, P)
        start = np.linspace(-1, 1, P).astype(np.float32)
        params = ex.bind(start.copy())
        assert params is not start
        # the params are ONE buffer: what rank 0 writes, every rank sees after a barrier
        if dist.is_root:
            params[0] = 42.0
        dist.barrier()
        assert params[0] == 42.0
        dist.barrier()
        if dist.is_root:
            params[0] = start[0]
        dist.barrier()
        opt = SGD(P, lr=0.01, momentum=0.0, reduce="sum")
        steps = 6
        for step in range(steps):
            g = _grads(dist.rank, step)
            before = g.copy()
            assert ex.reduce(g) == 0.0
            assert np.array_equal(g, before), "hogwild must leave the rank's gradient alone"
            opt.step(params, g, n, 0.01)
        dist.barrier()
        expected = start.astype(np.float64) - 0.01 * sum(
            np.stack([_grads(r, s) for r in range(n)]).astype(np.float64).sum(axis=0) for s in range(steps))
        err = np.abs(params.astype(np.float64) - expected)
        assert _same_everywhere(comm, params.copy())
        # lost updates are possible, so no exactness; but each element is off by at most a few updates
        assert np.max(err) < 0.01 * steps * n * 6, np.max(err)
        rows = ex.drain_audit()
        if audit and dist.is_root:
            assert rows is not None
            assert list(rows["step"]) == list(range(steps - 1))  # the last step's update is never audited
            _check_audit_rows(rows, n, P, lossless=(n == 1), params_audit=True)
            print("hogwild audit", {k: v.tolist() for k, v in rows.items()}, flush=True)
        else:
            assert rows is None
        win = ex._acc.win
        ex.close()
        ex.close()
        assert win == MPI.WIN_NULL, "close() must free the window"
        _say(dist, f"ok hogwild audit={audit} n={n} max_err={np.max(err):.3g}")


def contention(dist, window: str, size: int, rounds: int, mode: str = "race") -> None:
    """Every rank adds a buffer of ones at the same moment; the sum counts the surviving contributions per
    element exactly (integers < 2^24 are exact in float32), so lost = n - sum."""
    n = dist.size
    ex = race.OneSidedExchange(dist, size, op=mode, window=window)
    ones = np.ones(size, np.float32)
    got = np.empty(size, np.float32)
    fractions, seconds = [], []
    try:
        for _ in range(rounds):
            got[:] = ones
            dist.barrier()
            t = time.perf_counter()
            ex.reduce(got)
            seconds.append(time.perf_counter() - t)
            lost = float(np.sum(n - got.astype(np.float64)))
            assert np.all((got >= 1) & (got <= n)), "a racy sum keeps at least its last writer"
            fractions.append(lost / (n * size))
    finally:
        ex.close()
    seconds = dist.comm.gather(float(np.median(seconds)), root=0)
    if dist.is_root:
        print(json.dumps({"n": n, "window": window, "mode": mode, "size": size, "rounds": rounds,
                          "lost_fraction": fractions, "lossy_rounds": int(sum(f > 0 for f in fractions)),
                          "median_reduce_s": float(np.median(seconds))}), flush=True)


def choose(dist, mode: str, window: str) -> None:
    ex = race.make_race_exchange(Config(mode=mode, race_window=window), dist, 64)
    try:
        ex.bind(np.zeros(64, np.float32))
        _say(dist, json.dumps({"window": getattr(ex, "window", "shared"), "name": ex.name}))
    finally:
        ex.close()


def main(argv) -> int:
    what = argv[0]
    pretend = int(argv[3]) if what == "choose" and len(argv) > 3 else 0
    dist = dist_lib.setup(pretend_nodes=pretend)
    try:
        if what == "check":
            check(dist)
        elif what == "hogwild":
            hogwild(dist)
        elif what == "contention":
            for spec in argv[1:]:
                window, mode, size, rounds = spec.split(":")
                contention(dist, window, int(size), int(rounds), mode)
        elif what == "choose":
            choose(dist, argv[1], argv[2])
        else:
            raise SystemExit(f"unknown command {what!r}")
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
