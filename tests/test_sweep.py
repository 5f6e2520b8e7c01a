"""launch/sweep.py: grid, names, resume, launchers, dry run; analysis/explain.py; the smoke preset end to end."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cnnpar.errors import UserError
from mpi_util import REPO, clean_env

from cnnpar.analysis import explain
from cnnpar.experiments import grid, presets, sweep
from cnnpar.experiments import launchers
from cnnpar.experiments import runner


def _args(*argv):
    own, extra = sweep.split_argv(argv)
    return sweep.build_parser().parse_args(own), extra


def _points(*argv):
    args, extra = _args(*argv)
    groups, out, _ = sweep.build_groups(args, extra)
    return grid.expand(groups, extra)


# ----------------------------------------------------------------------------------------------------
# grid and names


def test_paper_preset_is_ranks_1_to_12_sync_and_race_three_seeds_seed_outermost():
    points = _points("--preset", "paper")
    assert len(points) == 12 * 2 * 3
    assert len({p.name for p in points}) == len(points)
    assert [p.seed for p in points] == sorted(p.seed for p in points)  # a whole seed-1 curve comes first
    assert points[0].name == "n01-sync-seed1.h5" and points[12].name == "n01-race-seed1.h5"
    flags = points[0].flags()
    assert flags["reduce"] == "sum" and flags["dataset"] == "mnist-5k"
    assert len({p.flags()["epochs"] for p in points}) == 1  # the same epochs for every rank count


def test_set_dimensions_multiply_and_are_encoded_sorted_in_the_names():
    points = _points("--ranks", "1-2,4", "--modes", "sync", "--seeds", "1", "--set", "reduce=sum,mean",
                     "--set", "lr=0.01,5e-2")
    assert len(points) == 3 * 2 * 2
    names = {p.name for p in points}
    assert "n04-sync-seed1-lr_0.01-reduce_mean.h5" in names
    assert "n01-sync-seed1-lr_0.05-reduce_sum.h5" in names  # 5e-2 spelled canonically
    p = next(p for p in points if p.name == "n04-sync-seed1-lr_0.01-reduce_mean.h5")
    args = p.train_args("/x/y.h5")
    assert args[-3:] == ["--log", "/x/y.h5", "--quiet"]
    assert args[args.index("--reduce") + 1] == "mean" and args[args.index("--lr") + 1] == "0.01"


def test_file_name_examples():
    assert grid.file_name(4, "sync", 1, [("reduce", "mean")]) == "n04-sync-seed1-reduce_mean.h5"
    assert grid.file_name(12, "race", 3) == "n12-race-seed3.h5"
    assert grid.file_name(2, "sync", 1, [("dataset", "/d/my data")]) == "n02-sync-seed1-dataset_~d~my~data.h5"


def test_booleans_and_extra_flags():
    points = _points("--ranks", "2", "--modes", "race", "--seeds", "1", "--set", "race-audit=yes", "--",
                     "--epochs", "1")
    (p,) = points
    assert p.name == "n02-race-seed1-race_audit_true.h5"
    args = p.train_args("l.h5")
    assert "--race-audit" in args and "true" not in args
    assert args[args.index("--epochs") + 1] == "1"


def test_equal_runs_are_kept_once_across_explain_groups():
    points = _points("--preset", "explain")
    names = [p.name for p in points]
    assert len(names) == len(set(names))
    # the sum/epochs reference is shared by the reduce, budget, lr-scaling, exchange and lr groups
    assert names.count("n01-sync-seed1-reduce_sum.h5") == 1
    assert "n12-sync-seed2-reduce_mean-steps_" + presets.EXPLAIN_STEPS + ".h5" in names
    race = next(p for p in points if p.mode == "race")
    assert "--race-audit" in race.train_args("x")
    only = _points("--preset", "explain", "--group", "lr")
    assert {p.flags().get("lr") for p in only} == {None, presets.EXPLAIN_SMALL_LR, presets.EXPLAIN_LARGE_LR}


def test_name_collisions_are_refused():
    g = grid.Group("g", "", [1], ["sync"], [1], [{"dataset": "a/b"}, {"dataset": "a:b"}])
    with pytest.raises(UserError, match="both be logged as"):
        grid.expand([g])


@pytest.mark.parametrize("argv, culprit", [
    (["--set", "bogus=1"], "--set bogus=1"),
    (["--set", "lr=abc"], "--set lr=abc"),
    (["--set", "mode=sync"], "--set mode=sync"),
    (["--set", "lr"], "--set lr"),
    (["--ranks", "3-1"], "--ranks"),
    (["--ranks", "0"], "--ranks"),
    (["--modes", "sync,warp"], "--modes"),
    (["--preset", "nope"], "--preset"),
    (["--preset", "explain", "--group", "nope"], "--group"),
    (["--ranks", "1", "--", "--log", "x.h5"], "--log"),
])
def test_bad_grids_are_user_errors(argv, culprit):
    with pytest.raises(UserError) as err:
        _points(*argv)
    assert err.value.culprit == culprit


def test_parse_int_list():
    assert grid.parse_int_list("1-4,8,12,2", "x") == [1, 2, 3, 4, 8, 12]


# ----------------------------------------------------------------------------------------------------
# MPI flavour


MPICH_TEXT = """HYDRA build details:
    Version:                                 4.1.2
    Release Date:                            Wed Jun  7 15:22:45 CDT 2023
    CC:                              gcc
