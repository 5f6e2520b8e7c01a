"""The gradient noise scale estimator (cnnpar/noise.py): recovers a known |G|^2 and tr(Sigma) from synthetic
gradients, and the trainer's estimate is the same for n ranks x 1 sample as for 1 rank x n samples."""

from __future__ import annotations

import numpy as np
import pytest

from cnnpar import noise

DIM = 16


def _population(seed=0):
    """A true gradient G and per-sample covariance Sigma = A A^T (full, not diagonal)."""
    rng = np.random.default_rng(seed)
    true_gradient = rng.normal(size=DIM)
    mixing = rng.normal(size=(DIM, DIM)) * 0.7
    return true_gradient, mixing, float(true_gradient @ true_gradient), float(np.trace(mixing @ mixing.T))


def _draw_steps(rng, true_gradient, mixing, unit_sizes, steps):
    """`steps` steps of per-sample gradients G + A z, grouped into units of the given sizes; returns the
    trainer's view: per-unit |sum|^2, per-unit counts, |sum over the step|^2."""
    batch = sum(unit_sizes)
    samples = true_gradient + rng.normal(size=(steps, batch, DIM)) @ mixing.T
    bounds = np.cumsum([0] + list(unit_sizes))
    unit_sums = np.stack([samples[:, lo:hi].sum(axis=1) for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)
    unit_sq = (unit_sums ** 2).sum(axis=2)
    total_sq = (unit_sums.sum(axis=1) ** 2).sum(axis=1)
    counts = np.broadcast_to(np.array(unit_sizes, np.float64), unit_sq.shape)
    return unit_sq, counts, total_sq


def _within_sampling_error(estimates, truth, sigmas=5.0):
    mean = float(np.mean(estimates))
    standard_error = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates)))
    assert abs(mean - truth) < sigmas * standard_error, (mean, truth, standard_error)
    return mean, standard_error


@pytest.mark.parametrize("unit_sizes", [(1, 1), (1,) * 12, (4, 4, 4), (3, 2, 2, 1), (5, 0, 5)],
                         ids=["2x1", "12x1", "3x4", "unequal", "empty-unit"])
def test_recovers_known_gradient_and_covariance(unit_sizes):
    true_gradient, mixing, g2_true, trace_true = _population()
    rng = np.random.default_rng(1)
    unit_sq, counts, total_sq = _draw_steps(rng, true_gradient, mixing, unit_sizes, 20000)
    g2, trace = noise.unbiased_estimates(*noise.step_terms(unit_sq, counts, total_sq))
    g2_mean, g2_se = _within_sampling_error(g2, g2_true)
    trace_mean, trace_se = _within_sampling_error(trace, trace_true)
    # the check has teeth: the sampling error is a few per cent of the values recovered
    assert g2_se < 0.1 * g2_true and trace_se < 0.1 * trace_true
    b_true = trace_true / g2_true
    assert noise.b_simple(g2, trace) == pytest.approx(b_true, rel=0.15)


def test_the_naive_estimates_are_biased_and_the_corrected_ones_are_not():
    """|g_big|^2 alone overestimates |G|^2 by tr(Sigma)/B: the correction is what makes the estimator work."""
    true_gradient, mixing, g2_true, trace_true = _population(seed=2)
    rng = np.random.default_rng(3)
    unit_sq, counts, total_sq = _draw_steps(rng, true_gradient, mixing, (1, 1, 1, 1), 20000)
    small_sq, small_inv, big_sq, big_inv = noise.step_terms(unit_sq, counts, total_sq)
    assert np.mean(big_sq) == pytest.approx(g2_true + trace_true / 4, rel=0.05)
    assert abs(np.mean(big_sq) - g2_true) > 0.2 * trace_true / 4
    g2, _ = noise.unbiased_estimates(small_sq, small_inv, big_sq, big_inv)
    _within_sampling_error(g2, g2_true)


def test_noiseless_gradients_give_exact_answers():
    true_gradient, _, g2_true, _ = _population()
    unit_sq, counts, total_sq = _draw_steps(np.random.default_rng(0), true_gradient, np.zeros((DIM, DIM)),
                                            (2, 2, 2), 3)
    g2, trace = noise.unbiased_estimates(*noise.step_terms(unit_sq, counts, total_sq))
    np.testing.assert_allclose(g2, g2_true, rtol=1e-12)
    np.testing.assert_allclose(trace, 0.0, atol=1e-9 * g2_true)


def test_one_unit_has_nothing_to_compare():
    g2, trace = noise.unbiased_estimates(*noise.step_terms([[4.0, 0.0]], [[2, 0]], [4.0]))
    assert np.isnan(g2).all() and np.isnan(trace).all()
    assert np.isnan(noise.b_simple(g2, trace))


def test_b_simple_is_a_ratio_of_means_and_says_nothing_when_the_signal_is_not_positive():
    assert noise.b_simple([1.0, 3.0, np.nan], [10.0, 30.0, 5.0]) == pytest.approx(10.0)
    assert np.isnan(noise.b_simple([-1.0, 0.5], [1.0, 1.0]))


