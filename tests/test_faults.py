"""The fault matrix of docs/faults.md: full disks, signals and killed ranks, each checked for the exit
status, the time to exit, the one line printed, the log's status, that plain HDF5 (h5py and Debian's
h5dump) opens the log, that its flushed rows equal an uninterrupted run's, and that `--resume auto`
then finishes bit-identical to the uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import h5py
import numpy as np
import pytest

from cnnpar.runlog import open_log
from cnnpar.signals import SECOND_SIGNAL_S, STOP_SIGNALS, StopRequest
from mpi_util import REPO, cnnpar_lines, launcher_is_open_mpi, mpiexec, run_mpi, run_train, wait_for_rank_pids

H5DUMP = shutil.which("h5dump")
DISK_FLAGS = ["--dataset", "mnist-5k", "--seed", "7", "--momentum", "0.5", "--epochs", "3",
              "--checkpoint-every", "1e", "--quiet"]
# Long enough that a signal sent 0-0.6 s after the first epoch's flush lands mid-run on an idle machine too
SIGNAL_EPOCHS = 20
SIGNAL_FLAGS = ["--dataset", "mnist-5k", "--seed", "7", "--momentum", "0.5", "--epochs", str(SIGNAL_EPOCHS),
                "--checkpoint-every", "1e", "--quiet"]
SIGNAL_RANKS = 4  # the signal tests' rank count; the rows run at SCALE_RANKS too
SCALE_RANKS = 12  # README's job: on a 2-core machine, oversubscribed 6 to 1
# Each row at both rank counts, this many times; CNNPAR_FAULT_REPEATS=10 looks for races 1 time in 10
REPEATS = int(os.environ.get("CNNPAR_FAULT_REPEATS", "3"))
# From the signal to the launcher's exit, generous for a loaded machine (a hang still fails): measured
# 2-6 s under MPICH at 4 and 12 ranks, and up to 15 s (4 ranks) and 56 s (12 ranks) under Open MPI at a
# load average of 30 on 2 cores
EXIT_WITHIN_S = {SIGNAL_RANKS: 30.0, SCALE_RANKS: 90.0}


def _h5dump_reads(path) -> None:
    if H5DUMP is None:
        return  # the skip is visible in test_h5dump_reads_complete_interrupted_and_killed_logs
    done = subprocess.run([H5DUMP, "-H", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _plain_open(path) -> None:
    with h5py.File(path, "r") as f:  # no swmr, no special flags: what any user or tool does
        assert f.attrs["format"] == b"cnnpar-runlog"


def _lines(stderr: str) -> list:
    """The job's own lines: without Open MPI's report of a failed job and its `mpirun: ` notes."""
    return [line for line in cnnpar_lines(stderr) if not line.startswith("mpirun: ")]


def _launcher_passes_exit_status() -> bool:
    """MPICH's mpiexec exits with the ranks' status (130, 143, 138 after a stop signal); Open MPI's mpirun
    reports a job whose ranks exited non-zero with 1 of its own (the ranks' statuses are in its banner)."""
    return not launcher_is_open_mpi()


def _skip_unless_launcher_forwards_signals() -> None:
    if not _launcher_passes_exit_status():
        pytest.skip("Open MPI's mpirun turns SIGINT/SIGTERM into SIGTERM for the ranks and SIGKILLs them 1 s "
                    "later (docs/faults.md): the launcher-signal rows are checked under MPICH's mpiexec")


def _assert_stop_status(returncode: int, expected: int, stderr: str) -> None:
    if _launcher_passes_exit_status():
        assert returncode == expected, stderr
    else:
        assert returncode != 0, stderr


def _same_prefix(log, reference) -> int:
    """The log's flushed rows are the reference run's first rows, bit for bit; returns how many."""
    n = len(log.steps["step"])
    for key, values in log.steps.items():
        if key not in ("compute_s", "exchange_s", "wait_s"):  # timings differ between runs
            # a rank without samples in a step (12 ranks, an epoch's last step) has a NaN rank_loss
            assert np.array_equal(values, reference.steps[key][:n], equal_nan=values.dtype.kind == "f"), key
    for key in ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "samples"):
        assert np.array_equal(log.epochs[key], reference.epochs[key][: len(log.epochs["epoch"])]), key
    return n