"""
OPENMPI4_TEXT = "mpirun (Open MPI) 4.1.2\n\nReport bugs to http://www.open-mpi.org/community/help/\n"
OPENMPI5_TEXT = "mpirun (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n"
INTEL_TEXT = "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n"


@pytest.mark.parametrize("text, flavour, version", [
    (MPICH_TEXT, "mpich", "4.1.2"),
    (OPENMPI4_TEXT, "openmpi", "4.1.2"),
    (OPENMPI5_TEXT, "openmpi", "5.0.3"),
    ("mpiexec (OpenRTE) 3.1.3\n", "openmpi", "3.1.3"),
    (INTEL_TEXT, "intel", "2021.10"),
    ("slurm 23.02.6\n", "slurm", "23.02.6"),
    ("something else\n", "unknown", ""),
    ("", "unknown", ""),
])
def test_detect_flavour(text, flavour, version):
    assert launchers.detect_flavour(text) == (flavour, version)


def test_open_mpi_gets_oversubscribe_only_beyond_the_cores(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ompi = launchers.Launcher(["mpirun"], "openmpi", "4.1.2", cores=2)
    assert "--oversubscribe" in ompi.command(3, "py", ["--a"])
    assert "--oversubscribe" not in ompi.command(2, "py", ["--a"])
    mpich = launchers.Launcher(["mpiexec"], "mpich", "4.1", cores=2)
    assert mpich.command(12, "py", ["--a"]) == ["mpiexec", "-n", "12", "py", "-m", "cnnpar.train", "--a"]
    srun = launchers.Launcher(["srun", "--mpi=pmix", "--ntasks={n}"], "slurm", cores=2)
    assert srun.command(6, "py", []) == ["srun", "--mpi=pmix", "--ntasks=6", "py", "-m", "cnnpar.train"]


def _fake_program(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_make_launcher_runs_version_of_the_given_program(tmp_path):
    fake = _fake_program(tmp_path / "mpirun", f"print({OPENMPI5_TEXT!r})\n")
    launcher = launchers.make_launcher(str(fake) + " --bind-to none")
    assert (launcher.flavour, launcher.version) == ("openmpi", "5.0.3")
    assert launcher.argv == [str(fake), "--bind-to", "none"]
    assert launchers.make_launcher("srun --mpi=pmix").flavour == "slurm"
    with pytest.raises(UserError):
        launchers.make_launcher(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------
# resume, failures and dry run, with a fake mpiexec that writes logs without training

FAKE_MPIEXEC = """
import json, os, sys
sys.path.insert(0, {repo!r})
args = sys.argv[1:]
if args == ["--version"]:
    print("HYDRA build details:\\n    Version:  9.9\\n"); sys.exit(0)
