"""What the run log's flushes and close cost, against another cnnpar tree (default /work/base), same run.

    cnnpar bench flush                          # n = 1 and 12, 5 interleaved repeats
    cnnpar bench flush --ranks 1 12 --repeats 7 --against /path/to/other/checkout

Each repeat runs the same training job once with this tree and once with the other, alternating, at
every rank count. Inside each job, world rank 0 times every call of `RunLogWriter.flush` and `.close`
(a harness around the writer of the tree that runs; the trainer is not changed). Reported per tree and
rank count, as medians: the training time (the log's `train_time_s`: the loop, whose window flushes
include the ranks' stop agreement), the time in flush + close, and that time as a fraction of the
training time; and the ratio of this tree's training time to the other's. The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The folder holding this tree's cnnpar (not imported from cnnpar.bench: the child runs under the other tree's
# PYTHONPATH, whose cnnpar may predate that module).
SOURCE_ROOT = Path(__file__).resolve().parents[2]
CHILD_MARK = "--child"


def _child(argv) -> int:
    """Inside mpiexec: time rank 0's flush/close calls of this tree's writer, then train."""
    from mpi4py import MPI

    from cnnpar import runlog
    from cnnpar.train import main

    spent = {"flush_s": 0.0, "close_s": 0.0, "flushes": 0}
    writer = runlog.RunLogWriter
    depth = [0]  # close() flushes too: count only the outermost call

    def timed(name, function):
        def wrapper(self, *args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return function(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[f"{name}_s"] += time.perf_counter() - started
                    spent["flushes"] += name == "flush"
        return wrapper

    writer.flush, writer.close = timed("flush", writer.flush), timed("close", writer.close)
    spent["fsync_s"] = spent["verify_s"] = 0.0
    if hasattr(writer, "_verify"):  # the closing read-back of a complete log (trees that have one)
        verify = writer._verify

        def timed_verify(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return verify(self, *args, **kwargs)
            finally:
                spent["verify_s"] += time.perf_counter() - started
        writer._verify = timed_verify

    def timed_sync(sync):  # the share of the device sync (fsync or fdatasync) in the closing write
        def timed(fd):
            started = time.perf_counter()
            try:
                return sync(fd)
            finally:
                spent["fsync_s"] += time.perf_counter() - started
        return timed

    os.fsync = timed_sync(os.fsync)
    if hasattr(os, "fdatasync"):
        os.fdatasync = timed_sync(os.fdatasync)
    status = main(argv)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print("BENCH " + json.dumps(spent), flush=True)
    return status


def _run(tree: Path, ranks: int, flags: list, folder: str, tag: str) -> dict:
    from cnnpar.runlog import open_log  # this tree's reader reads both formats

    path = os.path.join(folder, f"{tag}.h5")
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    command = [mpiexec, "-n", str(ranks), sys.executable, str(Path(__file__).resolve()), CHILD_MARK,
               *flags, "--log", path]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tree, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"bench_flush: the run with {tree} at {ranks} ranks failed:\n{done.stderr[-2000:]}")
    spent = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))[6:])
    log = open_log(path)
    spent["train_time_s"] = float(log.final["attrs"]["train_time_s"])
    spent["format_version"] = log.format_version
    os.remove(path)
    return spent


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_MARK:
        # run as a script with PYTHONPATH naming the tree to measure: its cnnpar comes first on sys.path
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 12], help="rank counts to measure")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per tree and rank count")
    parser.add_argument("--against", default="/work/base", help="the other cnnpar checkout")
    parser.add_argument("train_args", nargs="*", help="flags for cnnpar.train (after --); default "
                        "--dataset mnist-5k --epochs 1 --quiet (the issue's 1-epoch run)")
    args = parser.parse_args()
    flags = args.train_args or ["--dataset", "mnist-5k", "--epochs", "1", "--quiet"]
    trees = {"this": SOURCE_ROOT, "other": Path(args.against).resolve()}
    results = {(name, n): [] for name in trees for n in args.ranks}
    with tempfile.TemporaryDirectory() as folder:
        for n in args.ranks:  # one untimed run per tree first: numba's cache and the page cache warm up
            for name, tree in trees.items():
                _run(tree, n, flags, folder, f"warm-{name}-{n}")
        for repeat in range(args.repeats):
            for n in args.ranks:
                order = list(trees.items()) if repeat % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    results[(name, n)].append(_run(tree, n, flags, folder, f"{name}-{n}-{repeat}"))
                    last = results[(name, n)][-1]
                    print(f"repeat {repeat + 1} n={n} {name}: train {last['train_time_s']:.3f} s, flush+close "
                          f"{1000 * (last['flush_s'] + last['close_s']):.1f} ms ({last['flushes']} flushes; "
                          f"fsync {1000 * last.get('fsync_s', 0.0):.1f} ms, read-back "
                          f"{1000 * last.get('verify_s', 0.0):.1f} ms)", flush=True)
    summary = {"flags": flags, "repeats": args.repeats, "against": str(trees["other"]), "points": []}
    for n in args.ranks:
        point = {"ranks": n}
        for name in trees:
            rows = results[(name, n)]
            train = statistics.median(r["train_time_s"] for r in rows)
            io_s = statistics.median(r["flush_s"] + r["close_s"] for r in rows)
            share = statistics.median((r["flush_s"] + r["close_s"]) / r["train_time_s"] for r in rows)
            fsync_s = statistics.median(r.get("fsync_s", 0.0) for r in rows)
            verify_s = statistics.median(r.get("verify_s", 0.0) for r in rows)
            point[name] = {"train_time_s": round(train, 4), "flush_close_s": round(io_s, 5),
                           "fsync_s": round(fsync_s, 5), "verify_s": round(verify_s, 5),
                           "flush_close_share": round(share, 5), "format_version": rows[0]["format_version"],
                           "flushes": rows[0]["flushes"]}
        ratios = [a["train_time_s"] / b["train_time_s"] for a, b in zip(results[("this", n)], results[("other", n)])]
        point["train_time_ratio_median"] = round(statistics.median(ratios), 4)
        point["train_time_ratio_range"] = [round(min(ratios), 4), round(max(ratios), 4)]
        summary["points"].append(point)
        print(f"n={n}: flush+close {1000 * point['this']['flush_close_s']:.1f} ms = "
              f"{100 * point['this']['flush_close_share']:.2f}% of training (other tree: "
              f"{1000 * point['other']['flush_close_s']:.1f} ms = {100 * point['other']['flush_close_share']:.2f}%); "
              f"of which fsync {1000 * point['this']['fsync_s']:.1f} ms, read-back "
              f"{1000 * point['this']['verify_s']:.1f} ms; "
              f"training time this/other {point['train_time_ratio_median']:.3f} "
              f"({point['train_time_ratio_range'][0]:.3f}-{point['train_time_ratio_range'][1]:.3f})", flush=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