def _resume_matches(n, flags, path, reference) -> None:
    resumed = run_train(n, *flags, "--log", path, "--resume", "auto", timeout=600)  # 12 ranks, loaded: minutes
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    with open_log(path) as log:
        assert log.complete
        assert np.array_equal(log.final["params"], reference.final["params"])
        assert np.array_equal(log.steps["loss"], reference.steps["loss"])
        assert np.array_equal(log.steps["step"], np.arange(len(reference.steps["step"])))
        assert np.array_equal(log.epochs["test_acc"], reference.epochs["test_acc"])


# ----------------------------------------------------------------------------------------------------
# full disks


def _tmpfs(size: str):
    """A fresh small tmpfs, or None where mounting is not allowed (then the driver uses RLIMIT_FSIZE)."""
    folder = tempfile.mkdtemp(prefix="cnnpar-full-")
    if os.geteuid() == 0 and shutil.which("mount"):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
        if done.returncode == 0:
            return folder
    os.rmdir(folder)
    return None


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    done = run_train(2, *DISK_FLAGS, "--log", path)
    assert done.returncode == 0, done.stderr
    return open_log(path)


# moment of the fault, whether a checkpoint is left to resume from, which file the line names
DISK_ROWS = [("publish:2", False, "log"),     # the first flush (epoch 1)
             ("publish:3", True, "log"),      # a middle flush (epoch 2; epoch 1's checkpoint is kept)
             ("final", True, "log"),          # the closing write of /final
             ("checkpoint:2", True, "ckpt")]  # the second checkpoint (the first survives)


@pytest.mark.parametrize("how", ["fill", "rlimit"])
@pytest.mark.parametrize("moment, resumable, culprit", DISK_ROWS, ids=[r[0] for r in DISK_ROWS])
def test_disk_full(tmp_path, disk_reference, moment, resumable, culprit, how):
    """`fill`: a real 8 MB tmpfs filled up just before the write; `rlimit`: the write fails with EFBIG
    (RLIMIT_FSIZE), a real failing write where no tmpfs can be mounted."""
    folder = _tmpfs("8m") if how == "fill" else str(tmp_path)
    if folder is None:
        pytest.skip("mount -t tmpfs is not allowed here; the rlimit rows stand in")
    try:
        path = os.path.join(folder, "a.h5")
        started = time.monotonic()
        done = run_mpi(2, [REPO / "tests" / "mpi_fault_driver.py", *DISK_FLAGS, "--log", path],
                       env={"FAULT_DISK": moment, "FAULT_DISK_HOW": how}, timeout=180)
        elapsed_s = time.monotonic() - started
        cause = "no space left on device" if how == "fill" else "file too large"
        named = f"{path}.ckpt" if culprit == "ckpt" else path
        flag = "--checkpoint-every" if culprit == "ckpt" else "--log"
        assert done.returncode == 1, done.stderr
        assert _lines(done.stderr) == [f"cnnpar: error: {flag}: {named}: {cause}"], done.stderr
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
        assert elapsed_s < 120
        with open_log(path) as log:
            assert log.status in ("failed", "incomplete") and log.final is None
            flushed = _same_prefix(log, disk_reference)
        assert flushed > 0 or moment == "publish:2"
        _plain_open(path)
        _h5dump_reads(path)
        if os.path.exists(os.path.join(folder, "filler")):
            os.remove(os.path.join(folder, "filler"))  # the user frees space, then continues
        leftovers = sorted(name for name in os.listdir(folder) if name not in ("a.h5", "a.h5.ckpt"))
        assert leftovers == [], leftovers  # no temporary file is left behind
        if resumable:
            assert os.path.exists(f"{path}.ckpt")
            _resume_matches(2, DISK_FLAGS, path, disk_reference)
        else:
            assert not os.path.exists(f"{path}.ckpt")
    finally:
        if how == "fill":
            subprocess.run(["umount", folder], check=False)
            os.rmdir(folder)


