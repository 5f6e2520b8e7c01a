"""The accuracy map end to end at CI size: launch/map.py --tiny, then analysis/map_report.py, and every number
the report and table1_fit.json give is checked against the logs themselves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from cnnpar.errors import UserError
from cnnpar.runlog import open_log
from mpi_util import REPO, clean_env


def _run(*args, timeout=300):
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=clean_env())  # the map launches MPI itself
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _accuracies_from_logs(folder):
    """(dataset, reduce, lr, ranks) -> {seed: accuracy %} for the one-process sync logs, read directly."""
    out = defaultdict(dict)
    for path in (folder / "one-process").glob("*.h5"):
        log = open_log(path)
        assert log.complete
        c = log.config
        out[(c["dataset"], c["reduce"], float(c["lr"]), log.ranks * c["samples_per_rank"])][c["seed"]] = \
            100 * log.final["attrs"]["test_acc"]
    return out


def test_tiny_map_and_report_agree_with_the_logs(tmp_path):
    folder, report = tmp_path / "map", tmp_path / "report"
    first = _run(REPO / "launch" / "map.py", "--out", folder, "--tiny", "--jobs", "1")
    assert "map: part tiny: 6 points, 0 done, 6 to run" in first.stdout
    assert "map: part tiny-collapse: 2 points, 0 done, 2 to run" in first.stdout
    again = _run(REPO / "launch" / "map.py", "--out", folder, "--tiny", "--jobs", "1")  # resumable: nothing left
    assert "6 done, 0 to run" in again.stdout
    assert "tiny-check: 1 points, 1 done, 0 to run" in again.stdout
    _run(REPO / "analysis" / "map_report.py", folder, "--out", report)

    table = json.loads((report / "table1_fit.json").read_text())
    assert table["paper"][0] == 26.0 and table["paper"][-1] == 91.8 and len(table["paper"]) == 12
    logged = _accuracies_from_logs(folder)
    (fit,) = table["hypotheses"]  # the tiny map holds only averaged gradients at one epoch: H2
    assert fit["name"] == "H2:mnist-5k" and table["best"] == fit["name"] and fit["ranks"] == [1, 2, 3]
    flags = fit["flags"]
    lr = float(flags[flags.index("--lr") + 1])
    means = []
    for i, n in enumerate(fit["ranks"]):
        by_seed = logged[("mnist-5k", "mean", lr, n)]
        assert sorted(by_seed) == fit["seeds"] == [1]
        means.append(np.mean(list(by_seed.values())))
        assert abs(fit["accuracy_mean"][i] - means[-1]) < 1e-3
    paper = np.array(table["paper"][:3])
    assert abs(fit["rms_pp"] - np.sqrt(np.mean((np.array(means) - paper) ** 2))) < 1e-3
    # the metrics that tell mechanisms apart, from the same numbers
    assert fit["rms_interval_pp"] == [round(fit["rms_pp"], 2)] * 2  # one seed: every resample is the same curve
    assert fit["trained_fraction"] == [float(m >= 50) for m in means]
    assert fit["level_n1"] == round(means[0], 2) and fit["jump_1_3"] == round(means[2] - means[0], 2)
    nulls = {m["name"]: m["rms_pp"] for m in table["null_models"]}
    assert nulls["best constant"] == round(float(np.std(paper)), 2)
    assert nulls["best step"] == round(float(np.std(paper[1:]) * np.sqrt(2 / 3)), 2)  # 26 | 68.4, 74.8
    # it is the closest of the two learning rates the tiny map ran
    other = 0.01 if lr == 0.178 else 0.178
    other_means = [np.mean(list(logged[("mnist-5k", "mean", other, n)].values())) for n in (1, 2, 3)]
    assert fit["rms_pp"] <= np.sqrt(np.mean((np.array(other_means) - paper) ** 2)) + 1e-9

    text = (report / "explain.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| H2 | mnist-5k |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[4]) == round(fit["rms_pp"], 1)
    assert [float(c) for c in cells[-3:]] == [round(m, 1) for m in fit["accuracy_mean"]]
    assert "1 of 1 real N-rank sync runs end with final parameters bit-identical" in text
    assert "1 of 1 reruns end with parameters bit-identical" in text
    noise_row = next(line for line in text.splitlines() if line.startswith("| mnist-5k | mean | 0.178 | 2 |"))
    (noise_log,) = (folder / "noise").glob("*.h5")
    epoch_b = open_log(noise_log).noise_epochs["b_simple"][-1]
    assert float(noise_row.split("|")[6]) == round(float(epoch_b), 1)
    race_row = next(line for line in text.splitlines() if line.startswith("| mnist-5k | shared | 0.01 |"))
    (race_log,) = (folder / "real-ranks").glob("*race*audit*.h5")
    race = open_log(race_log)
    assert race.ranks == 2 and len(race.audit["step"]) == len(race.steps["step"]) > 0
    lost = race.audit["lost_contributions"]
    lost_pct = 100 * np.mean(lost) / (2 * race.final["params"].size)  # of the step's R x n_params contributions
    lost_cell = "0" if lost_pct == 0 else f"{lost_pct:.2g}" if lost_pct < 1 else f"{lost_pct:.1f}"
    assert race_row.split("|")[4].strip() == \
        f"{lost_cell} ({100 * np.mean(lost > 0):.1f}) / {100 * race.final['attrs']['test_acc']:.1f}"
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (report / figure).stat().st_size > 1000, figure

    # the collapse law: A(N, 0.178) - A(1, 0.178 / N), from the logs
    collapse = next(line for line in text.splitlines() if line.startswith("| mnist-5k | mean | 0.178 |"))
    cells = [c.strip() for c in collapse.strip("|").split("|")]
    for n, lr_one, cell in ((2, 0.089, cells[4]), (3, 0.0593, cells[5])):
        residual = logged[("mnist-5k", "mean", 0.178, n)][1] - logged[("mnist-5k", "mean", lr_one, 1)][1]
        assert cell == f"{residual:+.1f}", (n, cell, residual)

    # the predictor: one probe, one JSON line, its inputs those of the probe's log
    probe = tmp_path / "probe.h5"
    done = _run(REPO / "analysis" / "predict.py", "--dataset", "mnist-5k", "--reduce", "mean", "--lr", "0.178",
                "--probe-log", probe)
    (line,) = done.stdout.splitlines()
    result = json.loads(line)
    inputs = result["inputs"]
    log = open_log(probe)
    weights = log.noise["steps"].astype(float)
    g2 = np.sum(weights * log.noise["g2"]) / weights.sum()
    trace = np.sum(weights * log.noise["trace"]) / weights.sum()
    assert inputs["g2"] == pytest.approx(g2, rel=1e-12) and inputs["trace"] == pytest.approx(trace, rel=1e-12)
    assert inputs["b_noise"] == pytest.approx(trace / g2, rel=1e-12)
    assert inputs["probe_steps"] == log.final["attrs"]["steps"] == len(log.steps["step"])
    assert log.config["lr"] == 0.01 and log.config["dataset"] == "mnist-5k" and inputs["seed"] == log.config["seed"]
    assert inputs["curvature"] > 0 and inputs["eps_max"] == pytest.approx(1 / inputs["curvature"])
    limit = inputs["c"] * inputs["eps_max"]
    n = result["critical_n"]
    if n is None:  # no N up to 12 satisfies lr <= c eps_max N / (N + B_noise)
        assert limit * 12 / (12 + inputs["b_noise"]) < 0.178
    else:
        assert limit * n / (n + inputs["b_noise"]) >= 0.178
        assert n == 1 or limit * (n - 1) / (n - 1 + inputs["b_noise"]) < 0.178


def test_a_real_ranks_run_past_its_timeout_is_stopped_and_counted_failed(tmp_path):
    from mpi4py import MPI  # noqa: F401 - an MPI singleton in this process, as other tests leave one

    from cnnpar.experiments import map as map_launcher
    from cnnpar.experiments.launchers import make_launcher

    # a million steps: no launcher's grace period lets it finish
    point = map_launcher.MapPoint("mnist-5k", "steps", 2, "sum", "0.01", 1, how="real-ranks", steps=10 ** 6)
    path = tmp_path / point.name
    outcome = map_launcher.run_real_ranks(point, path, make_launcher(None), timeout_s=3)
    assert outcome["rc"] == 124 and "stopped after 3 s (--run-timeout)" in outcome["output"]
    assert outcome["seconds"] < 60
    assert map_launcher.state_of(path) in ("todo", "stale", "resumable")  # never "done"


def test_a_stopped_map_point_resumes_from_its_checkpoint_bit_identical(tmp_path):
    import os
    import signal
    import time

    from cnnpar.experiments import map as map_launcher

    # 60,000 samples: checkpoints every 20,000 (map_grid.CHECKPOINT_SAMPLES), so a stop leaves one
    point = map_launcher.MapPoint("mnist-5k", "steps", 1, "mean", "0.01", 1, steps=60000, part="p")
    assert point.checkpoint_every() == "20000"
    part = map_launcher.Part("p", "one long point", (point,))
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    said = []
    assert map_launcher.run_map(whole, [part], 1, say=said.append) == 0, said
    path = map_launcher.log_path(stopped, point)
    path.parent.mkdir(parents=True)
    job = subprocess.Popen([sys.executable, "-m", "cnnpar.train", *point.run_args(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=REPO, env=clean_env())
    try:
        for _ in range(2400):
            if os.path.exists(f"{path}.ckpt") or job.poll() is not None:
                break
            time.sleep(0.05)
        assert job.poll() is None, job.communicate()[0]
        job.send_signal(signal.SIGINT)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert map_launcher.state_of(path) == "resumable", output
    said = []
    assert map_launcher.run_map(stopped, [part], 1, say=said.append) == 0, said
    assert "1 to run (1 resumed from checkpoints)" in said[0]
    assert not (stopped / "incomplete").exists() and not os.path.exists(f"{path}.ckpt")
    with open_log(map_launcher.log_path(whole, point)) as want, open_log(path) as got:
        assert got.status == "complete"
        assert np.array_equal(got.final["params"], want.final["params"])
        assert np.array_equal(got.steps["loss"], want.steps["loss"])
        assert np.array_equal(got.steps["step"], want.steps["step"])


def test_a_second_map_on_a_folder_in_use_refuses_with_one_line_naming_the_holder(tmp_path):
    import os

    from cnnpar.experiments import map as map_launcher
    from cnnpar.experiments.resumable import FolderLock, sliced

    with FolderLock(tmp_path):
        done = subprocess.run([sys.executable, "-m", "cnnpar", "map", "--tiny", "--out", str(tmp_path)],
                              capture_output=True, text=True, cwd=REPO, timeout=120, env=clean_env())
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cnnpar: error: {tmp_path}: in use by pid "), lines
    assert not (tmp_path / "one-process").exists()
    # the slices of one map share a folder, one task per slice; another grid, or a plain map, may not join
    points = map_launcher.unique_points(map_launcher.parts(tiny=True))
    with sliced(tmp_path, points, 1, 4):
        with sliced(tmp_path, points, 2, 4):
            pass
        for task, others, slices in ((1, points, 4), (2, points[1:], 4), (2, points, 3), (None, points, 1)):
            try:
                with sliced(tmp_path, others, task, slices):
                    raise AssertionError(f"slice {task} of {slices} joined")
            except UserError as err:
                assert err.message.startswith(f"in use by pid {os.getpid()} on "), err.message
                assert ("slice 1 of 4" in err.message) == (task == 1), err.message
