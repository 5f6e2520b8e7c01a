"""The distributed trainer end to end, under mpiexec: equivalence, logs, accuracy, faults, user errors."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnpar.model import build_network
from cnnpar.runlog import open_log
from mpi_util import REPO, cnnpar_lines, run_mpi, run_train


def _final_params(path) -> np.ndarray:
    with open_log(path) as log:
        return np.asarray(log.final["params"], dtype=np.float64)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("n, allreduce", [(2, "mpi"), (2, "shm"), (3, "shm")])
def test_n_ranks_one_sample_equals_one_rank_n_samples(tmp_path, n, allreduce, reduce):
    """One rank adds its k samples' gradients in sample order; the shm exchange adds ranks' gradients in rank
    order (and two-rank MPI sums are order-free), so the two runs must agree bit for bit, not just closely."""
    flags = ["--dataset", "mnist-5k", "--steps", "400", "--reduce", reduce, "--lr", "0.01", "--seed", "3",
             "--quiet", "--allreduce", allreduce]
    wide = run_train(n, *flags, "--samples-per-rank", "1", "--log", tmp_path / "wide.h5")
    assert wide.returncode == 0, wide.stderr
    deep = run_train(1, *flags, "--samples-per-rank", str(n), "--log", tmp_path / "deep.h5")
    assert deep.returncode == 0, deep.stderr
    start = build_network("small").init_params(3)
    wide_params, deep_params = _final_params(tmp_path / "wide.h5"), _final_params(tmp_path / "deep.h5")
    assert _rel_diff(wide_params, start) > 1e-2, "training must have moved the params for the check to mean much"
    assert np.array_equal(deep_params, wide_params), _rel_diff(deep_params, wide_params)


def test_mpi_allreduce_at_three_ranks_matches_one_rank_closely(tmp_path):
    """MPI's summation order is its own: agreement within float32 rounding over a shorter run (longer runs can
    split at a near-tie of a max-pool or relu, which rounding alone decides)."""
    flags = ["--dataset", "mnist-5k", "--steps", "150", "--lr", "0.01", "--seed", "3", "--quiet"]
    wide = run_train(3, *flags, "--allreduce", "mpi", "--log", tmp_path / "wide.h5")
    deep = run_train(1, *flags, "--samples-per-rank", "3", "--log", tmp_path / "deep.h5")
    assert wide.returncode == 0 and deep.returncode == 0, wide.stderr + deep.stderr
    assert _rel_diff(_final_params(tmp_path / "deep.h5"), _final_params(tmp_path / "wide.h5")) < 1e-5


def test_mpiexec_one_rank_equals_plain_python(tmp_path):
    flags = ["--dataset", "mnist-5k", "--steps", "300", "--quiet", "--seed", "1"]
    under_mpi = run_train(1, *flags, "--log", tmp_path / "mpi.h5")
    assert under_mpi.returncode == 0, under_mpi.stderr
    plain = subprocess.run([sys.executable, "-m", "cnnpar.train", *flags, "--log", str(tmp_path / "plain.h5")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plain.returncode == 0, plain.stderr
    assert np.array_equal(_final_params(tmp_path / "mpi.h5"), _final_params(tmp_path / "plain.h5"))


def test_log_holds_every_field_and_matches_what_was_printed(tmp_path):
    path = tmp_path / "run.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--epochs", "2", "--log", path, "--check-every", "500")
    assert done.returncode == 0, done.stderr
    printed = [float(x) / 100 for x in re.findall(r"test loss [\d.]+ acc ([\d.]+)%", done.stderr)]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy [\d.]+% \| 8000 samples in [\d.]+ s \(\d+ samples/s, training only\) "
                        r"\| log .*run\.h5", summary), summary
    with open_log(path) as log:
        assert log.complete and log.ranks == 2
        assert log.config["epochs"] == 2 and log.config["dataset"] == "mnist-5k"
        for key in ("cnnpar", "python", "numpy", "numba", "mpi4py", "mpi_library", "hostnames", "cores"):
            assert key in log.env, key
        steps = log.steps
        assert np.array_equal(steps["step"], np.arange(4000))  # 4000 samples / (2 ranks x 1) x 2 epochs
        for name in ("compute_s", "exchange_s", "wait_s", "rank_loss"):
            assert steps[name].shape == (4000, 2), name
        assert np.all(steps["compute_s"] > 0) and np.all(steps["wait_s"] >= 0)
        assert np.all(np.isfinite(steps["loss"]))
        assert list(log.epochs["epoch"]) == [0, 1]
        np.testing.assert_allclose(log.epochs["test_acc"], printed, atol=0.0006)  # printed to 0.1%
        final_acc = float(re.search(r"test accuracy ([\d.]+)%", summary).group(1)) / 100
        assert abs(log.final["attrs"]["test_acc"] - final_acc) < 0.0006
        confusion = np.asarray(log.final["confusion"])
        assert confusion.sum() == 1000
        assert abs(np.trace(confusion) / 1000 - log.epochs["test_acc"][-1]) < 1e-9
        assert all(log.consistency["ok"]) and len(log.consistency["step"]) >= 2
        assert log.final["params"].shape == (sum(size for *_, size in log.layout),)


def test_small_arch_one_rank_three_epochs_reaches_90_percent(tmp_path):
    done = run_train(1, "--dataset", "mnist-5k", "--log", tmp_path / "acc.h5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "run: " not in done.stderr  # --quiet: not even the start-up line
    with open_log(tmp_path / "acc.h5") as log:
        assert log.config["epochs"] == 3 and log.config["arch"] == "small"
        assert log.final["attrs"]["test_acc"] >= 0.90


def test_a_rank_raising_mid_run_ends_the_job_promptly(tmp_path):
    path = tmp_path / "fault.h5"
    start = time.monotonic()
    done = run_mpi(3, [REPO / "tests" / "mpi_fault_driver.py", "--dataset", "mnist-5k", "--epochs", "3",
                       "--log", path], env={"FAULT_RANK": "1", "FAULT_CALL": "2000"}, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "injected fault" in done.stderr
    assert elapsed < 30  # includes start-up; the job does not hang
    with open_log(path) as log:  # rank 0 was killed, but every flushed epoch is readable
        assert len(log.epochs["epoch"]) == 1  # 1334 steps per epoch: the fault hit in the second epoch


@pytest.mark.parametrize("flags, culprit", [
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--mode", "bogus"], "command line"),
    (["--arch", "conv8k5,blah"], "--arch"),
    (["--dataset", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--samples-per-rank", "3000"], "--samples-per-rank"),
    (["--log", "/nonexistent/dir/run.h5"], "--log"),
])
def test_user_errors_are_one_line_once_exit_2_nothing_written(tmp_path, flags, culprit):
    before = set(tmp_path.iterdir())
    args = ["--dataset", "mnist-5k", "--log", str(tmp_path / "x.h5")] + flags
    done = run_train(2, *args, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = cnnpar_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cnnpar: error: ") and culprit in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert set(tmp_path.iterdir()) == before


def test_help_is_printed_once_and_names_every_flag():
    from dataclasses import fields

    from cnnpar.config import Config

    done = run_train(2, "--help", timeout=60)
    assert done.returncode == 0
    assert done.stdout.count("usage:") == 1
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in done.stdout


def test_folds_train_in_rank_groups_and_report_mean_and_sd(tmp_path):
    path = tmp_path / "folds.h5"
    done = run_train(4, "--dataset", "mnist-5k", "--folds", "2", "--epochs", "1", "--log", path, "--quiet")
    assert done.returncode == 0, done.stderr
    match = re.search(r"cross-validation accuracy ([\d.]+)% \+- ([\d.]+)% over 2 folds", done.stdout)
    assert match, done.stdout
    with open_log(path) as log:
        folds = log.folds
        assert list(folds["fold"]) == [0, 1]
        assert log.ranks == 2  # each fold's group has 2 of the 4 ranks; the log records fold 0's steps
        assert all(0.8 < acc <= 1.0 for acc in folds["test_acc"])  # held-out halves of the training set
        assert abs(float(match.group(1)) / 100 - np.mean(folds["test_acc"])) < 0.0006
        assert abs(float(match.group(2)) / 100 - np.std(folds["test_acc"], ddof=1)) < 0.0006


STARTUP_LINE = re.compile(
    r"run: (?P<ranks>\d+) ranks? on (?P<nodes>\d+) (?P<pretend>pretend )?nodes? \| (?P<dataset>\S+): "
    r"(?P<n_train>[\d,]+) train / (?P<n_test>[\d,]+) test images (?P<image>[\dx]+), (?P<classes>\d+) classes \| "
    r"(?P<arch>\S+), (?P<params>[\d,]+) params \| mode (?P<mode>\w+), exchange (?P<exchange>.+?)(?P<auto> \(auto\))? "
    r"\| lr (?P<lr>\S+), reduce (?P<reduce>\w+) \| (?:(?P<epochs>\d+) epochs? = )?(?P<steps>[\d,]+) steps of "
    r"(?P<batch>[\d,]+) samples \((?P<per_batch_ranks>\d+) x (?P<per_rank>\d+)\) \| log (?P<log>.+)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _startup_line(done) -> re.Match:
    lines = [line for line in done.stderr.splitlines() if line.startswith("run: ")]
    assert len(lines) == 1 and "run: " not in done.stdout, done.stderr  # one line, rank 0 alone
    match = STARTUP_LINE.fullmatch(lines[0])
    assert match, lines[0]
    return match


def _assert_startup_line_tells_the_run(line: re.Match, path) -> None:
    with open_log(path) as log:
        config = log.config
        assert _number(line["ranks"]) == log.ranks == log.env["ranks"]
        assert _number(line["nodes"]) == log.env["nodes"] and bool(line["pretend"]) == bool(config["pretend_nodes"])
        assert line["dataset"] == config["dataset"]
        assert _number(line["n_train"]) == log.epochs["samples"][0]  # one epoch: every training sample once
        assert _number(line["n_test"]) == log.final["confusion"].sum()
        assert _number(line["classes"]) == log.n_classes
        network = build_network(config["arch"], n_classes=log.n_classes)
        assert line["image"] == "x".join(map(str, network.input_shape))
        assert line["arch"] == config["arch"] and _number(line["params"]) == log.final["params"].size
        assert line["mode"] == config["mode"] and line["exchange"] == log.env["exchange"]
        chooser = config["allreduce"] if config["mode"] == "sync" else config["race_window"]
        assert bool(line["auto"]) == (chooser == "auto")
        assert float(line["lr"]) == config["lr"] and line["reduce"] == config["reduce"]
        assert _number(line["epochs"]) == config["epochs"] and not config["steps"]
        assert _number(line["steps"]) == log.final["attrs"]["steps"] == len(log.steps["step"])
        assert _number(line["batch"]) == log.steps["samples"][0]
        assert _number(line["per_batch_ranks"]) * _number(line["per_rank"]) == _number(line["batch"])
        assert _number(line["per_rank"]) == config["samples_per_rank"]
        assert line["log"] == str(path)


def test_the_startup_line_says_what_the_run_is(tmp_path):
    path = tmp_path / "sync.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--epochs", "1", "--lr", "0.02", "--progress", "lines",
                     "--log", path)
    assert done.returncode == 0, done.stderr
    line = _startup_line(done)
    _assert_startup_line_tells_the_run(line, path)
    # what 'auto' chose, as the factory built it: one node, one sample per rank -> the factored exchange
    assert line["exchange"] == "factored" and line["auto"]
    assert done.stderr.index("run: ") < done.stderr.index("epoch 1:")
    _assert_one_samples_per_s(done, path)


def test_progress_summary_and_log_give_one_samples_per_s(tmp_path):
    """Race mode with its audit (which costs more than the training it checks): the progress line, the summary
    and the log all give training samples over training time, audit left out (the progress line once counted
    the audit and said 216 where the summary said 1,271)."""
    path = tmp_path / "race.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--epochs", "1", "--mode", "race", "--race-audit",
                     "--progress", "lines", "--log", path)
    assert done.returncode == 0, done.stderr
    line = _startup_line(done)
    _assert_startup_line_tells_the_run(line, path)
    assert line["exchange"] == "race, shared window" and line["auto"]
    _assert_one_samples_per_s(done, path)


def _assert_one_samples_per_s(done, path) -> None:
    progress = [int(rate) for rate in re.findall(r"^step \d+/\d+ \| loss \S+ \| (\d+) samples/s$", done.stderr, re.M)]
    summary = int(re.search(r"\((\d+) samples/s, training only\)", done.stdout).group(1))
    with open_log(path) as log:
        logged = log.final["attrs"]["samples_per_s"]
        assert logged == pytest.approx(log.final["attrs"]["samples"] / log.final["attrs"]["train_time_s"])
    assert summary == round(logged)
    # the last progress line is drawn after the last window's flush, a few statements before the clock stops
    assert progress and abs(progress[-1] - summary) <= 0.05 * summary, (progress, summary)