def test_the_issue_reproduction_a_300k_tmpfs_gives_one_line(tmp_path):
    """docs/faults.md's first example: a disk too small for the log."""
    folder = _tmpfs("300k")
    if folder is None:
        pytest.skip("mount -t tmpfs is not allowed here (the rlimit rows of test_disk_full stand in)")
    try:
        path = os.path.join(folder, "a.h5")
        done = run_train(2, "--dataset", "mnist-5k", "--epochs", "3", "--log", path, "--quiet")
        assert done.returncode == 1
        assert _lines(done.stderr) == [f"cnnpar: error: --log: {path}: no space left on device"], done.stderr
        with open_log(path) as log:
            assert not log.complete and log.final is None
        _plain_open(path)
        _h5dump_reads(path)
    finally:
        subprocess.run(["umount", folder], check=False)
        os.rmdir(folder)


# ----------------------------------------------------------------------------------------------------
# signals and kills, at 4 and 12 ranks, repeated


@pytest.fixture(scope="module")
def signal_references(tmp_path_factory):
    """ranks -> the uninterrupted run's log, made on first use."""
    made = {}

    def reference(ranks: int):
        if ranks not in made:
            path = tmp_path_factory.mktemp("ref") / f"ref{ranks}.h5"
            done = run_train(ranks, *SIGNAL_FLAGS, "--log", path, timeout=900)  # 12 ranks, cold, loaded
            assert done.returncode == 0, done.stderr
            made[ranks] = open_log(path)
        return made[ranks]

    return reference


def _start(path, tag, flags, ranks=SIGNAL_RANKS):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CNNPAR_TEST_TAG=tag)
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "cnnpar.train", *flags, "--log", str(path)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's job is


def _wait_for_epochs(path, epochs: int, job, timeout_s=180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()
        try:
            if len(open_log(path).epochs["epoch"]) >= epochs:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.02)
    pytest.fail("no epoch completed in time")


def _wait_until_no_writer(path, timeout_s=10.0) -> None:
    """mpiexec may return while its killed ranks are still being reaped; the log is `incomplete` from
    the moment the writer's process is gone."""
    from cnnpar.runlog.lock import writer_alive

    deadline = time.monotonic() + timeout_s
    while writer_alive(str(path)) and time.monotonic() < deadline:
        time.sleep(0.02)


# how the signal is delivered, the signal, exit status, log status, the line's start (None: no line), as
# MPICH's mpiexec passes them on; _open_mpi_outcomes says what Open MPI's mpirun makes of the launcher rows
SIGNAL_ROWS = [
    ("mpirun", signal.SIGINT, 130, "interrupted", "cnnpar: stopped by SIGINT after step "),
    ("group", signal.SIGINT, 130, "interrupted", "cnnpar: stopped by SIGINT after step "),
    ("mpirun", signal.SIGTERM, 143, "preempted", "cnnpar: stopped by SIGTERM after step "),
    ("rank 2", signal.SIGTERM, 143, "preempted", "cnnpar: stopped by SIGTERM after step "),
    ("mpirun", signal.SIGUSR1, 138, "preempted", "cnnpar: stopped by SIGUSR1 after step "),
    ("rank 0", signal.SIGKILL, None, "incomplete", None),
    ("rank 1", signal.SIGKILL, None, "incomplete", None),
]


def _open_mpi_outcomes(to, signum, status, line) -> list:
    """(log status, line start or None) that the row may end with under Open MPI's mpirun, which forwards
    SIGUSR1 as is but turns SIGINT and SIGTERM into SIGTERM for every rank and SIGKILLs them about a
    second later (docs/faults.md): the ranks stop as `preempted` with SIGTERM's line when they reach a
    window flush in time, else the SIGKILL ends them (`incomplete`, no line). To the process group, each
    rank gets the SIGINT itself first and mpirun's SIGTERM after it."""
    sigterm = ("preempted", "cnnpar: stopped by SIGTERM after step ")
    killed = ("incomplete", None)
    if to == "mpirun" and signum in (signal.SIGINT, signal.SIGTERM):
        return [sigterm, killed]
    if to == "group":
        return [(status, line), sigterm, killed]
    return [(status, line)]


