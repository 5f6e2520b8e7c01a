"""What the run log's flushes and close cost, against another cnnpar tree (default /work/base), same run.

    cnnpar bench flush                          # n = 1 and 12, 5 interleaved repeats
    cnnpar bench flush --ranks 1 12 --repeats 7 --against /path/to/other/checkout
    cnnpar bench flush --floor                  # and this tree with the rows dropped at the close

Each repeat runs the same training job once with this tree and once with the other, alternating, at
every rank count. Inside each job, world rank 0 times every call of `RunLogWriter.flush` and `.close`
(a harness around the writer of the tree that runs; the trainer is not changed). Reported per tree and
rank count, as medians: the training time (the log's `train_time_s`: the loop, whose window flushes
include the ranks' stop agreement), the time in flush + close, and that time as a fraction of the
training time; and the ratio of this tree's training time to the other's. For this tree, the close is
split into its parts (rows, /final, closing HDF5's in-memory file, the device sync, the read-back, the
rest), each the guarantee of docs/faults.md it pays for. `--floor` adds a third variant, this tree with
the waiting rows dropped when the log closes: what the close costs when writing rows costs nothing (it
still flushes and closes every dataset the log created), a floor for this layout. `--minimal-layout`
also times, in a fresh process each repeat, the close of the cheapest layout conceivable (every row in
one 2-D dataset) with the same guarantees, at the run's sizes: a floor for any change of the format
that keeps them. The last line is one JSON object with every figure.
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
    _time_parts(spent)
    if os.environ.get(NO_ROWS_ENV):
        _drop_rows_at_close(writer)
    status = main(argv)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print("BENCH " + json.dumps(spent), flush=True)
    return status


# The parts of the closing write, timed where the tree has them (older trees lack some): what each costs,
# and which guarantee of docs/faults.md it pays for (the rest is building the HDF5 image: HDF5's flush of
# its in-memory file, the image's copy, attributes, and the temporary file's open, write, lock, rename).
PARTS = {
    "rows_s": ("RunLogWriter", "_write_rows"),            # the rows of every table into the in-memory file
    "final_s": ("RunLogWriter", "_write_final"),          # /final and its attributes
    "image_close_s": ("RunLogWriter", "_close_image"),    # closing HDF5's in-memory file
    "writeback_s": ("module", "_start_writeback"),        # starting the device write (the sync's first part)
}
NO_ROWS_ENV = "CNNPAR_BENCH_FLUSH_NO_ROWS"  # --floor: the close of a log whose rows cost nothing to write


def _time_parts(spent: dict) -> None:
    from cnnpar.runlog import writer as module

    for key, (owner_name, name) in PARTS.items():
        owner = module if owner_name == "module" else getattr(module, owner_name)
        function = getattr(owner, name, None)
        if function is None:
            continue
        spent[key] = 0.0

        def timed(*args, _function=function, _key=key, **kwargs):
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                spent[_key] += time.perf_counter() - started
        setattr(owner, name, timed)


def _drop_rows_at_close(writer) -> None:
    """Forget the rows still waiting when the log closes (a 1-epoch run's are all of them): the close then
    pays everything but writing rows (for this layout's datasets)."""
    close = writer.close

    def without_rows(self, *args, **kwargs):
        for table, chunks in getattr(self, "_pending", {}).items():
            self._rows[table] -= sum(len(next(iter(chunk.values()))) for chunk in chunks)
        if hasattr(self, "_pending"):
            self._pending = {}
        return close(self, *args, **kwargs)
    writer.close = without_rows


MINIMAL_MARK = "--minimal-child"


def _minimal_child(path: str, steps: int, n_params: int) -> int:
    """The cheapest layout conceivable for a log of `steps` rows, as the writer's close meets it, in a fresh
    process: an in-memory HDF5 file made beforehand (untimed, as the writer makes its file at the start)
    with one 2-D float32 dataset for every row (12 columns, about the log's bytes of rows) and one for the
    params; timed, the close: the rows, the params, the status attribute, HDF5's flush, the image and the
    close; then the writer's own guarantees (temporary file, device write started, read-back compared,
    fdatasync, rename)."""
    import h5py
    import numpy as np

    from cnnpar.runlog import writer
    from cnnpar.runlog.schema import LIBVER

    rows = np.random.default_rng(0).random((steps, 12), np.float32)
    params = np.random.default_rng(1).random(n_params, np.float32)
    f = h5py.File(f"cnnpar-minimal-{os.getpid()}", "w", driver="core", backing_store=False, libver=LIBVER)
    f.attrs.create("status", np.bytes_(b"running".ljust(16)))
    f.create_dataset("layout", data=np.arange(10))  # the writer's start writes small datasets too
    table = f.create_dataset("rows", shape=(0, 12), maxshape=(None, 12), chunks=(512, 12), dtype="f4").id
    final = f.create_dataset("params", shape=params.shape, dtype="f4").id
    started = time.perf_counter()
    table.set_extent(rows.shape)
    table.write(h5py.h5s.ALL, h5py.h5s.ALL, rows)
    final.write(h5py.h5s.ALL, h5py.h5s.ALL, params)
    h5py.h5a.open(f.id, b"status").write(np.asarray(np.bytes_(b"complete".ljust(16))))
    f.flush()
    image = f.id.get_file_image()
    del table, final
    f.close()
    built = time.perf_counter()
    tmp = path + ".flush-tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, image)
        writer._start_writeback(fd)
        if os.pread(fd, len(image) + 1, 0) != image:
            raise SystemExit("bench_flush: the minimal log read back different")
        getattr(os, "fdatasync", os.fsync)(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    done = time.perf_counter()
    print("BENCH " + json.dumps({"hdf5_s": built - started, "guarantees_s": done - built}), flush=True)
    return 0


def _run_minimal(folder: str, tag: str, steps: int, n_params: int) -> dict:
    path = os.path.join(folder, f"{tag}.h5")
    env = dict(os.environ, PYTHONPATH=str(SOURCE_ROOT))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), MINIMAL_MARK, path, str(steps),
                           str(n_params)], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"bench_flush: the minimal layout's close failed:\n{done.stderr[-2000:]}")
    os.remove(path)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))[6:])


