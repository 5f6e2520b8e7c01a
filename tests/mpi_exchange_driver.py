"""MPI side of tests/test_exchange.py: every sync exchange against reference sums, on the ranks it runs on.

    mpiexec -n N python tests/mpi_exchange_driver.py [--steps S] [--seed K]

For each exchange (mpi; shm with each protocol and wait policy; hier over 2 pretend nodes; what 'auto'
picks, through exchange.make_exchange) it runs S steps of random gradients (mixed magnitudes, signs,
zeros, some ranks late) and checks, on every step:

  * fixed-order exchanges (shm, hier): bitwise equal to the reference sum formed in numpy from all ranks'
    gradients gathered to every rank: ((g0 + g1) + g2) + ... in float32 for shm; for hier the per-node
    rank-order sums added in node order (bitwise for 2 nodes, where MPI's sum of two node sums is exact);
  * every exchange: within float32 summation-order tolerance of MPI_Allreduce;
  * every rank holds bit-identical results; the reported wait is >= 0 seconds (or NaN where unknown);
  * close() twice is harmless.

Rank 0 prints one JSON line per exchange, then `{"done": true}`. Any failure raises (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cnnpar import dist as dist_lib  # noqa: E402

dist_lib.pin_threads()

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cnnpar import exchange as exchange_lib  # noqa: E402
from cnnpar import warmup  # noqa: E402
from cnnpar.exchange import shm  # noqa: E402
from cnnpar.exchange.mpi import MpiAllreduce  # noqa: E402

N_PARAMS = 11_738  # the small architecture; odd-sized so slices do not all align


def gradients(rng: np.random.Generator, m: int, step: int) -> np.ndarray:
    """Random float32 gradients with a spread of magnitudes, so summation order shows in the low bits."""
    scale = np.float32(10.0) ** rng.integers(-6, 3, size=m).astype(np.float32)
    g = (rng.standard_normal(m).astype(np.float32) * scale).astype(np.float32)
    if step % 5 == 0:
        g[rng.random(m) < 0.1] = 0.0
    return g


def fixed_order_sum(parts) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def tolerance(gathered: np.ndarray) -> np.ndarray:
    """Bound on float32 summation-order differences: n * eps * sum |g| per element (plus a tiny floor)."""
    n = gathered.shape[0]
    return 2 * n * np.finfo(np.float32).eps * np.abs(gathered.astype(np.float64)).sum(axis=0) + 1e-30


class Overlapped:
    """Drives an exchange through reduce_begin(dense slice) + reduce_end, as an overlapping trainer would."""

    def __init__(self, inner, lo: int, hi: int):
        self.inner, self.lo, self.hi = inner, lo, hi
        self.name = inner.name

    def reduce(self, grads):
        self.inner.reduce_begin(grads, self.lo, self.hi)
        return self.inner.reduce_end(grads)

    def close(self):
        self.inner.close()

    def __getattr__(self, item):
        return getattr(self.inner, item)


def check_exchange(label: str, exchange, dist, steps: int, seed: int, reference: str, late: bool,
                   node_of=None) -> dict:
    comm = dist.comm
    rank, size = dist.rank, dist.size
    rng = np.random.default_rng([seed, rank, zlib.crc32(label.encode())])
    late_rng = np.random.default_rng([seed, 7])  # same on every rank: who is late at which step
    bitwise_steps = 0
    worst = 0.0
    waits = []
    for step in range(steps):
        g = gradients(rng, N_PARAMS, step)
        gathered = np.empty((size, N_PARAMS), np.float32)
        comm.Allgather(g, gathered)
        mpi_sum = g.copy()
        comm.Allreduce(MPI.IN_PLACE, mpi_sum, MPI.SUM)
        is_late, who, delay = late_rng.random() < 0.2, int(late_rng.integers(size)), late_rng.choice([2e-4, 2e-3, 2e-2])
        if late == "first" and step == 0:
            is_late, who, delay = True, size - 1, 0.02
        if late and is_late and rank == who:
            time.sleep(float(delay))
        mine = g.copy()
        wait_s = exchange.reduce(mine)
        if not (math.isnan(wait_s) or wait_s >= 0):
            raise AssertionError(f"{label}: wait {wait_s} is neither NaN nor >= 0")
        waits.append(wait_s)
        # all ranks bit-identical
        everyone = np.empty((size, N_PARAMS), np.float32)
        comm.Allgather(mine, everyone)
        if not all(np.array_equal(everyone[0].view(np.uint32), row.view(np.uint32)) for row in everyone):
            raise AssertionError(f"{label}: ranks disagree at step {step}")
        # within tolerance of MPI_Allreduce
        err = np.abs(mine.astype(np.float64) - mpi_sum.astype(np.float64))
        bound = tolerance(gathered)
        if not np.all(err <= bound):
            i = int(np.argmax(err - bound))
            raise AssertionError(f"{label}: step {step} element {i}: {mine[i]} vs MPI {mpi_sum[i]} "
                                 f"(bound {bound[i]:.3g})")
        worst = max(worst, float(np.max(err / bound)))
        # bitwise against the fixed-order reference
        if reference == "rank_order":
            ref = fixed_order_sum(list(gathered))
        elif reference == "node_order":
            nodes = sorted(set(node_of))
            ref = fixed_order_sum([fixed_order_sum([gathered[r] for r in range(size) if node_of[r] == k])
                                   for k in nodes])
        else:
            ref = None
        if ref is not None:
            if not np.array_equal(ref.view(np.uint32), mine.view(np.uint32)):
                i = int(np.argmax(ref != mine))
                raise AssertionError(f"{label}: step {step} not bitwise equal to the {reference} sum "
                                     f"(element {i}: {mine[i]!r} vs {ref[i]!r})")
            bitwise_steps += 1
    exchange.close()
    exchange.close()  # twice is safe
    finite = [w for w in waits if not math.isnan(w)]
    inner = getattr(exchange, "inner", exchange)
    return {"exchange": label, "class": type(inner).__name__, "name": exchange.name, "steps": steps,
            "bitwise_steps": bitwise_steps, "reference": reference, "worst_err_over_bound": worst,
            "wait_measured": len(finite) == len(waits), "mean_wait_s": float(np.mean(finite)) if finite else None,
            "resumed": int(getattr(exchange, "resumed", 0) or getattr(getattr(exchange, "_node", None),
                                                                       "resumed", 0) or 0),
            "policy": getattr(exchange, "wait_policy", None), "protocol": getattr(exchange, "protocol", None),
            "nontemporal": getattr(inner, "nontemporal", None), "round_trip_ns": getattr(inner, "round_trip_ns", None)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated labels to run (default all)")
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    dist = dist_lib.setup()
    results = []
    only = set(filter(None, args.only.split(",")))

    def run(label, make, reference, late=True, d=None, node_of=None, config=None):
        if only and label not in only:
            return
        d = d or dist
        exchange = make()
        result = check_exchange(label, exchange, d, args.steps, args.seed, reference, late, node_of)
        if config is not None:  # built by the factory: what the warm-up forecasts for the same run
            result["forecast"] = warmup.exchange_kernels(config.mode, config.allreduce, d.size, 1, None,
                                                         d.n_nodes, d.comm.allreduce(d.node_size, op=MPI.MAX))
        if d.rank == 0:
            print(json.dumps(result), flush=True)
        results.append(result)

    run("mpi", lambda: MpiAllreduce(dist), reference="none")
    if dist.size > 1:
        # every protocol x wait policy at 2 and 3 ranks; at more ranks the protocols with their default waits
        waits = ("spin", "block", "yield", "yield-block") if dist.size <= 3 else (None,)
        for protocol in ("slices", "single", "all"):
            for wait in waits:
                run(f"shm-{protocol}-{wait}",
                    lambda: shm.ShmAllreduce(dist, N_PARAMS, comm=dist.comm, wait=wait, protocol=protocol),
                    reference="rank_order")
        for protocol in ("slices", "all"):  # slots written with streaming (non-temporal) stores
            run(f"shm-{protocol}-streaming",
                lambda: shm.ShmAllreduce(dist, N_PARAMS, comm=dist.comm, protocol=protocol,
                                                  nontemporal=True), reference="rank_order")
        # the resume path: a wait slice of 1 ms and ranks that are up to 20 ms late
        def short_slices():
            ex = shm.ShmAllreduce(dist, N_PARAMS, comm=dist.comm, wait="block")
            ex.wait_slice_ns = 1_000_000
            return ex
        run("shm-short-slices", short_slices, reference="rank_order", late="first")
        for protocol in ("slices", "single", "all"):
            run(f"shm-overlap-{protocol}",
                lambda: Overlapped(shm.ShmAllreduce(dist, N_PARAMS, comm=dist.comm, protocol=protocol),
                                   208, N_PARAMS), reference="rank_order")
    config = SimpleNamespace(mode="sync", allreduce="shm")
    run("shm", lambda: exchange_lib.make_exchange(config, dist, N_PARAMS),
        reference="rank_order" if dist.size > 1 else "none", config=config)
    config = SimpleNamespace(mode="sync", allreduce="auto")
    run("auto", lambda: exchange_lib.make_exchange(config, dist, N_PARAMS),
        reference="rank_order" if dist.size > 1 else "none", config=config)
    if dist.size >= 2:
        pretend = dist_lib.setup(pretend_nodes=2)
        node_of = pretend.comm.allgather(pretend.comm.Get_rank() // -(-pretend.size // 2))
        config = SimpleNamespace(mode="sync", allreduce="hier")
        run("hier", lambda: exchange_lib.make_exchange(config, pretend, N_PARAMS), reference="node_order",
            d=pretend, node_of=node_of, config=config)
        for wait in ("spin", "block"):
            run(f"hier-{wait}", lambda: shm.HierAllreduce(pretend, N_PARAMS, wait=wait),
                reference="node_order", d=pretend, node_of=node_of)
        config = SimpleNamespace(mode="sync", allreduce="auto")
        run("auto-pretend", lambda: exchange_lib.make_exchange(config, pretend, N_PARAMS),
            reference="node_order", d=pretend, node_of=node_of, config=config)
        config = SimpleNamespace(mode="sync", allreduce="shm")
        run("shm-pretend", lambda: exchange_lib.make_exchange(config, pretend, N_PARAMS),
            reference="rank_order", d=pretend, config=config)
    if world.Get_rank() == 0:
        print(json.dumps({"done": True, "ranks": dist.size, "oversubscribed": dist.oversubscribed,
                          "exchanges": len(results)}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:  # one rank failed: take the job down instead of leaving the others waiting
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