@pytest.mark.parametrize("attempt", range(REPEATS))
@pytest.mark.parametrize("ranks", [SIGNAL_RANKS, SCALE_RANKS])
@pytest.mark.parametrize("to, signum, exit_status, status, line", SIGNAL_ROWS,
                         ids=[f"{r[1].name}-to-{r[0].replace(' ', '')}" for r in SIGNAL_ROWS])
def test_signal(tmp_path, signal_references, to, signum, exit_status, status, line, ranks, attempt):
    reference = signal_references(ranks)
    outcomes = [(status, line)] if _launcher_passes_exit_status() else _open_mpi_outcomes(to, signum, status, line)
    path = tmp_path / "sig.h5"
    tag = f"sig-{os.getpid()}-{signum}-{to.replace(' ', '')}-{ranks}-{attempt}"
    job = _start(path, tag, SIGNAL_FLAGS, ranks)
    try:
        pids = wait_for_rank_pids(tag, ranks)
        _wait_for_epochs(path, 1, job)
        time.sleep(random.uniform(0.0, 0.6))  # somewhere in the second epoch
        sent_at = time.monotonic()
        if to == "mpirun":
            os.kill(job.pid, signum)
        elif to == "group":
            os.killpg(job.pid, signum)  # a terminal's ^C: mpiexec and every rank at once
        else:
            os.kill(pids[int(to.split()[1])], signum)
        _, stderr = job.communicate(timeout=120)
        exit_s = time.monotonic() - sent_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    print(f"row {to} {signum.name} n={ranks}: exit {job.returncode} after {exit_s:.2f} s, "
          f"{len(_lines(stderr))} line(s)")  # the figures docs/faults.md quotes (pytest -s shows them)
    assert exit_s <= EXIT_WITHIN_S[ranks], exit_s
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert job.returncode != 0, stderr
    _wait_until_no_writer(path)
    with open_log(path) as log:
        assert log.status in dict(outcomes), (log.status, log.status_message, stderr)
        line = dict(outcomes)[log.status]
        flushed = _same_prefix(log, reference)
        assert flushed >= len(reference.steps["step"]) // SIGNAL_EPOCHS  # at least the first epoch
        if line is not None:  # stopped at a step boundary that is also a window flush
            assert log.status_message.startswith(line[len("cnnpar: "):])
    lines = _lines(stderr)
    if line is not None:
        if exit_status is not None and log.status == status:
            _assert_stop_status(job.returncode, exit_status, stderr)
        assert len(lines) == 1 and lines[0].startswith(line), stderr
        assert "checkpoint" in lines[0] and "--resume auto" in lines[0]
    else:
        assert not any(text.startswith("cnnpar:") for text in lines), stderr
    _plain_open(path)
    _h5dump_reads(path)
    if attempt == 0:
        _resume_matches(ranks, SIGNAL_FLAGS, path, reference)


def test_signal_without_checkpointing_says_so_and_checkpoint_on_signal_makes_one(tmp_path):
    _skip_unless_launcher_forwards_signals()
    flags = ["--dataset", "mnist-5k", "--epochs", "4", "--quiet"]
    for extra, expect_checkpoint in (([], False), (["--checkpoint-on-signal"], True)):
        path = tmp_path / f"plain{len(extra)}.h5"
        tag = f"plain-{os.getpid()}-{len(extra)}"
        job = _start(path, tag, flags + extra)
        try:
            wait_for_rank_pids(tag, SIGNAL_RANKS)
            _wait_for_epochs(path, 1, job)
            os.kill(job.pid, signal.SIGTERM)
            _, stderr = job.communicate(timeout=60)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        _assert_stop_status(job.returncode, 143, "")
        lines = _lines(stderr)
        assert len(lines) == 1, stderr
        assert os.path.exists(f"{path}.ckpt") == expect_checkpoint
        assert ("--resume auto" in lines[0]) == expect_checkpoint
        assert open_log(path).status == "preempted"


