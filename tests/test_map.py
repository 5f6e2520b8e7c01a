"""The accuracy map end to end at CI size: launch/map.py --tiny, then analysis/map_report.py, and every number
the report and table1_fit.json give is checked against the logs themselves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np

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
    assert map_launcher.state_of(path) in ("todo", "stale")  # never 'done': the next map runs it again
