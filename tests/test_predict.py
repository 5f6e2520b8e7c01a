"""The threshold predictor's numerics (cnnpar.analysis.predict) and the report's mechanism metrics
(cnnpar.analysis.mechanisms); the probe end to end runs in tests/test_map.py."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from cnnpar import data, model
from cnnpar.analysis import mechanisms as mech, predict
from mpi_util import REPO, clean_env


@pytest.mark.parametrize("lr,eps,b_noise", [(0.178, 0.09, 66.0), (0.05, 0.02, 3.0), (0.5, 0.3, 10.0)])
def test_critical_n_is_the_smallest_batch_inside_the_bound_and_c_interval_inverts_it(lr, eps, b_noise):
    for c in np.logspace(0, 3, 40):
        n = predict.critical_n(lr, eps, b_noise, c)
        bound = lambda b: c * eps * b / (b + b_noise)  # noqa: E731
        if n is None:
            assert bound(predict.MAX_N) < lr
        else:
            assert bound(n) >= lr * (1 - 1e-12) and (n == 1 or bound(n - 1) < lr)
        low, high = predict.c_interval(lr, n, eps, b_noise)
        assert low <= c * (1 + 1e-9) and (c < high * (1 + 1e-9))


def test_calibrate_lands_inside_the_constraints_it_can_meet():
    c, met, total = mech.calibrate([(2.0, 5.0), (3.0, 10.0), (100.0, 200.0)])
    assert (met, total) == (2, 3) and 3.0 <= c < 5.0
    assert c == pytest.approx(math.sqrt(3.0 * 5.0), rel=0.01)


def test_the_curvature_along_the_gradient_matches_the_loss_second_difference():
    dataset = data.load_dataset("mnist-5k")
    network = model.build_network("small", dataset.train_images.shape[1:], dataset.n_classes)
    params = network.init_params(3)
    images, labels = dataset.train_images[:500], dataset.train_labels[:500]
    got = predict.curvature_along_gradient(network, params, images, labels)
    g = predict.mean_gradient(network, params, images, labels)
    u = g / np.linalg.norm(g)
    h = 0.05

    def loss(shift):
        moved = (params.astype(np.float64) + shift * u).astype(np.float32)
        return network.evaluate(moved, images, labels)[0] / len(labels)

    second = (loss(h) - 2 * loss(0.0) + loss(-h)) / h ** 2
    assert got["curvature"] == pytest.approx(second, rel=0.1)
    assert got["g2_batch"] == pytest.approx(float(g @ g)) and got["eps_max"] == pytest.approx(1 / got["curvature"])


def test_null_models_and_the_bootstrap():
    ranks = list(range(1, 13))
    nulls = {m["name"]: m for m in mech.null_models(ranks)}
    assert nulls["best step"]["rms_pp"] <= nulls["chance, then constant"]["rms_pp"] <= nulls["best constant"]["rms_pp"]
    assert nulls["best step"]["curve"][0] == 26.0  # the best single jump is after n=1
    paper = np.array([mech.PAPER_ACC_PCT[n] for n in ranks])
    values = paper[:, None] + np.array([-2.0, 0.0, 2.0])[None, :]
    low, high = mech.bootstrap_rms(values, ranks)
    assert 0.0 <= low < high <= 2.0 + 1e-9  # resampled means stay within the seeds' spread around the paper
    assert list(mech.trained_fraction(np.array([[10.0, 60.0], [50.0, 90.0]]))) == [0.5, 1.0]


def test_predict_refuses_summed_gradients_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "analysis" / "predict.py"), "--reduce", "sum", "--lr", "0.1"],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "cnnpar: error: --reduce: the prediction is for averaged gradients ('mean'), not 'sum'"]


def test_observed_critical_n_is_where_half_the_seeds_first_train():
    from cnnpar.analysis.map_report import Setting

    setting = Setting("mnist-5k", "epochs", "sync", "", "mean", "0.3", 0)
    accs = {1: [10] * 8, 2: [10] * 5 + [80] * 3, 3: [10] * 4 + [80] * 4, 4: [80] * 8}
    curves = {setting: {n: dict(enumerate(v, start=1)) for n, v in accs.items()}}
    assert mech.observed_critical(curves, setting) == (3, list(range(1, 9)), 4)
    del curves[setting][4], curves[setting][3]
    assert mech.observed_critical(curves, setting) == (None, list(range(1, 9)), 2)
    assert mech.agrees({"predicted": 2, "observed": None, "ranks_run": 2})
    assert not mech.agrees({"predicted": 1, "observed": None, "ranks_run": 2})
    assert mech.agrees({"predicted": 4, "observed": 3, "ranks_run": 8})
    assert not mech.agrees({"predicted": None, "observed": 3, "ranks_run": 8})