@pytest.mark.parametrize("to", ["group", "ranks"])
def test_a_second_ctrl_c_aborts_at_once(tmp_path, to):
    """The first ^C waits for the next window flush; with windows as long as an epoch, a second ^C a
    second or more later does not wait for it. To the process group (a terminal), hydra's mpiexec
    answers the second ^C itself by killing the job; to the ranks alone, cnnpar's handler does."""
    from cnnpar import data

    try:
        data.resolve_dataset("fashion-mnist", None)
    except Exception:  # noqa: BLE001
        pytest.skip("needs Fashion-MNIST (Debian's dataset-fashion-mnist) for epochs long enough to wait in")
    path = tmp_path / "twice.h5"
    tag = f"twice-{os.getpid()}-{to}"
    # 15,000 steps per epoch at 4 ranks and no window flush before the epoch ends: the first ^C waits long
    flags = ["--dataset", "fashion-mnist", "--arch", "lenet", "--epochs", "1", "--log-window", "100000", "--quiet"]
    job = _start(path, tag, flags)
    try:
        pids = wait_for_rank_pids(tag, SIGNAL_RANKS)

        def interrupt():
            if to == "group":
                os.killpg(job.pid, signal.SIGINT)
            else:
                for pid in pids.values():
                    os.kill(pid, signal.SIGINT)

        deadline = time.monotonic() + 300
        while not path.exists() and time.monotonic() < deadline:  # created just before the loop starts
            assert job.poll() is None, job.communicate()
            time.sleep(0.02)
        time.sleep(1.0)
        interrupt()
        time.sleep(1.5)
        assert job.poll() is None, "the run stopped before the second ^C: make its epochs longer"
        second_at = time.monotonic()
        interrupt()
        _, stderr = job.communicate(timeout=30)
        abort_s = time.monotonic() - second_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert abort_s < 3.0, abort_s
    # To the ranks alone, the ranks' deaths by SIGINT are the job's status. To the group, hydra's forced
    # abort decides it, and hydra then exited 0 in 3 of 12 tries here: the log's status below says what
    # happened whatever the launcher reports.
    assert (job.returncode != 0 or to == "group") and "Traceback" not in stderr, stderr
    assert not any(line.startswith("cnnpar:") for line in _lines(stderr)), stderr  # nothing waited to speak
    _wait_until_no_writer(path)
    with open_log(path) as log:
        assert log.status == "incomplete"
    _plain_open(path)
    _h5dump_reads(path)


# ----------------------------------------------------------------------------------------------------
# stop signals during the first run's compile (a cold kernel cache)

COMPILE_FLAGS = ["--dataset", "mnist-5k", "--seed", "3", "--steps", "40"]
COMPILE_EXIT_WITHIN_S = 5.0  # the goal is 2 s (docs/faults.md quotes the measured figures); a loaded machine


@pytest.fixture(scope="module")
def warm_reference(tmp_path_factory):
    """The short run, with this tree's usual (warm) kernel cache."""
    path = tmp_path_factory.mktemp("ref") / "warm.h5"
    done = run_train(SIGNAL_RANKS, *COMPILE_FLAGS, "--log", path, "--quiet")
    assert done.returncode == 0, done.stderr
    return open_log(path)


