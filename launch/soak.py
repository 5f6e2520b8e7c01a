"""Soak check: a long run's ranks must not grow, and its log must stay readable while it is written.

    python launch/soak.py                       # mpiexec -n 12, 20 epochs on the bundled data
    python launch/soak.py --ranks 4 --epochs 5 -- --mode race

Samples every rank's resident memory (from /proc) once a second, opens the live HDF5 log with the
project's reader at the same time, and reports per rank the growth of resident memory from the end of
the first epoch to the end of the run. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnpar.runlog import open_log  # noqa: E402


def rank_pids(tag: str, variable: str = "CNNPAR_SOAK_TAG") -> dict:
    """rank -> pid of the MPI processes whose environment has `variable` set to `tag` (from their PMI_RANK)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in items if b"=" in item)
        if env.get(variable.encode()) == tag.encode() and b"PMI_RANK" in env:
            found[int(env[b"PMI_RANK"])] = int(pid)
    return found


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("train_args", nargs="*", help="more flags for cnnpar.train (after --)")
    args = parser.parse_args()
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    with tempfile.TemporaryDirectory() as folder:
        log_path = os.path.join(folder, "soak.h5")
        tag = str(os.getpid())
        command = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "cnnpar.train", "--dataset", "mnist-5k",
                   "--epochs", str(args.epochs), "--log", log_path, "--quiet", *args.train_args]
        job = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, CNNPAR_SOAK_TAG=tag),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples = []   # (epochs done, {rank: rss})
        reads, read_errors = 0, []
        while job.poll() is None:
            pids = rank_pids(tag)
            epochs_done = None
            if os.path.exists(log_path):
                try:
                    with open_log(log_path) as log:
                        epochs_done = len(log.epochs["epoch"])
                        reads += 1
                except Exception as err:  # noqa: BLE001 - any failure to read a live log is the finding
                    read_errors.append(f"{type(err).__name__}: {err}")
            try:
                rss = {rank: rss_bytes(pid) for rank, pid in pids.items()}
            except OSError:
                rss = {}
            if epochs_done is not None and rss:
                samples.append((epochs_done, rss))
            time.sleep(1.0)
        out, err = job.communicate()
        if job.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        after_first = [s for s in samples if s[0] >= 1]
        if len(after_first) < 2:
            print("soak: the run ended before enough samples were taken; use more --epochs", file=sys.stderr)
            return 1
        first, last = after_first[0][1], after_first[-1][1]
        growth = {rank: (last[rank] - first[rank]) / first[rank] for rank in first if rank in last}
        for rank in sorted(growth):
            print(f"rank {rank:2d}: rss {first[rank] / 2**20:7.1f} MiB after epoch 1 -> "
                  f"{last[rank] / 2**20:7.1f} MiB at the end ({100 * growth[rank]:+.2f}%)")
        print(out.strip().splitlines()[-1])
        print(f"live log reads: {reads} ok, {len(read_errors)} failed")
        result = {"ranks": args.ranks, "epochs": args.epochs, "max_rss_growth": max(growth.values()),
                  "live_log_reads": reads, "live_log_read_errors": len(read_errors), "samples": len(after_first)}
        print(json.dumps(result))
        return 0 if result["max_rss_growth"] < 0.05 and not read_errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