def test_squared_norm_sums_in_float64():
    """A million float32 squares: exact to float64 rounding (a float32 running sum would be off by ~1e-3)."""
    import math

    values = np.random.default_rng(0).uniform(0.5, 1.5, 1_000_000).astype(np.float32)
    exact = math.fsum(float(v) * float(v) for v in values.tolist())
    assert noise.squared_norm(values) == pytest.approx(exact, rel=1e-10)
    assert noise.squared_norm(values.reshape(1000, 1000)) == noise.squared_norm(values)


def test_per_sample_forward_backward_is_the_batched_call_bit_for_bit():
    from cnnpar import data, model

    dataset = data.load_dataset("mnist-5k", None)
    network = model.build_network("small", dataset.train_images.shape[1:], dataset.n_classes)
    forward_backward_at = network.sampled_forward_backward(dataset.train_images, dataset.train_labels)
    params = network.init_params(3)
    order = data.epoch_permutation(3, 0, len(dataset.train_labels))
    batched, one_by_one, scratch = (np.zeros_like(params) for _ in range(3))
    expected = forward_backward_at(params, batched, order, 100, 107)
    loss_sum, correct, sq = noise.per_sample_forward_backward(forward_backward_at, params, one_by_one, scratch,
                                                              order, 100, 107)
    assert np.array_equal(batched, one_by_one)
    assert (loss_sum, correct) == expected
    alone = np.zeros_like(params)
    forward_backward_at(params, alone, order, 103, 104)
    assert sq[3] == noise.squared_norm(alone) and sq.shape == (7,)


# ----------------------------------------------------------------------------------------------------
# the trainer's --noise-scale


def _noise_tables(path):
    from cnnpar.runlog import open_log

    log = open_log(path)
    assert log.complete, log.status_message
    return log, log.noise, log.noise_epochs


@pytest.mark.parametrize("n, allreduce", [(2, "shm"), (3, "auto")])
def test_n_ranks_one_sample_and_one_rank_n_samples_give_the_same_estimate(tmp_path, n, allreduce):
    """Rank r's one-sample gradient is sample r's gradient inside the one rank, and both paths sum them in
    the same order: the estimates (and the training, which --noise-scale must not change) agree bit for bit."""
    from mpi_util import run_train

    flags = ["--dataset", "mnist-5k", "--steps", "600", "--lr", "0.05", "--reduce", "mean", "--seed", "2",
             "--quiet", "--log-window", "128", "--noise-scale"]
    wide = run_train(n, *flags, "--allreduce", allreduce, "--log", tmp_path / "wide.h5")
    deep = run_train(1, *flags, "--samples-per-rank", str(n), "--log", tmp_path / "deep.h5")
    plain = run_train(1, *flags[:-1], "--samples-per-rank", str(n), "--log", tmp_path / "plain.h5")
    for done in (wide, deep, plain):
        assert done.returncode == 0, done.stderr
    wide_log, wide_windows, wide_epochs = _noise_tables(tmp_path / "wide.h5")
    deep_log, deep_windows, deep_epochs = _noise_tables(tmp_path / "deep.h5")
    assert len(wide_windows["step"]) == 5 and list(wide_windows["step"]) == [127, 255, 383, 511, 599]
    for name in wide_windows:
        assert np.array_equal(wide_windows[name], deep_windows[name], equal_nan=True), name
    for name in wide_epochs:
        assert np.array_equal(wide_epochs[name], deep_epochs[name], equal_nan=True), name
    assert (wide_windows["b_small"] == 1).all() and (wide_windows["b_big"] == n).all()
    assert np.isfinite(wide_windows["trace"]).all() and (wide_windows["trace"] > 0).all()
    assert len(wide_epochs["epoch"]) == 1 and np.isfinite(wide_epochs["b_simple"][0])
    from cnnpar.runlog import open_log

    plain_log = open_log(tmp_path / "plain.h5")
    assert plain_log.noise is None
    assert np.array_equal(plain_log.final["params"], deep_log.final["params"])
    assert np.array_equal(wide_log.final["params"], deep_log.final["params"])


def test_two_ranks_of_two_samples_measure_at_the_ranks_batch(tmp_path):
    from mpi_util import run_train

    done = run_train(2, "--dataset", "mnist-5k", "--steps", "300", "--samples-per-rank", "2", "--noise-scale",
                     "--quiet", "--log", tmp_path / "run.h5")
    assert done.returncode == 0, done.stderr
    _, windows, epochs = _noise_tables(tmp_path / "run.h5")
    assert (windows["b_small"] == 2).all() and (windows["b_big"] == 4).all()
    assert windows["steps"].sum() == 300 and len(epochs["epoch"]) == 1