n = int(args[args.index("-n") + 1])
train = args[args.index("cnnpar.train") + 1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps([n] + train) + "\\n")
import dataclasses
import numpy as np
from cnnpar.config import parse_config
from cnnpar.runlog import RunLogWriter
config = parse_config(train)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in config.log:
    w = RunLogWriter(config.log, config.to_json(), dataclasses.asdict(config), {{}}, [("w", (2,), 0, 2)], n)
    w.close("failed", "boom")
    print("line one\\nTraceback: something broke", file=sys.stderr); sys.exit(3)
if os.environ.get("FAKE_SCHEDULER_STOP") and os.environ["FAKE_SCHEDULER_STOP"] in config.log:
    print("srun: error: Unable to create step for job 7: Job/step already completing or completed",
          file=sys.stderr); sys.exit(1)
if os.environ.get("FAKE_WAIT_FOR_SIGNAL") and os.environ["FAKE_WAIT_FOR_SIGNAL"] in config.log:
    import signal, time
    def stop(signum, frame):
        open(os.environ["FAKE_CALLS"] + ".signal", "w").write(signal.Signals(signum).name); sys.exit(3)
    signal.signal(signal.SIGUSR1, stop)
    open(os.environ["FAKE_CALLS"] + ".started", "w").write("")
    time.sleep(60); sys.exit(4)
if os.environ.get("FAKE_DIVERGE") and os.environ["FAKE_DIVERGE"] in config.log:
    w = RunLogWriter(config.log, config.to_json(), dataclasses.asdict(config), {{}}, [("w", (2,), 0, 2)], n)
    w.close("diverged", "the loss became NaN or infinite at step 3")
    print("cnnpar: error: --lr: the loss became NaN", file=sys.stderr); sys.exit(2)
w = RunLogWriter(config.log, config.to_json(), dataclasses.asdict(config), {{}}, [("w", (2,), 0, 2)], n)
w.write_final(np.zeros(2), np.zeros((10, 10), np.int64), test_acc=0.5 + 0.01 * n, test_loss=1.0,
              train_time_s=0.1, samples=100, samples_per_s=1000.0, steps=10)
