"""Kill soak: SIGKILL rank 0 of a training run at random moments, and check what it leaves behind.

    python launch/kill_soak.py                   # 30 kills of a 2-rank, 3-epoch run on the bundled data
    python launch/kill_soak.py --kills 30 --ranks 4 --seed 1

Each round starts the same run, waits until its log exists, sleeps a random time drawn uniformly over the
run's span (measured once, from an uninterrupted run of the same flags), then SIGKILLs world rank 0 (the
log's writer). It then checks that a plain `h5py.File(path, "r")` and Debian's `h5dump -H` open the log,
that `open_log` reports it `incomplete` (or `complete`, when the kill came after the log was closed),
and that its rows equal the uninterrupted run's first rows. A
kill that lands while a flush is writing leaves `<log>.flush-tmp` behind; those rounds are counted apart.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402

from cnnpar.runlog import open_log  # noqa: E402
from cnnpar.launcher import rank_pids  # noqa: E402

TIMING_COLUMNS = ("compute_s", "exchange_s", "wait_s")


def _start(mpiexec, ranks, flags, path, tag):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CNNPAR_KILL_TAG=tag)
    return subprocess.Popen([mpiexec, "-n", str(ranks), sys.executable, "-m", "cnnpar.train", *flags, "--log",
                             path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _status(path) -> str:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs["status"].decode()
    except Exception:  # noqa: BLE001 - not there yet
        return ""


def _rows_match(log, reference) -> bool:
    n = len(log.steps["step"])
    same = all(np.array_equal(v, reference.steps[k][:n]) for k, v in log.steps.items() if k not in TIMING_COLUMNS)
    e = len(log.epochs["epoch"])
    return same and all(np.array_equal(log.epochs[k], reference.epochs[k][:e])
                        for k in ("epoch", "step", "train_loss", "test_acc"))


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30, help="rounds, one SIGKILL of rank 0 each")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("train_args", nargs="*", help="flags for cnnpar.train (after --); default "
                        "--dataset mnist-5k --epochs 3 --checkpoint-every 1e --quiet")
    args = parser.parse_args()
    flags = args.train_args or ["--dataset", "mnist-5k", "--epochs", "3", "--checkpoint-every", "1e", "--quiet"]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = shutil.which("mpiexec") or "mpiexec"
    h5dump = shutil.which("h5dump")
    chance = random.Random(args.seed)
    import h5py

    with tempfile.TemporaryDirectory() as folder:
        reference_path = os.path.join(folder, "reference.h5")
        job = _start(mpiexec, args.ranks, flags, reference_path, "reference")
        while not os.path.exists(reference_path) and job.poll() is None:
            time.sleep(0.005)
        created_at = time.monotonic()
        span_s = None
        while job.poll() is None or span_s is None:  # the span: from the log's creation to its `complete`
            if _status(reference_path) == "complete":
                span_s = time.monotonic() - created_at
                break
            time.sleep(0.01)
        job.wait()
        if job.returncode != 0:
            print(f"kill_soak: the uninterrupted run failed: {job.stderr.read()}", file=sys.stderr)
            return 1
        reference = open_log(reference_path)
        rounds = []
        round_no = 0
        while sum(not r["finished_first"] for r in rounds) < args.kills:
            round_no += 1
            path = os.path.join(folder, f"k{round_no}.h5")
            tag = f"kill-{os.getpid()}-{round_no}"
            job = _start(mpiexec, args.ranks, flags, path, tag)
            while not os.path.exists(path) and job.poll() is None:
                time.sleep(0.002)
            created_at = time.monotonic()
            delay_s = chance.uniform(0.0, span_s)  # after the log's creation
            pids = {}
            while not pids.get(0) and job.poll() is None:
                pids = rank_pids(tag, "CNNPAR_KILL_TAG")
            time.sleep(max(0.0, delay_s - (time.monotonic() - created_at)))
            finished_first = job.poll() is not None
            if not finished_first:
                os.kill(pids[0], signal.SIGKILL)
            job.wait(timeout=60)
            mid_flush = os.path.exists(f"{path}.flush-tmp")
            try:
                with h5py.File(path, "r") as f:
                    f.attrs["status"]
                plain_ok = True
            except Exception:  # noqa: BLE001 - counted
                plain_ok = False
            dump_ok = None
            if h5dump:
                dump_ok = subprocess.run([h5dump, "-H", path], capture_output=True).returncode == 0
            try:
                log = open_log(path)
                status, rows_ok, steps = log.status, _rows_match(log, reference), len(log.steps["step"])
            except Exception as err:  # noqa: BLE001 - counted
                status, rows_ok, steps = f"unreadable: {err}", False, 0
            rounds.append({"delay_s": round(delay_s, 3), "finished_first": finished_first, "mid_flush": mid_flush,
                           "plain_open": plain_ok, "h5dump": dump_ok, "status": status, "rows_intact": rows_ok,
                           "flushed_steps": steps})
            print(f"round {round_no} at {delay_s:.2f} s: {status}, {steps} steps flushed, plain "
                  f"open {'ok' if plain_ok else 'FAILED'}, h5dump {dump_ok}, rows {'intact' if rows_ok else 'DIFFER'}"
                  f"{', mid-flush' if mid_flush else ''}{', run had finished' if finished_first else ''}",
                  flush=True)
    killed = [r for r in rounds if not r["finished_first"]]
    summary = {
        "kills": len(killed), "ranks": args.ranks, "run_span_s": round(span_s, 2), "flags": flags,
        "plain_open_failures": sum(not r["plain_open"] for r in rounds),
        "h5dump_failures": sum(r["h5dump"] is False for r in rounds),
        "rows_differ": sum(not r["rows_intact"] for r in rounds),
        "incomplete": sum(r["status"] == "incomplete" for r in killed),
        "complete_before_the_kill": sum(r["status"] == "complete" for r in killed),
        "other_status": sum(r["status"] not in ("incomplete", "complete") for r in killed),
        "mid_flush_kills": sum(r["mid_flush"] for r in killed),
        "finished_before_the_kill": sum(r["finished_first"] for r in rounds),
    }
    print(json.dumps(summary))
    bad = summary["plain_open_failures"] or summary["rows_differ"] or summary["h5dump_failures"] or \
        summary["other_status"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