def _output_reader(job):
    """The job's stderr lines as they come (a thread reads them, so the job never blocks on the pipe)."""
    import threading

    seen = []

    def read():
        for text in job.stderr:
            seen.append(text.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return seen, reader


@pytest.mark.parametrize("to, signum", [("group", signal.SIGINT), ("mpirun", signal.SIGTERM),
                                        ("rank 0", signal.SIGKILL)],
                         ids=["SIGINT-to-group", "SIGTERM-to-mpirun", "SIGKILL-to-rank0"])
def test_a_stop_signal_during_the_first_compile(tmp_path, warm_reference, to, signum):
    """Mid-compile on a cold cache: out within seconds with one line (none for SIGKILL), no log, and the
    next run on that cache loads or recompiles what was left and trains bit-identical."""
    # Open MPI's mpirun turns ^C and SIGTERM into SIGTERM for every rank and SIGKILLs them a second later
    # (docs/faults.md): a rank that ends its kernel's compile in time says so (SIGINT, when the group's own
    # ^C reached it first, or SIGTERM), else the SIGKILL ends it without a line; either way nothing is
    # written, and the next run on the cache trains bit-identical.
    open_mpi = launcher_is_open_mpi()
    cache = tmp_path / "cache"
    cache.mkdir()
    path = tmp_path / "cold.h5"
    tag = f"cold-{os.getpid()}-{signum}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", CNNPAR_TEST_TAG=tag, CNNPAR_CACHE_DIR=str(cache))
    command = [mpiexec(), "-n", str(SIGNAL_RANKS), sys.executable, "-m", "cnnpar.train", *COMPILE_FLAGS,
               "--log", str(path)]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    seen, reader = _output_reader(job)
    try:
        pids = wait_for_rank_pids(tag, SIGNAL_RANKS)
        deadline = time.monotonic() + 120
        while not any(text.startswith("compiling numba kernels") for text in seen):
            assert job.poll() is None and time.monotonic() < deadline, seen
            time.sleep(0.02)
        time.sleep(random.uniform(0.5, 3.0))  # somewhere in the compile (10-35 s here)
        assert not any(re.match(r"compiled (\d+)/\1 kernels", text) for text in seen), seen  # still compiling
        sent_at = time.monotonic()
        if to == "group":
            os.killpg(job.pid, signum)
        elif to == "mpirun":
            os.kill(job.pid, signum)
        else:
            os.kill(pids[0], signum)
        job.wait(timeout=60)
        exit_s = time.monotonic() - sent_at
        reader.join(timeout=30)  # EOF: no helper process holds the job's output open
        assert not reader.is_alive(), "a process of the job outlived it"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    stderr = "\n".join(seen)
    ours = [text for text in _lines(stderr) if text.startswith("cnnpar:")]
    print(f"compile row {to} {signum.name}: exit {job.returncode} after {exit_s:.2f} s, {len(ours)} cnnpar line(s)")
    assert exit_s <= COMPILE_EXIT_WITHIN_S, exit_s
    assert job.returncode != 0 and "Traceback" not in stderr, stderr
    if signum == signal.SIGKILL:
        # Open MPI's mpirun answers a rank's death with SIGTERM to the others, and one of them says so
        expected = ([], ["cnnpar: stopped by SIGTERM while starting"]) if open_mpi else ([],)
        assert [text[:len("cnnpar: stopped by SIGTERM while starting")] for text in ours] in expected, stderr
    elif not (open_mpi and ours == []):
        if _launcher_passes_exit_status():
            # Every rank ends at once, before MPI's finalise; hydra SIGKILLs the ranks still running when the
            # first one's PMI connection closes (its clean-up of a failed job), and reports 9 if one of them
            # had not yet ended (docs/faults.md): which comes first is a race the ranks cannot settle
            assert job.returncode in (128 + signum, signal.SIGKILL), stderr
        else:
            assert job.returncode != 0, stderr
        names = {signum.name, "SIGTERM"} if open_mpi else {signum.name}
        assert len(ours) == 1 and any(ours[0].startswith(f"cnnpar: stopped by {name} while starting")
                                      for name in names), stderr
        assert "nothing was written" in ours[0]
        leftovers = [str(p) for p in cache.rglob("*") if ".tmp" in p.name]
        assert leftovers == [], leftovers  # a save in progress was finished first, not cut
    assert not path.exists() and not list(tmp_path.glob("cold.h5*")), sorted(os.listdir(tmp_path))
    # The next run on the same cache: whatever was saved loads, the rest compiles, and it trains the same
    again = run_train(SIGNAL_RANKS, *COMPILE_FLAGS, "--log", path, "--quiet", env={"CNNPAR_CACHE_DIR": str(cache)},
                      timeout=300)
    assert again.returncode == 0, again.stderr
    with open_log(path) as log:
        assert log.complete
        assert np.array_equal(log.final["params"], warm_reference.final["params"])
        assert np.array_equal(log.steps["loss"], warm_reference.steps["loss"])