w.close("complete")
print("test accuracy 50.0% | ...")
"""


@pytest.fixture
def fake_mpi(tmp_path, monkeypatch):
    fake = _fake_program(tmp_path / "mpiexec", FAKE_MPIEXEC.format(repo=str(REPO)))
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def called():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return fake, called


def _run_sweep(fake, out, *argv):
    buffer = io.StringIO()
    args, extra = _args(*argv)
    groups, _, preset = sweep.build_groups(args, extra)
    points = grid.expand(groups, extra)
    rc = runner.sweep(points, out, launchers.make_launcher(str(fake)), sys.executable, dry_run=args.dry_run,
                     stream=buffer)
    return rc, buffer.getvalue()


GRID = ("--ranks", "1,2", "--modes", "sync", "--seeds", "1,2", "--", "--dataset", "mnist-5k", "--steps", "5")


def test_complete_logs_are_skipped_incomplete_ones_moved_aside_and_rerun(tmp_path, fake_mpi):
    fake, called = fake_mpi
    out = tmp_path / "out"
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0, text
    assert len(called()) == 4
    assert sorted(p.name for p in out.glob("*.h5")) == ["n01-sync-seed1.h5", "n01-sync-seed2.h5",
                                                         "n02-sync-seed1.h5", "n02-sync-seed2.h5"]
    assert "[4/4]" in text and "left ~" in text and "test acc 52.0%" in text
    assert json.loads((out / runner.TIMES_FILE).read_text()).keys() == {p.name for p in out.glob("*.h5")}

    # one log becomes incomplete (a killed run), one is garbage: both are moved aside and rerun
    from cnnpar.runlog import RunLogWriter
    os.remove(out / "n02-sync-seed1.h5")
    RunLogWriter(out / "n02-sync-seed1.h5", "{}", {}, {}, [("w", (2,), 0, 2)], 2).close("interrupted")
    (out / "n01-sync-seed2.h5").write_bytes(b"not a log")
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0, text
    assert [c[0] for c in called()[4:]] == [2, 1]  # only the two broken points ran again
    assert "2 already complete, 2 to run (2 over incomplete leftovers)" in text
    aside = sorted(p.name for p in (out / "incomplete").iterdir())
    assert len([a for a in aside if a.startswith("n02-sync-seed1.")]) == 2  # the log and a note
    assert len(list(out.glob("*.h5"))) == 4

    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0 and "nothing to run" in text and len(called()) == 6


def test_a_complete_log_with_other_settings_is_never_reused(tmp_path, fake_mpi):
    fake, called = fake_mpi
    out = tmp_path / "out"
    assert _run_sweep(fake, out, "--ranks", "1", "--seeds", "1", "--", "--steps", "5", "--lr", "0.05")[0] == 0
    with pytest.raises(UserError, match=r"other settings.*lr: 0\.05 \(log\) vs 0\.01 \(sweep\)"):
        _run_sweep(fake, out, "--ranks", "1", "--seeds", "1", "--", "--steps", "5")
    assert len(called()) == 1


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_FAIL", "n01-sync-seed2")
    out = tmp_path / "out"
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 1
    assert len(called()) == 4
    assert "n01-sync-seed2.h5: FAILED" in text and "exit status 3" in text
    assert "Traceback: something broke" in text and "failed: n01-sync-seed2.h5" in text
    assert not (out / "n01-sync-seed2.h5").exists()  # its partial log is not left among the results
    assert any(p.suffix == ".txt" for p in (out / "incomplete").iterdir())


def test_identical_failures_of_the_first_runs_stop_the_sweep_with_the_tail(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_FAIL", "-sync-")  # every run fails the same way, like a wrong srun plugin
    rc, text = _run_sweep(fake, tmp_path / "out", *GRID)
    assert rc == 1
    assert len(called()) == runner.STARTUP_FAILURE_LIMIT == 3
    assert "Traceback: something broke" in text
    assert "sweep: stopping: the first 3 runs all failed the same way (exit status 3" in text
    assert "the other 1 would too" in text


def test_different_first_failures_do_not_stop_the_sweep(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_FAIL", "seed1")
    monkeypatch.setenv("FAKE_DIVERGE", "n01-sync-seed2")
    rc, text = _run_sweep(fake, tmp_path / "out", *GRID)
    assert rc == 1 and len(called()) == 4 and "stopping" not in text


def test_a_step_the_scheduler_ended_stops_the_sweep_as_an_interruption(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_SCHEDULER_STOP", "n02-sync-seed1")
    out = tmp_path / "out"
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == runner.EXIT_STOPPED == 75, text
    assert "FAILED" not in text and "stopped by the scheduler (srun: error: Unable to create step" in text
    assert len(called()) == 2 and not (out / "incomplete").exists()
    monkeypatch.delenv("FAKE_SCHEDULER_STOP")
    rc, text = _run_sweep(fake, out, *GRID)  # the requeued job resumes
    assert rc == 0 and "1 already complete, 3 to run" in text


def _sweep_until_started(fake, out, started):
    """The sweep CLI in a child process, once its run waiting for a signal has started."""
    job = subprocess.Popen([sys.executable, str(REPO / "launch" / "sweep.py"), "--launcher", str(fake), "--out",
                            str(out), *GRID], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=clean_env())
    for _ in range(600):
        if started.exists() or job.poll() is not None:
            break
        time.sleep(0.1)
    if not started.exists():
        job.kill()
        pytest.fail(job.communicate()[0])
    return job


def test_sigusr1_reaches_the_running_training_run_and_the_sweep_exits_75(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_WAIT_FOR_SIGNAL", "n02-sync-seed1")
    started = Path(os.environ["FAKE_CALLS"] + ".started")
    job = _sweep_until_started(fake, tmp_path / "out", started)
    try:
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, output
    assert Path(os.environ["FAKE_CALLS"] + ".signal").read_text() == "SIGUSR1"
    assert "sweep: stopped by SIGUSR1" in output and "1 of 4 runs finished" in output


def test_a_diverged_run_is_a_result_kept_apart_and_not_rerun(tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_DIVERGE", "n02-sync-seed1")
    out = tmp_path / "out"
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0, text
    assert "n02-sync-seed1.h5: diverged (the loss became NaN or infinite at step 3)" in text
    assert "1 diverged" in text
    assert (out / "diverged" / "n02-sync-seed1.h5").exists() and not (out / "n02-sync-seed1.h5").exists()
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0 and "nothing to run" in text and len(called()) == 4
    runs, skipped = explain.load_runs([out / "diverged" / "n02-sync-seed1.h5"])
    assert not skipped and runs[0].diverged and runs[0].ranks == 2


def test_dry_run_prints_commands_and_marks_complete_logs(tmp_path, fake_mpi):
    fake, called = fake_mpi
    out = tmp_path / "out"
    _run_sweep(fake, out, "--ranks", "1", "--seeds", "1", "--", "--steps", "5")
    rc, text = _run_sweep(fake, out, "--ranks", "1,3", "--seeds", "1", "--dry-run", "--", "--steps", "5")
    assert rc == 0 and len(called()) == 1
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert len(lines) == 2
    assert f"{fake} -n 1 {sys.executable} -m cnnpar.train --mode sync --seed 1 --steps 5 --log " \
           f"{out / 'n01-sync-seed1.h5'} --quiet  # skip: complete log exists" in lines[0]
    assert " -n 3 " in lines[1] and "skip" not in lines[1]


def test_dry_run_cli_with_open_mpi_adds_oversubscribe(tmp_path):
    fake = _fake_program(tmp_path / "mpirun", f"print({OPENMPI4_TEXT!r})\n")
    done = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--preset", "smoke", "--ranks",
                           "1,64", "--dry-run", "--launcher", str(fake), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert "(openmpi 4.1.2)" in done.stdout
    assert all(("--oversubscribe" in line) == (" -n 64 " in line) for line in lines)
    assert not (tmp_path / "o").exists()


def test_cli_user_error_is_one_line_exit_2():
    done = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--set", "nope=1", "--dry-run"],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 2
    assert done.stderr.strip().startswith("cnnpar: error: --set nope=1: no training flag --nope")
    assert len(done.stderr.strip().splitlines()) == 1


def test_estimator_learns_per_rank_count():
    est = runner.Estimator()
    mk = lambda n, seed=1, **kw: grid.Point(n, "sync", seed, base=tuple(sorted(dict(epochs="1", **kw).items())))
    assert est.predict(mk(1)) is None
    est.add(mk(1), 10.0)
    est.add(mk(4), 40.0)
    assert est.predict(mk(1, seed=2)) == pytest.approx(10.0)
    assert est.predict(mk(2)) == pytest.approx(20.0)
    assert est.predict(mk(8)) == pytest.approx(80.0)  # extrapolated from the last two rank counts
    assert est.predict(mk(4, steps="8000")) == pytest.approx(40.0 * 8000 * 4 / 4000)  # more samples, longer


# ----------------------------------------------------------------------------------------------------
# analysis/explain.py on synthetic logs


def _write_log(path, ranks, acc, **config):
    from cnnpar.config import Config
    from cnnpar.runlog import RunLogWriter

    c = dataclasses.replace(Config(dataset="mnist-5k", epochs=1), **config)
    w = RunLogWriter(path, c.to_json(), dataclasses.asdict(c), {}, [("w", (2,), 0, 2)], ranks)
    w.write_final(np.zeros(2), np.zeros((10, 10), np.int64), test_acc=acc, test_loss=1.0, train_time_s=1.0,
                  samples=4000, samples_per_s=4000.0, steps=4000 // ranks)
    w.close("complete")


def test_explain_reports_rises_and_missing_groups(tmp_path):
    rng = np.random.default_rng(0)
    for seed in (1, 2):
        for n in (1, 2, 4, 8, 12):
            noise = rng.normal(0, 0.003)
            _write_log(tmp_path / f"s{seed}n{n}sum.h5", n, 0.6 + 0.03 * np.log2(n) + noise, seed=seed,
                       reduce="sum")
            _write_log(tmp_path / f"s{seed}n{n}mean.h5", n, 0.9 - 0.04 * np.log2(n) + noise, seed=seed,
                       reduce="mean")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    from cnnpar.config import Config
    from cnnpar.runlog import RunLogWriter
    c = dataclasses.replace(Config(dataset="mnist-5k", epochs=1), seed=3, reduce="sum")
    RunLogWriter(tmp_path / "div.h5", c.to_json(), dataclasses.asdict(c), {}, [("w", (2,), 0, 2)], 12).close(
        "diverged", "NaN")
    report = tmp_path / "report"
    assert explain.main([str(p) for p in sorted(tmp_path.glob("*.h5"))] + ["--out", str(report)]) == 0
    text = (report / "explain.md").read_text()
    assert (report / "explain-reduce.png").stat().st_size > 1000
    assert "| sum |" in text and "| mean |" in text
    assert "rises" in text and "falls" in text
    assert "The rise needs the sum" in text
    assert "**Missing**" in text and "--group budget" in text  # budget, lr-scaling, exchange, lr not run
    assert "Skipped 1 file(s)" in text
    assert "reproduces a rising curve" in text
    assert "diverged (NaN loss)" in text and "n=12 seed 3" in text


# ----------------------------------------------------------------------------------------------------
# the smoke preset end to end: real training runs, then the analysis scripts on their logs


def _trainer_missing() -> str:
    for module in ("cnnpar.train", "cnnpar.runlog", "cnnpar.data", "cnnpar.model"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    for script in ("analysis/table.py", "analysis/plots.py"):
        if not (REPO / script).exists():
            return f"{script} does not exist yet"
    return ""


@pytest.mark.skipif(bool(_trainer_missing()), reason=_trainer_missing() or "ready")
def test_smoke_preset_end_to_end_then_table_and_plots(tmp_path):
    from cnnpar.runlog import open_log

    out = tmp_path / "smoke"
    done = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--preset", "smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=180, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    logs = sorted(out.glob("*.h5"))
    modes = ["sync", "race"]
    assert [p.name for p in logs] == sorted(f"n0{n}-{m}-seed1.h5" for n in (1, 2) for m in modes)
    truth = {}
    for path in logs:
        with open_log(path) as log:
            assert log.complete and log.ranks == int(path.name[1:3])
            truth[(log.ranks, log.config["mode"])] = log.final["attrs"]["test_acc"]

    # a second run finds everything done
    again = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--preset", "smoke", "--out",
                            str(out)], capture_output=True, text=True, timeout=60, env=clean_env())
    assert again.returncode == 0 and "nothing to run" in again.stdout

    csv_path, md_path = tmp_path / "table.csv", tmp_path / "table.md"
    table = subprocess.run([sys.executable, str(REPO / "analysis" / "table.py"), *map(str, logs), "--paper",
                            "--csv", str(csv_path), "--md", str(md_path)], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    assert table.returncode == 0, table.stderr
    assert md_path.stat().st_size > 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(truth), rows  # one row per (mode, ranks): one seed each
    for row in rows:
        acc = truth[(int(row["ranks"]), row["mode"])]
        assert int(row["seeds"]) == 1
        assert abs(float(row["acc_mean_pct"]) - 100 * acc) < 1e-6, (row, acc)
    md = md_path.read_text()
    for (n, mode), acc in truth.items():
        assert f"| {mode} | {n} | 1 | {100 * acc:.1f} |" in md, md

    figures = tmp_path / "figures"
    plots = subprocess.run([sys.executable, str(REPO / "analysis" / "plots.py"), *map(str, logs), "--out",
                            str(figures)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plots.returncode == 0, plots.stderr
    pngs = list(figures.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)

    report = tmp_path / "report"
    assert explain.main([str(p) for p in logs] + ["--out", str(report)]) == 0
    assert "**Missing**" in (report / "explain.md").read_text()


def test_presets_are_plain_data_and_every_run_of_them_is_a_valid_training_command():
    assert json.loads(json.dumps(presets.PRESETS)) == presets.PRESETS
    for preset in grid.load_presets().values():
        for point in grid.expand(preset.groups):
            runner.expected_config(point)


def test_a_preset_group_with_an_unknown_key_is_refused():
    data = {"x": {"doc": "", "out": "runs/x", "groups": [{"name": "g", "ranks": [1], "modes": ["sync"],
                                                          "seeds": [1], "rank": [2]}]}}
    with pytest.raises(UserError, match="unknown keys rank"):
        grid.load_presets(data)


def test_soak_example_from_its_own_help_passes_and_names_no_deleted_log():
    soak_py = REPO / "launch" / "soak.py"
    help_text = subprocess.run([sys.executable, str(soak_py), "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    example = next(line.split("#")[0].split() for line in help_text.splitlines() if "-- --mode race" in line)
    assert example[:2] == ["python", "launch/soak.py"]
    done = subprocess.run([sys.executable, str(soak_py), *example[2:]], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ranks"] == result["ranks_sampled"] == 4 and result["samples"] >= 2
    assert result["live_log_read_errors"] == 0 and result["log"] is None
    assert "log not kept (--log PATH keeps it)" in done.stdout
    assert "cnnpar-soak-" not in done.stdout and "soak.h5" not in done.stdout


def test_an_existing_log_stands_for_a_point_unless_it_computed_logged_or_timed_something_else():
    """config.py's field metadata decides: what is printed, where data and checkpoints live, how often the
    test set is scored may differ; the numbers, the log's tables and what the timings stand for may not."""
    point = grid.Point(2, "sync", 1, base=(("epochs", "1"),))
    logged = runner.expected_config(point)
    assert runner.config_differences(dict(logged), 2, point) == []
    for name, value in (("progress", "none"), ("data_dir", "/elsewhere"), ("checkpoint_on_signal", True),
                        ("eval_every", 5), ("log", "x.h5"), ("checkpoint_every", "1e")):
        assert runner.config_differences({**logged, name: value}, 2, point) == [], name
    for name, value in (("lr", 0.5), ("seed", 7), ("race_audit", True), ("noise_scale", True), ("wait", "yield"),
                        ("pretend_nodes", 2)):
        (difference,) = runner.config_differences({**logged, name: value}, 2, point)
        assert difference.startswith(f"{name}: "), difference


