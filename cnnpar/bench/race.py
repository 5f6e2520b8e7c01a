"""Contention benchmark for the race windows: how many updates do ranks lose when they add at once?

    cnnpar bench race                      # n = 2, 4, 12; shared and rma; 11,738 and 4M floats
    cnnpar bench race --ranks 2 4 --sizes 11738 --rounds 100 --modes race atomic

Run it with plain Python: it launches itself once per rank count under the mpiexec beside this Python
(`mpiexec -n N python cnnpar/bench/race.py --worker ...`), collects each worker's JSON lines, prints a table
and ends with one JSON line holding every row.

Each round every rank fills a buffer with ones, all ranks meet at a barrier, and all call the race exchange's
reduce() at once (the worst case: in training, ranks arrive spread out by their compute time; --jitter-ms
adds a random start delay per rank and round to mimic that). Ones make the loss exactly countable: the racy
sum of an element is the number of contributions that survived (integers below 2^24 are exact in float32),
so the lost fraction of a round is sum(n - result) / (n * size). 11,738 is the gradient size of the small
architecture; 4,194,304 floats (16 MiB) is larger than the caches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cnnpar.modes import ONE_SIDED_MODES

DEFAULT_RANKS = (2, 4, 12)
DEFAULT_SIZES = (11_738, 4_194_304)
DEFAULT_WINDOWS = ("shared", "rma")


def _rounds_for(size: int, requested: int) -> int:
    if requested > 0:
        return requested
    return 200 if size <= 100_000 else 20


def worker(args) -> None:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import numpy as np

    from cnnpar import dist as dist_lib
    from cnnpar.exchange import race

    dist = dist_lib.setup()
    n = dist.size
    dist_lib.compile_once(dist, race.warm_kernels)
    rng = np.random.default_rng(1234 + dist.rank)
    for mode in args.modes:
        for window in args.windows:
            for size in args.sizes:
                rounds = _rounds_for(size, args.rounds)
                ex = race.OneSidedExchange(dist, size, op=mode, window=window)
                ones = np.ones(size, np.float32)
                got = np.empty(size, np.float32)
                fractions, seconds = [], []
                try:
                    for _ in range(rounds):
                        got[:] = ones
                        dist.barrier()
                        if args.jitter_ms > 0:
                            time.sleep(rng.random() * args.jitter_ms * 1e-3)
                        t = time.perf_counter()
                        ex.reduce(got)
                        seconds.append(time.perf_counter() - t)
                        fractions.append(float(np.sum(n - got.astype(np.float64))) / (n * size))
                finally:
                    ex.close()
                all_seconds = dist.comm.gather(float(np.median(seconds)), root=0)
                if dist.is_root:
                    f = np.asarray(fractions)
                    print(json.dumps({
                        "n": n, "mode": mode, "window": window, "size": size, "rounds": rounds,
                        "jitter_ms": args.jitter_ms, "lossy_rounds": int(np.count_nonzero(f > 0)),
                        "mean_lost_fraction": float(f.mean()), "max_lost_fraction": float(f.max()),
                        "median_reduce_s": float(np.median(all_seconds)),
                        "oversubscribed": bool(dist.oversubscribed)}), flush=True)


def _mpiexec() -> str:
    from cnnpar.experiments.launchers import default_mpiexec

    return default_mpiexec()


def launcher(args) -> int:
    rows = []
    for n in args.ranks:
        command = [_mpiexec(), "-n", str(n), sys.executable, str(Path(__file__).resolve()), "--worker",
                   "--sizes", *map(str, args.sizes), "--windows", *args.windows, "--modes", *args.modes,
                   "--rounds", str(args.rounds), "--jitter-ms", str(args.jitter_ms)]
        print(f"running {' '.join(command[:3])} ... ({n} ranks)", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            print(f"bench_race: the {n}-rank run failed (exit {done.returncode})", file=sys.stderr)
            return 1
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    header = f"{'n':>3} {'mode':>6} {'window':>6} {'floats':>9} {'rounds':>6} {'lossy':>6} " \
             f"{'mean lost':>10} {'max lost':>10} {'reduce ms':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>3} {r['mode']:>6} {r['window']:>6} {r['size']:>9} {r['rounds']:>6} {r['lossy_rounds']:>6} "
              f"{r['mean_lost_fraction']:>10.3g} {r['max_lost_fraction']:>10.3g} {1e3 * r['median_reduce_s']:>10.3f}")
    print(json.dumps({"bench": "race_contention", "rows": rows}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS),
                        help=f"rank counts, one mpiexec run each (default {' '.join(map(str, DEFAULT_RANKS))})")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help=f"buffer sizes in float32 elements (default {' '.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--windows", nargs="+", default=list(DEFAULT_WINDOWS), choices=DEFAULT_WINDOWS,
                        help="race windows to measure: shared (node shared memory), rma (Get/add/Put on an "
                             "owner rank) (default both)")
    parser.add_argument("--modes", nargs="+", default=["race"], choices=ONE_SIDED_MODES,
                        help="race: unprotected adds; atomic: MPI_Accumulate (default race)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per case (0: 200 small, 20 large)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="random start delay per rank and round")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mpiexec run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return launcher(args)


if __name__ == "__main__":
    raise SystemExit(main())