# ----------------------------------------------------------------------------------------------------
# the stop request's handlers, in this process: nothing armed outlives the loop, nothing at all the run


def _handlers():
    return {signum: signal.getsignal(signum) for signum in (*STOP_SIGNALS, signal.SIGALRM)}


def test_the_second_signal_timer_is_cancelled_when_the_loop_ends_and_every_handler_put_back():
    before = _handlers()
    stop = StopRequest()
    with stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first ^C: noted, and the second-signal timer armed
        assert stop.signum == signal.SIGINT
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= SECOND_SIGNAL_S
        deadline = time.monotonic() + 5 * SECOND_SIGNAL_S
        while signal.getsignal(signal.SIGINT) is not signal.SIG_DFL and time.monotonic() < deadline:
            time.sleep(0.01)  # the timer hands the stop signals to their default action (kill at once)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    # The loop is over: a shutdown follows that no signal may cut short, and no timer is left to fire
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert all(signal.getsignal(signum) == stop._note for signum in STOP_SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)  # a copy, or a second signal during the shutdown: only noted
    assert stop.signum == signal.SIGINT
    stop.restore()
    assert _handlers() == before and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_a_timer_that_fires_after_the_loop_ended_hands_nothing_to_the_default_action():
    before = _handlers()
    stop = StopRequest()
    with stop:
        os.kill(os.getpid(), signal.SIGUSR1)
    stop.escalating = True  # as if the timer had been armed by a stop noted at the loop's last moment
    stop._escalate(signal.SIGALRM, None)
    stop.escalating = False
    stop._escalate(signal.SIGALRM, None)  # after the loop: does nothing
    stop.stand_down()
    assert all(signal.getsignal(signum) == stop._note for signum in STOP_SIGNALS)
    stop.restore()
    assert _handlers() == before


STUCK_IN_C = """
import hashlib, sys
from cnnpar.signals import StopRequest
StopRequest().install_for_startup(speaks=True)
print("ready", flush=True)
for _ in range(10):
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000_000)  # seconds in C, the GIL released (as LLVM in numba)
print("finished", flush=True)
"""


def test_a_startup_stop_ends_a_process_stuck_in_a_long_c_call_at_once():
    """Mid-compile a rank can sit in one C call for seconds, where no Python handler runs: the watcher thread
    ends it at once with its line (else hydra SIGKILLs it when the other ranks end, and the job exits 9)."""
    job = subprocess.Popen([sys.executable, "-c", STUCK_IN_C], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline() == "ready\n"
        time.sleep(0.3)  # inside the first C call (seconds long even on an idle machine)
        sent_at = time.monotonic()
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=120)
        exit_s = time.monotonic() - sent_at
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 128 + signal.SIGTERM, err
    assert "finished" not in out
    assert err.splitlines() == ["cnnpar: stopped by SIGTERM while starting (loading data, compiling kernels); "
                                "nothing was written: run the same command again"], err
    assert exit_s < 2.0, exit_s


ONE_RANK_STOPS = """
import os, signal, time
from mpi4py import MPI
from cnnpar.signals import StopRequest
world = MPI.COMM_WORLD
StopRequest().install_for_startup(speaks=world.Get_rank() == 0).share_the_startup_line(world)
world.Barrier()
if world.Get_rank() == 2:
    os.kill(os.getpid(), signal.SIGTERM)  # only this rank: as `kill` of one rank, or rank 0 not yet run
time.sleep(60)
"""