def test_runs_are_of_one_setting_unless_they_differ_in_what_they_compute_or_how_fast():
    from types import SimpleNamespace

    from cnnpar.analysis import common

    base = dict(runner.expected_config(grid.Point(2, "sync", 1, base=(("epochs", "1"),))))
    logs = [SimpleNamespace(config={**base, "seed": 1, "progress": "bar", "race_audit": False}),
            SimpleNamespace(config={**base, "seed": 2, "progress": "none", "race_audit": True})]
    assert common.setting_fields(logs) == []
    logs[1].config.update(wait="yield", lr=0.5)
    assert common.setting_fields(logs) == ["lr", "wait"]
    # the accuracy report also pools the exchange's implementation; a field an older log lacks is its default
    assert explain.setting_of({**base, "allreduce": "mpi"}) == explain.setting_of({"epochs": 1})


# ----------------------------------------------------------------------------------------------------
# one runner per folder, and resuming a stopped run from its checkpoint


def test_a_second_sweep_on_a_folder_in_use_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(
        tmp_path, fake_mpi, monkeypatch):
    fake, called = fake_mpi
    monkeypatch.setenv("FAKE_WAIT_FOR_SIGNAL", "n01-sync-seed1")
    started = Path(os.environ["FAKE_CALLS"] + ".started")
    out = tmp_path / "out"
    job = _sweep_until_started(fake, out, started)
    try:
        monkeypatch.delenv("FAKE_WAIT_FOR_SIGNAL")
        with pytest.raises(UserError) as refused:
            _run_sweep(fake, out, *GRID)
        assert refused.value.culprit == str(out)
        assert refused.value.message.startswith(f"in use by pid {job.pid} on ") and "sweep.py --launcher" in \
            refused.value.message, refused.value.message
        assert len(called()) == 1   # the second sweep ran nothing
        job.kill()  # the holder dies (SIGKILL): its lock file is left behind
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert (out / ".cnnpar-lock").exists()
    rc, text = _run_sweep(fake, out, *GRID)
    assert rc == 0, text
    assert f"sweep: note: took over the lock of pid {job.pid} on " in text and "which has ended" in text