def _run(tree: Path, ranks: int, flags: list, folder: str, tag: str, env_extra: dict | None = None) -> dict:
    from cnnpar.runlog import open_log  # this tree's reader reads both formats

    path = os.path.join(folder, f"{tag}.h5")
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", **(env_extra or {}))
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
    spent["steps"] = int(log.final["attrs"].get("steps", len(log.steps["step"]) if log.steps else 0))
    spent["n_params"] = int(log.final["params"].size)
    os.remove(path)
    return spent


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == MINIMAL_MARK:
        return _minimal_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_MARK:
        # run as a script with PYTHONPATH naming the tree to measure: its cnnpar comes first on sys.path
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 12], help="rank counts to measure")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per tree and rank count")
    parser.add_argument("--against", default="/work/base", help="the other cnnpar checkout")
    parser.add_argument("--floor", action="store_true",
                        help="also run this tree with the rows dropped at the close (a floor for this layout)")
    parser.add_argument("--minimal-layout", action="store_true",
                        help="also time the close of the cheapest layout conceivable (one dataset for every row) "
                        "with the same guarantees, at the run's sizes (the smallest rank count's)")
    parser.add_argument("train_args", nargs="*", help="flags for cnnpar.train (after --); default "
                        "--dataset mnist-5k --epochs 1 --quiet (the issue's 1-epoch run)")
    args = parser.parse_args()
    flags = args.train_args or ["--dataset", "mnist-5k", "--epochs", "1", "--quiet"]
    trees = {"this": SOURCE_ROOT, "other": Path(args.against).resolve()}
    variants = {"this": (SOURCE_ROOT, {}), "other": (trees["other"], {})}
    if args.floor:
        variants["floor"] = (SOURCE_ROOT, {NO_ROWS_ENV: "1"})
    results = {(name, n): [] for name in variants for n in args.ranks}
    minimal = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.ranks:  # one untimed run per tree first: numba's cache and the page cache warm up
            for name, tree in trees.items():
                _run(tree, n, flags, folder, f"warm-{name}-{n}")
        for repeat in range(args.repeats):
            for n in args.ranks:
                order = list(variants.items()) if repeat % 2 == 0 else list(variants.items())[::-1]
                for name, (tree, env_extra) in order:
                    results[(name, n)].append(_run(tree, n, flags, folder, f"{name}-{n}-{repeat}", env_extra))
                if args.minimal_layout and n == min(args.ranks):
                    sizes = results[("this", n)][0]
                    minimal.append(_run_minimal(folder, f"minimal-{repeat}", sizes["steps"], sizes["n_params"]))
                    last = results[(name, n)][-1]
                    print(f"repeat {repeat + 1} n={n} {name}: train {last['train_time_s']:.3f} s, flush+close "
                          f"{1000 * (last['flush_s'] + last['close_s']):.1f} ms ({last['flushes']} flushes; "
                          f"fsync {1000 * last.get('fsync_s', 0.0):.1f} ms, read-back "
                          f"{1000 * last.get('verify_s', 0.0):.1f} ms)", flush=True)
    summary = {"flags": flags, "repeats": args.repeats, "against": str(trees["other"]), "points": []}
    for n in args.ranks:
        point = {"ranks": n}
        for name in variants:
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
            point[name].update({key: round(statistics.median(r[key] for r in rows), 5)
                                for key in PARTS if key in rows[0]})
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
        this = point["this"]
        if all(key in this for key in PARTS):
            sync_s = this["writeback_s"] + this["fsync_s"]
            build_s = this["rows_s"] + this["final_s"] + this["image_close_s"]
            print(f"n={n} split of this tree's {1000 * this['flush_close_s']:.1f} ms: rows "
                  f"{1000 * this['rows_s']:.2f}, /final {1000 * this['final_s']:.2f}, in-memory close "
                  f"{1000 * this['image_close_s']:.2f} ms; device sync {1000 * sync_s:.2f} (start "
                  f"{1000 * this['writeback_s']:.2f} + fdatasync {1000 * this['fsync_s']:.2f}), read-back "
                  f"{1000 * this['verify_s']:.2f} ms; the rest (HDF5's flush and image, attributes, temporary "
                  f"file, lock, rename) {1000 * (this['flush_close_s'] - build_s - sync_s - this['verify_s']):.2f} "
                  f"ms", flush=True)
        if "floor" in point:
            floor = point["floor"]
            print(f"n={n} floor (this tree, rows dropped at the close): {1000 * floor['flush_close_s']:.1f} ms = "
                  f"{100 * floor['flush_close_share']:.2f}% of training", flush=True)
    if minimal:
        n = min(args.ranks)
        point = next(p for p in summary["points"] if p["ranks"] == n)
        hdf5_s = statistics.median(m["hdf5_s"] for m in minimal)
        guarantees_s = statistics.median(m["guarantees_s"] for m in minimal)
        total_s = statistics.median(m["hdf5_s"] + m["guarantees_s"] for m in minimal)
        summary["minimal_layout"] = {"ranks": n, "hdf5_s": round(hdf5_s, 5), "guarantees_s": round(guarantees_s, 5),
                                     "close_s": round(total_s, 5),
                                     "share": round(total_s / point["this"]["train_time_s"], 5)}
        print(f"minimal layout at n={n}'s sizes (one dataset for every row): HDF5 {1000 * hdf5_s:.2f} ms + "
              f"guarantees {1000 * guarantees_s:.2f} ms = {1000 * total_s:.2f} ms = "
              f"{100 * summary['minimal_layout']['share']:.2f}% of n={n}'s training", flush=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