@pytest.mark.parametrize("n, k", [(1, 3), (2, 1)])
def test_a_killed_and_resumed_run_logs_the_uninterrupted_estimates(tmp_path, n, k):
    """The last checkpoint before the kill falls mid-epoch: the resumed run must continue the epoch's
    estimate sums from it and drop any windows written after it. A checkpoint ends a window in the
    uninterrupted run as well, so every table must come out bit for bit the same."""
    from mpi_util import REPO, run_mpi, run_train

    flags = ["--dataset", "mnist-5k", "--steps", "2400", "--samples-per-rank", str(k), "--lr", "0.05",
             "--reduce", "mean", "--seed", "4", "--quiet", "--log-window", "96", "--noise-scale",
             "--checkpoint-every", "300"]
    whole = run_train(n, *flags, "--log", tmp_path / "whole.h5")
    assert whole.returncode == 0, whole.stderr
    broken_log = tmp_path / "broken.h5"
    epoch_steps, checkpoint_at, fault_at = {1: (1334, 1200, 1400), 2: (2000, 1800, 2050)}[n]
    # (one rank computes its k samples' gradients one call each)
    broken = run_mpi(n, [REPO / "tests" / "mpi_fault_driver.py", *flags, "--log", broken_log],
                     env={"FAULT_RANK": str(n - 1), "FAULT_CALL": str(fault_at * (k if n == 1 else 1))},
                     timeout=120)
    assert broken.returncode != 0 and "injected fault" in broken.stderr
    resumed = run_train(n, *flags, "--log", broken_log, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    whole_log, whole_windows, whole_epochs = _noise_tables(tmp_path / "whole.h5")
    resumed_log, resumed_windows, resumed_epochs = _noise_tables(broken_log)
    assert resumed_log.resume_count == 1
    assert np.array_equal(whole_log.final["params"], resumed_log.final["params"])
    # with one rank the epoch's last step holds one sample (4000 = 3 x 1333 + 1): nothing to compare there
    assert whole_windows["steps"].sum() == 2400 - (n == 1)
    assert len(whole_epochs["epoch"]) == 2  # the epoch and the run's partial last one
    for name in whole_windows:
        assert np.array_equal(whole_windows[name], resumed_windows[name], equal_nan=True), name
    for name in whole_epochs:  # the epoch broke mid-way and still reports the uninterrupted figures
        assert np.array_equal(whole_epochs[name], resumed_epochs[name], equal_nan=True), name

    # Whether the killed run's last write came after its checkpoint depends on the clock; truncating a
    # copy of the whole log to the checkpoint shows what a resume keeps: the windows before it and no row
    # of the epoch it cut.
    import shutil

    from cnnpar.runlog import RunLogWriter, open_log

    cut = tmp_path / "cut.h5"
    shutil.copy(tmp_path / "whole.h5", cut)
    RunLogWriter.reopen(cut, checkpoint_at, 0).close("interrupted")
    with open_log(cut) as log:
        assert np.array_equal(log.noise["step"], whole_windows["step"][whole_windows["step"] < checkpoint_at])
        assert log.noise["step"][-1] == checkpoint_at - 1 and len(log.noise_epochs["step"]) == 0
    RunLogWriter.reopen(tmp_path / "whole.h5", epoch_steps + 1).close("interrupted")
    with open_log(tmp_path / "whole.h5") as log:
        assert list(log.noise_epochs["step"]) == [epoch_steps]


def test_resuming_with_another_noise_scale_setting_is_refused(tmp_path):
    from mpi_util import REPO, cnnpar_lines, run_mpi, run_train

    flags = ["--dataset", "mnist-5k", "--steps", "900", "--quiet", "--checkpoint-every", "300"]
    log = tmp_path / "run.h5"
    broken = run_mpi(2, [REPO / "tests" / "mpi_fault_driver.py", *flags, "--noise-scale", "--log", log],
                     env={"FAULT_RANK": "1", "FAULT_CALL": "500"}, timeout=120)
    assert broken.returncode != 0
    before = log.read_bytes()
    refused = run_train(2, *flags, "--log", log, "--resume", "auto")
    assert refused.returncode == 2
    lines = cnnpar_lines(refused.stderr)
    assert len(lines) == 1 and "--noise-scale" in lines[0] and "without the flag" not in lines[0], lines
    assert log.read_bytes() == before


@pytest.mark.parametrize("n, flags, says", [
    (1, [], "two batch sizes"),
    (2, ["--mode", "race"], "--mode sync"),
])
def test_noise_scale_user_errors(tmp_path, n, flags, says):
    from mpi_util import cnnpar_lines, run_train

    done = run_train(n, "--dataset", "mnist-5k", "--steps", "10", "--noise-scale", *flags, "--log",
                     tmp_path / "run.h5")
    assert done.returncode == 2
    lines = cnnpar_lines(done.stderr)  # without a launcher's report of the failed job
    assert len(lines) == 1 and lines[0].startswith("cnnpar: error: --noise-scale") and says in lines[0], lines
    assert not (tmp_path / "run.h5").exists()