def _launcher_for_tests():
    from mpi_util import mpiexec

    return launchers.make_launcher(mpiexec())


def test_an_interrupted_sweep_point_resumes_from_its_checkpoint_bit_identical(tmp_path):
    from cnnpar.runlog import open_log

    # lenet: ~7 s of training, so the stop (taken at a window flush, forwarded by mpiexec or Open MPI's
    # mpirun) lands mid-run; the small network runs these steps in about one second.
    grid_args = ("--ranks", "1", "--seeds", "1", "--", "--dataset", "mnist-5k", "--arch", "lenet",
                 "--steps", "30000", "--checkpoint-every", "2000")
    args, extra = _args(*grid_args)
    groups, _, _ = sweep.build_groups(args, extra)
    (point,) = grid.expand(groups, extra)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert runner.sweep([point], whole, _launcher_for_tests(), sys.executable, stream=io.StringIO()) == 0
    job = subprocess.Popen([sys.executable, str(REPO / "launch" / "sweep.py"), "--launcher",
                            _launcher_for_tests().argv[0], "--out", str(stopped), *grid_args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    ckpt = stopped / (point.name + ".ckpt")
    try:
        for _ in range(1200):
            if ckpt.exists() or job.poll() is not None:
                break
            time.sleep(0.05)
        assert ckpt.exists() and job.poll() is None, job.communicate()[0]
        job.send_signal(signal.SIGINT)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, output
    assert open_log(stopped / point.name).status != "complete"
    buffer = io.StringIO()
    assert runner.sweep([point], stopped, _launcher_for_tests(), sys.executable, stream=buffer) == 0, \
        buffer.getvalue()
    assert "(1 resumed from their checkpoints)" in buffer.getvalue()
    assert not (stopped / "incomplete").exists() and not ckpt.exists()
    with open_log(whole / point.name) as want, open_log(stopped / point.name) as got:
        assert got.status == "complete"
        assert np.array_equal(got.final["params"], want.final["params"])
        assert np.array_equal(got.steps["loss"], want.steps["loss"])
        assert np.array_equal(got.steps["step"], want.steps["step"])


def test_array_slices_are_disjoint_cover_the_grid_and_a_timed_preset_is_refused(tmp_path, fake_mpi):
    fake, called = fake_mpi
    out = tmp_path / "out"
    args, extra = _args(*GRID)
    points = grid.expand(sweep.build_groups(args, extra)[0], extra)
    texts = []
    for task in (1, 0):
        buffer = io.StringIO()
        assert runner.sweep(points, out, launchers.make_launcher(str(fake)), sys.executable, stream=buffer,
                            task=task, slices=2) == 0, buffer.getvalue()
        texts.append(buffer.getvalue())
    assert "sweep: array task 1 of 2: 2 of the 4 runs" in texts[0]
    ran = [call[call.index("--log") + 1] for call in called()]
    assert len(ran) == len(set(ran)) == 4 and sorted(p.name for p in out.glob("*.h5")) == sorted(
        p.name for p in points)
    with pytest.raises(UserError, match="the paper preset's timings are results"):
        sweep.array_slice(_args("--preset", "paper", "--slices", "2", "--task", "0")[0], "paper")