def test_a_startup_stop_of_one_rank_is_said_once_by_that_rank():
    """The start-up line comes from the first rank of rank 0's node to act, so a stop that rank 0 never
    acted on (the launcher killed it first, or it never got the signal) still says it, once."""
    started = time.monotonic()
    done = run_mpi(SIGNAL_RANKS, ["-c", ONE_RANK_STOPS], timeout=120)
    lines = [line for line in _lines(done.stderr) if line.startswith("cnnpar:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert lines == ["cnnpar: stopped by SIGTERM while starting (loading data, compiling kernels); nothing was "
                     "written: run the same command again"], done.stderr
    assert time.monotonic() - started < 50  # the launcher ended the job, not the ranks' sleep


def test_the_startup_watcher_ends_when_the_loop_begins_and_leaves_no_wakeup_fd():
    before = _handlers()
    stop = StopRequest().install_for_startup(speaks=False)
    assert any(t.name == "cnnpar-stop-watch" for t in threading.enumerate())
    stop.install()  # the log is created next: from here signals are only noted
    deadline = time.monotonic() + 10
    while any(t.name == "cnnpar-stop-watch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the watcher outlived the start-up"
        time.sleep(0.01)
    assert signal.set_wakeup_fd(-1) == -1  # none left behind
    os.kill(os.getpid(), signal.SIGTERM)  # noted, not an exit
    assert stop.signum == signal.SIGTERM
    stop.restore()
    assert _handlers() == before


def test_a_run_without_a_stop_signal_arms_nothing():
    before = _handlers()
    stop = StopRequest()
    with stop:
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    stop.restore()
    assert _handlers() == before


# ----------------------------------------------------------------------------------------------------
# HDF5 1.10 tools


def test_h5dump_reads_complete_interrupted_and_killed_logs(tmp_path):
    _skip_unless_launcher_forwards_signals()
    if H5DUMP is None:
        pytest.skip("h5dump not found: install Debian's hdf5-tools to check HDF5 1.10 compatibility")
    complete = tmp_path / "complete.h5"
    assert run_train(2, "--dataset", "mnist-5k", "--steps", "300", "--log", complete, "--quiet").returncode == 0
    interrupted = tmp_path / "interrupted.h5"
    tag = f"dump-{os.getpid()}"
    job = _start(interrupted, tag, ["--dataset", "mnist-5k", "--epochs", "4", "--quiet", "--race-audit",
                                    "--mode", "race"])
    wait_for_rank_pids(tag, SIGNAL_RANKS)
    _wait_for_epochs(interrupted, 1, job)
    os.kill(job.pid, signal.SIGINT)
    job.communicate(timeout=60)
    killed = tmp_path / "killed.h5"
    tag = f"dumpk-{os.getpid()}"
    job = _start(killed, tag, ["--dataset", "mnist-5k", "--epochs", "4", "--quiet"])
    pids = wait_for_rank_pids(tag, SIGNAL_RANKS)
    _wait_for_epochs(killed, 1, job)
    os.kill(pids[0], signal.SIGKILL)
    job.communicate(timeout=60)
    _wait_until_no_writer(killed)
    for path, status in ((complete, "complete"), (interrupted, "interrupted"), (killed, "incomplete")):
        assert open_log(path).status == status
        done = subprocess.run([H5DUMP, str(path)], capture_output=True, text=True, timeout=120)  # every dataset
        assert done.returncode == 0 and "ERROR" not in done.stdout, (path, done.stderr[-2000:])
        listing = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0 and "*ERROR*" not in listing.stdout, listing.stdout
        with h5py.File(path, "r") as f:
            names = []
            f.visit(names.append)
            datasets = [n for n in names if isinstance(f[n], h5py.Dataset)]
            for name in datasets:  # every dataset is self-describing
                assert "units" in f[name].attrs and "description" in f[name].attrs, name
                assert f[name].attrs["description"], name
