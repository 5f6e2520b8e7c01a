"""analysis/table.py and analysis/plots.py on synthetic run logs with known accuracies and times."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnpar.runlog import RunLogWriter

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 2, 4, 8)
SEEDS = (1, 2, 3)
SAMPLES = 480  # training samples per run (divisible by every rank count)
N_PARAMS = 6   # the synthetic logs' one 3 x 2 parameter

PAPER_TIME = {1: 69.358, 2: 41.577, 4: 31.809, 8: 27.390}


def known_acc(mode, ranks, seed, lr=0.01):
    return 0.30 + 0.12 * math.log2(ranks) + 0.01 * seed - (0.03 if mode == "race" else 0.0) + (lr - 0.01)


def known_time(mode, ranks, seed, lr=0.01):
    return 60.0 / ranks ** 0.7 + 0.5 * seed + (2.0 if mode == "race" else 0.0) + 10 * (lr - 0.01)


def known_lost(ranks, seed):
    return 0.05 * (ranks - 1) + 0.01 * seed  # lost contributions per step


def write_log(path, mode, ranks, seed, lr=0.01, status="complete"):
    config = {"mode": mode, "lr": lr, "seed": seed, "reduce": "sum", "epochs": 2, "steps": 0, "log": str(path),
              "race_audit": mode == "race", "folds": 1, "quiet": True, "checkpoint_every": ""}
    env = {"hostnames": ["host"] * ranks, "ranks": ranks, "cores": 12, "physical_cores": 6,
           "oversubscribed": ranks > 12}
    rng = np.random.default_rng(seed * 100 + ranks)
    steps = SAMPLES // ranks
    acc, seconds = known_acc(mode, ranks, seed, lr), known_time(mode, ranks, seed, lr)
    with RunLogWriter(path, json.dumps(config, sort_keys=True), config, env, [("w", (3, 2), 0, 6)], ranks) as log:
        seen = np.arange(1, steps + 1) * ranks
        loss = (2.3 * np.exp(-seen / (150 + 20 * ranks)) + 0.2 + 0.1 * rng.random(steps)).astype(np.float32)
        per_rank = lambda scale: (scale * (1 + 0.2 * rng.random((steps, ranks)))).astype(np.float32)  # noqa: E731
        log.append_steps(np.arange(steps), (np.arange(steps) * 2 // steps).astype(np.int32), loss,
                         np.repeat(loss[:, None], ranks, axis=1), np.full(steps, ranks, np.int32),
                         per_rank(0.004), per_rank(0.0005 * math.log2(2 * ranks)), per_rank(0.0002 * (ranks - 1)))
        if mode == "race":
            lost = np.full(steps, known_lost(ranks, seed))
            log.append_audit(np.arange(steps), lost / 10, lost / 5, lost)
        for epoch in range(2):
            log.append_epoch(epoch, (epoch + 1) * steps // 2, 1.0, acc - 0.05 * (1 - epoch), 1.0,
                             acc - 0.04 * (1 - epoch), seconds * (epoch + 1) / 2, SAMPLES * (epoch + 1) // 2)
        log.write_final(np.zeros(6), np.eye(10, dtype=np.int64), test_acc=acc, test_loss=0.5, train_time_s=seconds,
                        samples=SAMPLES, samples_per_s=SAMPLES / seconds, steps=steps)
        log.close(status)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logs")
    for mode in ("sync", "race"):
        for ranks in RANKS:
            for seed in SEEDS:
                write_log(folder / f"n{ranks:02d}-{mode}-seed{seed}.h5", mode, ranks, seed)
    for ranks in (1, 2):  # a second learning rate for sync: one more grouping column
        write_log(folder / f"n{ranks:02d}-sync-lr05.h5", "sync", ranks, 1, lr=0.05)
    write_log(folder / "n04-sync-failed.h5", "sync", 4, 9, status="failed")  # must be skipped
    return folder


def run_script(name, *args):
    return subprocess.run([sys.executable, str(REPO / "analysis" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def _expected():
    rows = {}
    for mode in ("sync", "race"):
        for lr, seeds, ranks_list in ((0.01, SEEDS, RANKS), (0.05, (1,), (1, 2))):
            if mode == "race" and lr == 0.05:
                continue
            base = np.mean([known_time(mode, 1, s, lr) for s in seeds])
            for ranks in ranks_list:
                accs = [known_acc(mode, ranks, s, lr) for s in seeds]
                times = [known_time(mode, ranks, s, lr) for s in seeds]
                row = {"acc_mean_pct": 100 * np.mean(accs),
                       "acc_sd_pct": 100 * np.std(accs, ddof=1) if len(accs) > 1 else math.nan,
                       "time_mean_s": np.mean(times), "speedup": base / np.mean(times),
                       "efficiency": base / np.mean(times) / ranks, "seeds": len(seeds),
                       "lost_updates_pct": (100 * np.mean([known_lost(ranks, s) for s in seeds])
                                            / (ranks * N_PARAMS) if mode == "race" else math.nan)}
                rows[(mode, lr, ranks)] = row
    return rows


def _number(text):
    return float(text) if text != "" else math.nan


def test_table_rows_equal_the_values_computed_from_the_logs(logs, tmp_path):
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    done = run_script("table.py", logs, "--paper", "--csv", csv_path, "--md", md_path)
    assert done.returncode == 0, done.stderr
    # the failed run is skipped, with one note naming it
    assert [line for line in done.stderr.splitlines() if line] == \
        [f"table.py: note: skipping {logs / 'n04-sync-failed.h5'} (not complete: failed)"]
    rows = list(csv.DictReader(csv_path.open()))
    expected = _expected()
    assert len(rows) == len(expected)
    assert list(rows[0])[:4] == ["mode", "lr", "ranks", "seeds"]  # lr differs between logs: it is a column
    for row in rows:
        key = (row["mode"], float(row["lr"]), int(row["ranks"]))
        want = expected[key]
        assert int(row["seeds"]) == want["seeds"], key
        for name in ("acc_mean_pct", "acc_sd_pct", "time_mean_s", "speedup", "efficiency", "lost_updates_pct"):
            got = _number(row[name])
            if math.isnan(want[name]):
                assert math.isnan(got), (key, name, row[name])
            else:
                assert got == pytest.approx(want[name], rel=1e-9), (key, name)
        assert float(row["paper_time_s"]) == PAPER_TIME[key[2]]
        assert float(row["paper_speedup"]) == pytest.approx(69.358 / PAPER_TIME[key[2]])
    # Markdown: on stdout and in the file, one line per group, with the same rounded numbers
    assert md_path.read_text() == done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("| race | 0.01 | 8 |")]
    assert len(lines) == 1
    want = expected[("race", 0.01, 8)]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    mean, sd = cells[4].split(" ± ")
    assert float(mean) == pytest.approx(want["acc_mean_pct"], abs=0.051)
    assert float(sd) == pytest.approx(want["acc_sd_pct"], abs=0.051)
    for index, name in ((5, "time_mean_s"), (6, "speedup"), (7, "efficiency"), (8, "lost_updates_pct")):
        assert float(cells[index]) == pytest.approx(want[name], abs=0.0051), name
    assert float(cells[-1]) == pytest.approx(69.358 / 27.390, abs=0.0051)


def test_table_without_a_one_rank_run_borrows_another_modes_baseline(logs, tmp_path):
    files = [logs / f"n01-sync-seed{s}.h5" for s in SEEDS] + [logs / f"n04-race-seed{s}.h5" for s in SEEDS]
    done = run_script("table.py", *files, "--csv", tmp_path / "b.csv")
    assert done.returncode == 0, done.stderr
    race = [row for row in csv.DictReader((tmp_path / "b.csv").open()) if row["mode"] == "race"][0]
    base = np.mean([known_time("sync", 1, s) for s in SEEDS])
    assert float(race["speedup"]) == pytest.approx(base / np.mean([known_time("race", 4, s) for s in SEEDS]))
    assert "vs 1-rank sync" in done.stdout and "lr" not in done.stdout.splitlines()[0]


@pytest.mark.parametrize("script", ["table.py", "plots.py"])
def test_a_foreign_file_is_skipped_with_a_note_and_alone_is_one_line_exit_2(logs, tmp_path, script):
    bad = tmp_path / "notes.h5"
    bad.write_text("not a log")
    extra = ["--out", tmp_path / "figs"] if script == "plots.py" else []
    done = run_script(script, logs / "n01-sync-seed1.h5", bad, *extra)
    assert done.returncode == 0, done.stderr
    assert f"{script}: note: skipping {bad} (not a readable run log: not an HDF5 file" in done.stderr
    alone = run_script(script, bad, *extra)
    assert alone.returncode == 2 and alone.stderr.splitlines()[-1] == \
        f"cnnpar: error: {bad}: no complete run logs there"
    missing = run_script(script, tmp_path / "nope.h5", *extra)
    assert missing.returncode == 2 and missing.stderr.splitlines() == \
        [f"cnnpar: error: {tmp_path / 'nope.h5'}: no such file or directory"]
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_script(script, empty, *extra)
    assert none.returncode == 2 and len(none.stderr.splitlines()) == 1 and "no *.h5 run logs" in none.stderr


def test_plots_writes_every_figure_as_png_and_pdf(logs, tmp_path):
    out = tmp_path / "figures"
    done = run_script("plots.py", logs, "--out", out)
    assert done.returncode == 0, done.stderr
    names = ("speedup", "accuracy", "loss", "time_split", "lost_updates")
    for name in names:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1_000, name
    assert sorted(done.stdout.split()) == sorted(str(out / f"{n}.{e}") for n in names for e in ("png", "pdf"))
    # README size: 6.4 x 4.2 in at 150 dpi (bbox "tight" trims a little)
    width, height = _png_size(out / "accuracy.png")
    assert 700 < width <= 1000 and 450 < height <= 660


def test_plots_without_audit_data_skip_lost_updates_with_a_note(logs, tmp_path):
    out = tmp_path / "sync-only"
    done = run_script("plots.py", *sorted(logs.glob("n0*-sync-seed*.h5")), "--out", out)
    assert done.returncode == 0, done.stderr
    assert not (out / "lost_updates.png").exists() and (out / "speedup.pdf").exists()
    assert "lost_updates not drawn" in done.stderr


def _png_size(path):
    header = Path(path).read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_scripts_have_help():
    for script in ("table.py", "plots.py"):
        done = run_script(script, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout
    assert os.access(REPO / "analysis" / "table.py", os.R_OK)
