"""Reliability: exact resume, killed ranks, determinism, divergence, and validation before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnpar.runlog import open_log
from mpi_util import REPO, cnnpar_lines, mpiexec, run_mpi, run_train, wait_for_rank_pids

BASE = ["--dataset", "mnist-5k", "--seed", "5", "--quiet", "--momentum", "0.5"]


def _log(path):
    with open_log(path) as log:
        return {"params": np.array(log.final["params"]) if log.final else None,
                "steps": {k: np.array(v) for k, v in log.steps.items()},
                "epochs": {k: np.array(v) for k, v in log.epochs.items()}, "status": log.status}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, n):
    flags = BASE + ["--steps", "900", "--checkpoint-every", "250", "--eval-every", "1"]
    whole = run_train(n, *flags, "--log", tmp_path / "whole.h5")
    assert whole.returncode == 0, whole.stderr

    broken_log = tmp_path / "broken.h5"
    # Rank n-1 dies on its 640th forward/backward (the warm-up makes one call): after the checkpoint at 500.
    broken = run_mpi(n, [REPO / "tests" / "mpi_fault_driver.py", *flags, "--log", broken_log],
                     env={"FAULT_RANK": str(n - 1), "FAULT_CALL": "640"}, timeout=120)
    assert broken.returncode != 0 and "injected fault" in broken.stderr
    assert os.path.exists(f"{broken_log}.ckpt")
    resumed = run_train(n, *flags, "--log", broken_log, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr

    a, b = _log(tmp_path / "whole.h5"), _log(broken_log)
    assert b["status"] == "complete"
    assert np.array_equal(b["steps"]["step"], np.arange(900))  # no duplicated or missing steps
    assert np.array_equal(a["params"], b["params"])
    assert np.array_equal(a["steps"]["loss"], b["steps"]["loss"])
    for key in ("epoch", "train_loss", "train_acc", "test_acc"):
        assert np.array_equal(a["epochs"][key], b["epochs"][key]), key


def test_two_sync_runs_with_the_same_seed_are_bit_identical(tmp_path):
    flags = BASE + ["--steps", "600"]
    for name in ("one", "two"):
        done = run_train(3, *flags, "--log", tmp_path / f"{name}.h5")
        assert done.returncode == 0, done.stderr
    one, two = _log(tmp_path / "one.h5"), _log(tmp_path / "two.h5")
    assert np.array_equal(one["params"], two["params"])
    assert np.array_equal(one["steps"]["loss"], two["steps"]["loss"])
    assert np.array_equal(one["steps"]["rank_loss"], two["steps"]["rank_loss"])


def test_resume_auto_without_a_checkpoint_keeps_the_dead_log_and_starts_over(tmp_path):
    flags = BASE + ["--steps", "600", "--checkpoint-every", "1e"]
    log = tmp_path / "run.h5"
    # dies at its 300th step, long before the first checkpoint (an epoch is 1334 steps at 3 ranks)
    broken = run_mpi(3, [REPO / "tests" / "mpi_fault_driver.py", *flags, "--log", log],
                     env={"FAULT_RANK": "2", "FAULT_CALL": "300"}, timeout=120)
    assert broken.returncode != 0 and not os.path.exists(f"{log}.ckpt")
    dead = log.read_bytes()
    (tmp_path / "run.no-checkpoint-1.h5").write_bytes(b"someone else's file")
    from cnnpar.runlog.lock import WriterLock, writer_alive

    deadline = time.monotonic() + 30
    while writer_alive(str(log)) and time.monotonic() < deadline:  # the aborted rank 0 may outlive mpiexec
        time.sleep(0.1)
    held = WriterLock(str(log))  # as a live run's writer holds it
    try:
        refused = run_train(3, *flags, "--log", log, "--resume", "auto")
    finally:
        held.release()
    assert refused.returncode == 2 and log.read_bytes() == dead
    (line,) = cnnpar_lines(refused.stderr)
    assert line.startswith("cnnpar: error: --log: ") and "being written by a running job" in line, line
    again = run_train(3, *[f for f in flags if f != "--quiet"], "--log", log, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    lines = [line for line in cnnpar_lines(again.stdout + again.stderr) if line.startswith("note: ")]
    assert any(f"{log} has no checkpoint" in line and "run.no-checkpoint-2.h5" in line for line in lines), lines
    assert (tmp_path / "run.no-checkpoint-2.h5").read_bytes() == dead
    assert (tmp_path / "run.no-checkpoint-1.h5").read_bytes() == b"someone else's file"
    whole = run_train(3, *flags, "--log", tmp_path / "whole.h5")
    assert whole.returncode == 0, whole.stderr
    restarted, reference = _log(log), _log(tmp_path / "whole.h5")
    assert restarted["status"] == "complete" and np.array_equal(restarted["params"], reference["params"])
    done = run_train(3, *flags, "--log", log, "--resume", "auto")  # complete: nothing to do, nothing moved
    assert done.returncode == 0 and "nothing to resume" in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.glob("run.*")) == ["run.h5", "run.no-checkpoint-1.h5",
                                                            "run.no-checkpoint-2.h5"]


def test_killed_rank_ends_the_job_promptly_and_resume_finishes(tmp_path):
    path = tmp_path / "killed.h5"
    flags = ["--dataset", "mnist-5k", "--epochs", "8", "--checkpoint-every", "1e", "--log", str(path), "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    job = subprocess.Popen([mpiexec(), "-n", "3", sys.executable, "-m", "cnnpar.train", *flags], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(env, CNNPAR_TEST_TAG="pending"))
    try:
        pids = wait_for_rank_pids("pending", 3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first completed epoch, reading the live log
            if os.path.exists(path):
                try:
                    with open_log(path) as log:
                        if len(log.epochs["epoch"]) >= 1:
                            break
                except Exception:
                    pass
            time.sleep(0.05)
        else:
            pytest.fail("no epoch completed in time")
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        job.wait(timeout=30)
        assert time.monotonic() - killed_at < 10
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
    with open_log(path) as log:
        completed = len(log.epochs["epoch"])
        assert 1 <= completed < 8
    resumed = run_train(3, *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    with open_log(path) as log:
        assert log.complete
        steps_per_epoch = -(-4000 // 3)
        assert np.array_equal(log.steps["step"], np.arange(8 * steps_per_epoch))
        assert list(log.epochs["epoch"]) == list(range(8))


def test_divergence_stops_with_one_line_naming_the_step_and_keeps_the_log(tmp_path):
    path = tmp_path / "diverged.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--lr", "1e30", "--steps", "400", "--log", path, "--quiet")
    assert done.returncode == 2, done.stderr
    lines = cnnpar_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("cnnpar: error: --lr: ") and "at step" in lines[0] and "--reduce mean" in lines[0]
    with open_log(path) as log:
        assert log.status == "diverged"
        assert "at step" in log.status_message


@pytest.mark.parametrize("n, flags, culprit", [
    (3, ["--folds", "2"], "--folds"),
    (2, ["--arch", "conv8k29,relu,pool,dense10"], "--arch"),
    (2, ["--log", "/proc/version/run.h5"], "--log"),
    (2, ["--checkpoint-every", "soon"], "--checkpoint-every"),
    (2, ["--resume", "/nonexistent.ckpt"], "--resume"),
    (2, ["--steps", "-3"], "--steps"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, n, flags, culprit):
    before = sorted(os.listdir(tmp_path))
    done = run_train(n, "--dataset", "mnist-5k", "--log", str(tmp_path / "x.h5"), *flags, timeout=60)
    assert done.returncode == 2
    lines = cnnpar_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"cnnpar: error: {culprit}"), done.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_with_another_rank_count_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    first = run_train(2, *BASE, "--steps", "300", "--checkpoint-every", "100", "--log", path)
    assert first.returncode == 0, first.stderr
    again = run_train(3, *BASE, "--steps", "300", "--checkpoint-every", "100", "--log", path, "--resume", "auto")
    assert again.returncode == 2
    assert "2 ranks" in again.stderr and "3" in again.stderr and again.stderr.count("cnnpar: error") == 1


def test_resume_refuses_another_log_table_setting_and_accepts_another_machine_setting(tmp_path):
    """--race-audit decides whether the log has /audit (config.py: it changes the tables): a resume must keep
    it. --wait and --check-every change no update nor table: a resume may change them."""
    path = tmp_path / "a.h5"
    flags = [*BASE, "--mode", "atomic", "--steps", "200", "--checkpoint-every", "100", "--log", path]
    first = run_train(2, *flags, "--race-audit")
    assert first.returncode == 0, first.stderr
    before = path.read_bytes()
    refused = run_train(2, *flags, "--resume", "auto")
    assert refused.returncode == 2
    lines = cnnpar_lines(refused.stderr)
    assert len(lines) == 1 and lines[0].startswith("cnnpar: error: --race-audit") and "/audit" in lines[0], lines
    assert path.read_bytes() == before
    accepted = run_train(2, *flags, "--race-audit", "--wait", "yield", "--check-every", "7", "--resume", "auto")
    assert accepted.returncode == 0 and "nothing to resume" in accepted.stdout + accepted.stderr, accepted.stderr


def test_the_log_records_the_job_and_the_replica_and_its_start(tmp_path):
    """With --folds 2 on 2 ranks the per-rank tables hold fold 0's one rank; the job had 2. `created` is
    the instant the default file name is stamped with (the start, not after compilation)."""
    import datetime

    done = run_mpi(2, ["-m", "cnnpar.train", "--dataset", "mnist-5k", "--folds", "2", "--steps", "50", "--quiet"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (path,) = (tmp_path / "runs").iterdir()
    with open_log(path) as log:
        assert log.ranks == 1 and log.world_ranks == 2 and log.steps["compute_s"].shape[1] == 1
        assert log.env["ranks"] == 2 and isinstance(log.env["threads_per_rank"], int)
        stamp = datetime.datetime.strptime(path.name.split("-n2-")[0], "%Y%m%d-%H%M%S").astimezone()
        created = datetime.datetime.strptime(log.created, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc)
        assert created == stamp.astimezone(datetime.timezone.utc)
