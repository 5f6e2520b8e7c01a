"""Soak check: a long run's ranks must not grow, and its log must stay readable while it is written.

    python launch/soak.py                       # 12 ranks, 20 epochs on the bundled data
    python launch/soak.py --ranks 4 --epochs 5 -- --mode race
    python launch/soak.py --log runs/soak.h5    # keep the run's log (by default it lives in a temp folder)

Reads every rank's resident memory (from /proc) and opens the live HDF5 log with the project's reader a few
times a second, keeps one sample per finished epoch, and reports per rank the growth of resident memory from
the end of the first epoch to the last sample. The launcher is the sweep's (the mpiexec next to this Python,
else one on PATH; Open MPI's gets its flags); ranks are found by any launcher's rank variable. The last line
is one JSON object with every figure; exit 0 when no rank grew by 5% or more and every live read worked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.experiments.launchers import make_launcher
from cnnpar.launcher import rank_pids
from cnnpar.runlog import open_log

POLL_S = 0.2
MAX_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def epochs_in_log(path: str, reads: list, errors: list) -> int | None:
    if not os.path.exists(path):
        return None
    try:
        with open_log(path) as log:
            done = len(log.epochs["epoch"])
        reads.append(done)
        return done
    except Exception as err:  # noqa: BLE001 - any failure to read a live log is the finding
        errors.append(f"{type(err).__name__}: {err}")
        return None


def watch(job, tag: str, log_path: str, ranks: int) -> tuple:
    """Samples (epochs done, {rank: rss bytes}) of all `ranks` ranks: the first one seen at each epoch count,
    then the last one before the run ended (ranks that already exited do not count); and the live reads and
    their errors."""
    samples, reads, errors, latest = [], [], [], None
    while job.poll() is None:
        epochs_done = epochs_in_log(log_path, reads, errors)
        try:
            rss = {rank: rss_bytes(pid) for rank, pid in rank_pids(tag).items()}
            rss = {rank: size for rank, size in rss.items() if size > 0}  # an exited rank has no VmRSS
        except OSError:  # a rank ended between listing and reading
            rss = {}
        if epochs_done is not None and len(rss) == ranks:
            latest = (epochs_done, rss)
            if not samples or samples[-1][0] != epochs_done:
                samples.append(latest)
        time.sleep(POLL_S)
    if latest is not None and samples[-1] is not latest:
        samples.append(latest)
    return samples, reads, errors


def final_accuracy(path: str) -> float | None:
    try:
        with open_log(path) as log:
            return float(log.final["attrs"]["test_acc"]) if log.final else None
    except (UserError, KeyError, TypeError, ValueError, OSError):
        return None


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python launch/soak.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=12, help="MPI ranks (default 12)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the bundled mnist-5k (default 20; "
                        "at least 3: growth is measured from the end of epoch 1 over two or more epochs)")
    parser.add_argument("--log", help="where the run's log goes and stays (default: a temp folder, removed)")
    parser.add_argument("--launcher", help="MPI launcher command, as for launch/sweep.py (default: the mpiexec "
                        "next to this Python, else on PATH)")
    parser.add_argument("train_args", nargs="*", help="more flags for cnnpar.train (after --)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        raise UserError("--ranks", f"must be at least 1, got {args.ranks}")
    if args.epochs < 3:
        raise UserError("--epochs", f"must be at least 3 to see growth after the first epoch, got {args.epochs}")
    launcher = make_launcher(args.launcher)
    with tempfile.TemporaryDirectory(prefix="cnnpar-soak-") as folder:
        log_path = os.path.abspath(args.log) if args.log else os.path.join(folder, "soak.h5")
        tag = str(os.getpid())
        command = launcher.command(args.ranks, sys.executable, [
            "--dataset", "mnist-5k", "--epochs", str(args.epochs), "--log", log_path, "--quiet", *args.train_args])
        job = subprocess.Popen(command, env=dict(os.environ, CNNPAR_SOAK_TAG=tag),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        try:
            samples, reads, read_errors = watch(job, tag, log_path, args.ranks)
        except KeyboardInterrupt:
            job.terminate()
            raise
        out, err = job.communicate()
        seconds = time.monotonic() - started
        if job.returncode != 0:
            print(err.rstrip() or out.rstrip(), file=sys.stderr)
            print(f"soak: the run failed with exit status {job.returncode}", file=sys.stderr)
            return 1
        accuracy = final_accuracy(log_path)
    after_first = [s for s in samples if s[0] >= 1]
    if len(after_first) < 2:
        print(f"soak: the run took {seconds:.0f} s and only {len(after_first)} sample(s) came after its first "
              f"epoch (ranks found: {len(samples[-1][1]) if samples else 0}); use more --epochs", file=sys.stderr)
        return 1
    first, last = after_first[0][1], after_first[-1][1]
    growth = {rank: (last[rank] - first[rank]) / first[rank] for rank in first if rank in last}
    for rank in sorted(growth):
        print(f"rank {rank:2d}: rss {first[rank] / 2**20:7.1f} MiB after epoch {after_first[0][0]} -> "
              f"{last[rank] / 2**20:7.1f} MiB after epoch {after_first[-1][0]} ({100 * growth[rank]:+.2f}%)")
    kept = f"log {args.log}" if args.log else "log not kept (--log PATH keeps it)"
    acc = f"{100 * accuracy:.1f}%" if accuracy is not None else "?"
    print(f"test accuracy {acc} after {args.epochs} epochs in {seconds:.0f} s; {kept}")
    print(f"live log reads: {len(reads)} ok, {len(read_errors)} failed" +
          (f" (first: {read_errors[0]})" if read_errors else ""))
    result = {"ranks": args.ranks, "epochs": args.epochs, "max_rss_growth": max(growth.values()),
              "live_log_reads": len(reads), "live_log_read_errors": len(read_errors), "samples": len(after_first),
              "ranks_sampled": len(growth), "log": args.log}
    print(json.dumps(result))
    return 0 if result["max_rss_growth"] < MAX_GROWTH and not read_errors and len(growth) == args.ranks else 1


if __name__ == "__main__":
    raise SystemExit(main())
