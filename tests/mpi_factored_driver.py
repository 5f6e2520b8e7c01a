"""MPI side of tests/test_exchange_factored.py: the sufficient-factor exchange on real network gradients.

    mpiexec -n N python tests/mpi_factored_driver.py [--steps S] [--archs small,lenet]
    mpiexec -n N python tests/mpi_factored_driver.py --bench [--steps S] [--rounds R]

Check mode. For each architecture, every rank computes one real one-sample gradient per step (a different
mnist-5k sample on each rank on even steps, a random image on odd ones), then every exchange variant
(FactoredShmAllreduce with each protocol and wait policy, what `auto` builds through make_exchange, and the
flat ShmAllreduce) reduces a copy of it. On every step the result must be, on every rank:

  * bitwise equal to the rank-order numpy sum of all ranks' gradients gathered by MPI, and to the flat
    ShmAllreduce's result (a NaN counts as equal to a NaN: only its payload bits may differ), and so
    within float32 summation-order tolerance of MPI_Allreduce's sum (checked too);
  * the same on all ranks.

Some steps are special: a rank with no sample (the epoch's short last step: zero gradient, a workspace
still holding the previous step's factors), a rank whose image is scaled to 2^-146 (subnormal activations,
products that underflow: the rounding cases of the reconstruction), and a rank whose image holds a NaN
(the sum must be NaN where the flat sum is). The summed gradient updates the params (SGD), so later steps
run on trained weights. Rank 0 prints one JSON line per (arch, exchange), then `{"done": true}`.

Bench mode. Each step is a real forward+backward of the small network on one sample, then reduce();
variants run interleaved in rounds, and rank 0 prints the median reduce() time and samples/s per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cnnpar import dist as dist_lib  # noqa: E402

dist_lib.pin_threads()

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cnnpar import exchange as exchange_lib  # noqa: E402
from cnnpar.exchange import factored as F  # noqa: E402
from cnnpar.exchange import shm as X  # noqa: E402
from cnnpar import model  # noqa: E402

ZERO_STEP, TINY_STEP, NAN_STEP = 3, 0, 8  # TINY at step 0: the biases are still 0, so activations stay subnormal


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: the same float32 bits, or both NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def load_images():
    try:
        from cnnpar import data

        dataset = data.load_dataset("mnist-5k")
        return dataset.train_images, dataset.train_labels
    except Exception:  # the data module is not essential here: random images cover the same paths
        rng = np.random.default_rng(1)
        return rng.random((4000, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 4000).astype(np.int32)


def sample(step: int, rank: int, size: int, images, labels, rng):
    index = (step * size + rank) % len(labels)
    if step % 2 == 0:
        image, label = images[index:index + 1].copy(), labels[index:index + 1].copy()
    else:
        image = rng.random((1, 1, 28, 28), dtype=np.float32)
        label = np.array([rng.integers(10)], np.int32)
    if step == ZERO_STEP and rank == size - 1 and size > 1:
        return image[:0], label[:0]
    if step == TINY_STEP and rank == 0:
        image *= np.float32(2.0 ** -146)
    if step == NAN_STEP and rank == size - 1:
        image[0, 0, 14, 14] = np.nan
    return image, label


def variants(dist, network) -> dict:
    out = {}
    if dist.size > 1:
        waits = ("spin", "yield-block", "block") if dist.size <= 2 else ("spin", "yield-block")
        for protocol in ("all", "single"):
            for wait in waits:
                out[f"factored-{protocol}-{wait}"] = (
                    lambda p=protocol, w=wait: F.FactoredShmAllreduce(dist, network, comm=dist.comm, wait=w,
                                                                      protocol=p, verify_steps=3))
    out["auto"] = lambda: exchange_lib.make_exchange(SimpleNamespace(mode="sync", allreduce="auto",
                                                                     samples_per_rank=1), dist,
                                                     network.n_params, network=network)
    out["factored"] = lambda: exchange_lib.make_exchange(SimpleNamespace(mode="sync", allreduce="factored",
                                                                         samples_per_rank=1), dist,
                                                         network.n_params, network=network)
    return out


def check(dist, arch: str, steps: int, seed: int) -> list:
    comm, rank, size = dist.comm, dist.rank, dist.size
    network = model.build_network(arch)
    params = network.init_params(seed)
    images, labels = load_images()
    rng = np.random.default_rng([seed, rank])
    late = np.random.default_rng([seed, 99])  # the same on every rank: who is late when
    exchanges = {name: make() for name, make in variants(dist, network).items()}
    flat = X.ShmAllreduce(dist, network.n_params, comm=dist.comm) if size > 1 else None
    stats = {name: {"bitwise_steps": 0, "nan_steps": 0} for name in exchanges}
    m = network.n_params
    for step in range(steps):
        image, label = sample(step, rank, size, images, labels, rng)
        grads = np.zeros(m, np.float32)
        network.forward_backward(params, grads, image, label)
        gathered = np.empty((size, m), np.float32)
        comm.Allgather(grads, gathered)
        reference = gathered[0].copy()
        for row in gathered[1:]:
            reference += row  # rank order, float32: ((g0 + g1) + g2) + ...
        mpi_sum = grads.copy()  # MPI_Allreduce's own order: equal within float32 summation tolerance
        comm.Allreduce(MPI.IN_PLACE, mpi_sum, op=MPI.SUM)
        scale = np.abs(gathered).sum(axis=0)
        finite = np.isfinite(scale)
        if not (np.abs(mpi_sum - reference)[finite] <= 4 * size * np.finfo(np.float32).eps * scale[finite]).all():
            raise AssertionError(f"{arch}: MPI_Allreduce and the rank-order sum differ beyond rounding at step {step}")
        if flat is not None:
            flat_sum = grads.copy()
            flat.reduce(flat_sum)
            if not same(flat_sum, reference).all():
                raise AssertionError(f"{arch}: the flat shm sum differs from numpy at step {step}")
        for name, exchange in exchanges.items():
            if late.random() < 0.15 and rank == int(late.integers(size)):
                time.sleep(float(late.choice([1e-4, 2e-3])))
            mine = grads.copy()
            wait_s = exchange.reduce(mine)
            if not (math.isnan(wait_s) or wait_s >= 0):
                raise AssertionError(f"{arch} {name}: wait {wait_s}")
            ok = same(mine, reference)
            if not ok.all():
                i = int(np.argmin(ok))
                raise AssertionError(f"{arch} {name}: step {step} element {i}: {mine[i]!r} vs {reference[i]!r}")
            everyone = np.empty((size, m), np.float32)
            comm.Allgather(mine, everyone)
            if not all(same(row, everyone[0]).all() for row in everyone):
                raise AssertionError(f"{arch} {name}: ranks disagree at step {step}")
            stats[name]["bitwise_steps"] += 1
            stats[name]["nan_steps"] += int(np.isnan(mine).any())
        if not np.isnan(reference).any():
            params -= np.float32(0.01) * reference
    results = []
    for name, exchange in exchanges.items():
        inner = exchange
        results.append({"arch": arch, "exchange": name, "class": type(inner).__name__, "steps": steps,
                        "protocol": getattr(inner, "protocol", None), "policy": getattr(inner, "wait_policy", None),
                        "resumed": getattr(inner, "resumed", 0), **stats[name]})
        exchange.close()
        exchange.close()  # twice is harmless
    if flat is not None:
        flat.close()
    return results


def check_choices(dist) -> dict:
    """What auto picks at two samples per rank, and that an explicit 'factored' there is a user error."""
    network = model.build_network("small")
    config = SimpleNamespace(mode="sync", allreduce="auto", samples_per_rank=2)
    exchange = exchange_lib.make_exchange(config, dist, network.n_params, network=network)
    auto_k2 = type(exchange).__name__
    exchange.close()
    exchange = exchange_lib.make_exchange(config, dist, network.n_params)  # no network: as before
    auto_no_network = type(exchange).__name__
    exchange.close()
    config = SimpleNamespace(mode="sync", allreduce="factored", samples_per_rank=2)
    try:
        exchange_lib.make_exchange(config, dist, network.n_params, network=network).close()
        refused = None
    except SystemExit as exc:
        refused = exc.code
    return {"auto_k2": auto_k2, "auto_no_network": auto_no_network, "factored_k2_exit": refused}


def bench(dist, steps: int, rounds: int, only: str) -> None:
    comm, rank, size = dist.comm, dist.rank, dist.size
    network = model.build_network("small")
    params = network.init_params(0)
    images, labels = load_images()
    m = network.n_params
    wait = "yield-block" if dist.yield_when_waiting else "spin"
    makers = {
        "shm-all": lambda: X.ShmAllreduce(dist, m, comm=comm, wait=wait, protocol="all"),
        "shm-slices": lambda: X.ShmAllreduce(dist, m, comm=comm, wait=wait, protocol="slices"),
        "shm-single": lambda: X.ShmAllreduce(dist, m, comm=comm, wait=wait, protocol="single"),
        "factored-all": lambda: F.FactoredShmAllreduce(dist, network, comm=comm, wait=wait, protocol="all"),
        "factored-single": lambda: F.FactoredShmAllreduce(dist, network, comm=comm, wait=wait, protocol="single"),
    }
    if only:
        makers = {k: v for k, v in makers.items() if k in only.split(",")}
    results = {name: [] for name in makers}
    grads = np.zeros(m, np.float32)
    for _ in range(rounds):
        for name, make in makers.items():
            exchange = make()
            times = np.zeros(steps)
            for phase in ("warm", "timed"):
                count = 200 if phase == "warm" else steps
                comm.Barrier()
                t0 = time.perf_counter()
                for i in range(count):
                    j = (i * size + rank) % len(labels)
                    grads[:] = 0.0
                    network.forward_backward(params, grads, images[j:j + 1], labels[j:j + 1])
                    t = time.perf_counter()
                    exchange.reduce(grads)
                    if phase == "timed":
                        times[i] = time.perf_counter() - t
                total = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            exchange.close()
            gathered = comm.gather(times, root=0)
            if rank == 0:
                results[name].append({"reduce_us": float(np.median(np.concatenate(gathered)) * 1e6),
                                      "samples_per_s": size * steps / total,
                                      "protocol": getattr(exchange, "protocol", None)})
    if rank == 0:
        for name, items in results.items():
            print(json.dumps({"variant": name, "ranks": size, "policy": wait,
                              "reduce_us_median": float(np.median([r["reduce_us"] for r in items])),
                              "reduce_us_rounds": [round(r["reduce_us"], 2) for r in items],
                              "samples_per_s_median": float(np.median([r["samples_per_s"] for r in items])),
                              "samples_per_s_rounds": [round(r["samples_per_s"]) for r in items]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", default="small,lenet")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    dist = dist_lib.setup()
    if args.bench:
        bench(dist, args.steps, args.rounds, args.only)
        return 0
    count = 0
    for arch in args.archs.split(","):
        for result in check(dist, arch, args.steps, args.seed):
            count += 1
            if dist.rank == 0:
                print(json.dumps(result), flush=True)
    refusal = check_choices(dist)
    if dist.rank == 0:
        print(json.dumps({"done": True, **refusal, "ranks": dist.size, "oversubscribed": dist.oversubscribed,
                          "exchanges": count, "rounding": F.kernel_rounding()}), flush=True)
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
