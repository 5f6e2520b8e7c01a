"""Clusters: the launcher check (any MPI), and the Slurm job scripts under a real Slurm.

The Slurm tests submit the commands of launch/slurm/README.md's "Check it works" block to the Slurm that
answers here (CI brings one up on localhost with .ci/slurm-up) and skip, with one reason line, where none
does. Each job writes only under the test's temporary folder: the README line gets `--output` for sbatch and
an `--out`/`--log` for the run, nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnpar import launcher
from cnnpar.errors import UserError
from cnnpar.runlog import open_log
from mpi_util import REPO, clean_env, mpiexec, run_train

MPICH = "MPICH Version:      4.1.2\nMPICH Release date: Wed Jun  7 15:22:45 CDT 2023\n"
OPENMPI = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022\0"


# ----------------------------------------------------------------------------------------------------
# the launcher's task count against MPI's world size (no MPI needed)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_STEP_NUM_TASKS": "12", "SLURM_PROCID": "3"}, (12, "srun")),
    ({"SLURM_NTASKS": "12"}, None),  # a batch script or salloc shell: the allocation, not a launch
    ({"PMI_SIZE": "4", "PMI_RANK": "0"}, (4, "a PMI launcher (MPICH's mpiexec, srun --mpi=pmi2)")),
    # mpirun inside an allocation starts one daemon per node with srun: its own count comes first
    ({"OMPI_COMM_WORLD_SIZE": "6", "SLURM_STEP_NUM_TASKS": "1"}, (6, "Open MPI's mpirun")),
    ({"PMI_SIZE": "6", "SLURM_STEP_NUM_TASKS": "2"}, (6, "a PMI launcher (MPICH's mpiexec, srun --mpi=pmi2)")),
])
def test_launcher_task_count_from_any_launchers_variables(environ, expected):
    assert launcher.launcher_tasks(environ) == expected


def test_launcher_rank_from_any_launchers_variables():
    assert launcher.launcher_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert launcher.launcher_rank({"PMIX_RANK": "5"}) == 5
    assert launcher.launcher_rank({"SLURM_PROCID": "7"}) == 7
    assert launcher.launcher_rank({}) is None


@pytest.mark.parametrize("text, family, plugin", [
    (MPICH, "mpich", "pmi2"), (OPENMPI, "openmpi", "pmix"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS\n", "intel", "pmi2"),
    ("MVAPICH2 Version      :\t2.3.7\n", "mvapich", "pmi2"),
    ("Some MPI 1.0\n", "unknown", None),
])
def test_library_family_and_srun_plugin(text, family, plugin):
    assert launcher.library_family(text) == family
    assert launcher.srun_plugin(text) == plugin


def test_library_summary_drops_nuls_and_padding():
    assert launcher.library_summary(OPENMPI) == OPENMPI.split(",")[0] + OPENMPI[OPENMPI.index(","):-1]
    assert launcher.library_summary(MPICH) == "MPICH Version: 4.1.2"
    assert "\0" not in launcher.library_summary("x\0\0")


def test_n_accidental_one_rank_jobs_are_refused_rank_0_says_so_the_others_exit_quietly():
    env = {"SLURM_STEP_NUM_TASKS": "12", "SLURM_PROCID": "0"}
    with pytest.raises(UserError) as err:
        launcher.check_world_size(1, MPICH, env)
    assert err.value.culprit == "launcher"
    assert "srun started 12 tasks, but each sees an MPI world of 1 rank" in err.value.message
    assert "`srun --mpi=pmi2`" in err.value.message
    with pytest.raises(SystemExit) as quiet:
        launcher.check_world_size(1, MPICH, dict(env, SLURM_PROCID="5"))
    assert quiet.value.code == 2
    launcher.check_world_size(12, MPICH, env)   # agreeing counts pass
    launcher.check_world_size(1, MPICH, {})     # a plain `python -m cnnpar.train` is one rank
    with pytest.raises(UserError, match="Open MPI's mpirun started 4 tasks, but MPI sees 2 ranks"):
        launcher.check_world_size(2, OPENMPI, {"OMPI_COMM_WORLD_SIZE": "4"})


# ----------------------------------------------------------------------------------------------------
# a real Slurm


def _slurm_missing() -> str:
    if not shutil.which("sbatch"):
        return "no sbatch here (CI brings up Slurm with .ci/slurm-up)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        idle = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Slurm does not answer: {err}"
    if "is UP" not in ping.stdout:
        return "no Slurm controller answers `scontrol ping` (CI brings one up with .ci/slurm-up)"
    if not re.search(r"^(idle|mix|alloc)", idle.stdout, re.M):
        return f"no Slurm node is up: {idle.stdout.strip() or idle.stderr.strip()}"
    return ""


SLURM_MISSING = _slurm_missing()
needs_slurm = pytest.mark.skipif(bool(SLURM_MISSING), reason=SLURM_MISSING or "ready")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE")


def _readme_jobs() -> dict:
    """{script name: its sbatch line} from launch/slurm/README.md's "Check it works" block."""
    text = (REPO / "launch" / "slurm" / "README.md").read_text()
    block = re.search(r"## Check it works.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    return {re.search(r"launch/slurm/(\w+)\.sbatch", line).group(1): line for line in lines}


def _environment() -> dict:
    # The job runs this test's Python environment (the MPICH wheel's venv, or the Open MPI one).
    return clean_env(CNNPAR_VENV=sys.prefix, PYTHONUNBUFFERED="1")


def _submit(line: str, output, *run_args, env=None) -> str:
    """Submit a README sbatch line with its output in `output` and `run_args` appended; the job id."""
    words = shlex.split(line)
    assert words[0] == "sbatch", line
    command = ["sbatch", "--parsable", f"--output={output}"] + words[1:] + [str(a) for a in run_args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env or _environment(),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict:
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def _wait(job_id: str, timeout_s: float = 400, until=FINAL_STATES) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(job_id)
        if info.get("JobState") in until:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} did not reach {until} in {timeout_s:.0f} s: {_job(job_id).get('JobState')}")


def _lines(path) -> list:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _wait_for_epochs(log_path, epochs: int, job_id: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(log_path):
            try:
                with open_log(log_path) as log:
                    if len(log.epochs["epoch"]) >= epochs:
                        return
            except Exception:  # noqa: BLE001 - a log being written may not be readable at every instant
                pass
        assert _job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _job(job_id)
        time.sleep(0.2)
    pytest.fail(f"{log_path} did not reach {epochs} epochs in {timeout_s:.0f} s")


def _result(path) -> dict:
    with open_log(path) as log:
        return {"status": log.status, "params": np.array(log.final["params"]) if log.final else None,
                "loss": np.array(log.steps["loss"]), "step": np.array(log.steps["step"])}


def _launcher_says(what: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cnnpar.launcher", what], capture_output=True, text=True,
                          timeout=60, env=clean_env())
    return done.stdout.strip()


def _plugin() -> str:
    return _launcher_says("plugin")


def _family() -> str:
    return _launcher_says("family")


@needs_slurm
def test_readme_sweep_and_multinode_jobs_complete_and_say_their_launcher_first(tmp_path):
    jobs = _readme_jobs()
    sweep_id = _submit(jobs["sweep"], tmp_path / "sweep.out", "--out", tmp_path / "smoke")
    multi_id = _submit(jobs["multinode"], tmp_path / "multinode.out", "--log", tmp_path / "multinode.h5")
    for job_id, name in ((sweep_id, "sweep"), (multi_id, "multinode")):
        info = _wait(job_id)
        out = tmp_path / f"{name}.out"
        assert info["JobState"] == "COMPLETED", out.read_text()
        first = _lines(out)[0]
        assert first.startswith(f"cnnpar: launcher: srun --mpi={_plugin()} "), first
        print(f"{name}.sbatch: job {job_id} {info['JobState']} in {info['RunTime']}: {first}")
    logs = sorted((tmp_path / "smoke").glob("*.h5"))
    assert [p.name for p in logs] == sorted(f"n0{n}-{m}-seed1.h5" for n in (1, 2) for m in ("sync", "race"))
    for path in logs + [tmp_path / "multinode.h5"]:
        assert _result(path)["status"] == "complete", path


RESUME_EPOCHS = "12"  # long enough that the job is still running when it is cancelled or requeued


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The multinode job's run at 2 ranks without interruption, started by the MPI's own launcher."""
    path = tmp_path_factory.mktemp("whole") / "whole.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--reduce", "sum", "--epochs", RESUME_EPOCHS, "--seed", "1",
                     "--checkpoint-every", "1e", "--log", path, "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    return _result(path)


@needs_slurm
def test_requeued_job_resumes_and_ends_bit_identical(tmp_path, uninterrupted):
    log_path, out = tmp_path / "requeued.h5", tmp_path / "requeued.out"
    job_id = _submit(_readme_jobs()["multinode"], out, "--epochs", RESUME_EPOCHS, "--log", log_path)
    _wait_for_epochs(log_path, 1, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    # A requeued job waits before it may start again; this one may start soon (not within the second of the
    # requeue: see the time-limit test)
    for _ in range(60):
        if _job(job_id).get("JobState") == "PENDING":
            break
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], timeout=30)
    info = _wait(job_id)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    starts = [line for line in text.splitlines() if line.startswith("cnnpar: launcher: ")]
    assert len(starts) == 2 and "restart 1" in starts[1], text   # appended, not truncated
    assert "resuming" in text
    print(f"requeued job {job_id}: {starts[1]}")
    resumed = _result(log_path)
    assert resumed["status"] == "complete"
    assert np.array_equal(resumed["step"], uninterrupted["step"])
    assert np.array_equal(resumed["loss"], uninterrupted["loss"])
    assert np.array_equal(resumed["params"], uninterrupted["params"])


@needs_slurm
def test_cancelled_then_resubmitted_job_resumes_and_ends_bit_identical(tmp_path, uninterrupted):
    log_path, out = tmp_path / "resubmitted.h5", tmp_path / "resubmitted.out"
    line = _readme_jobs()["multinode"]
    first = _submit(line, out, "--epochs", RESUME_EPOCHS, "--log", log_path)
    _wait_for_epochs(log_path, 1, first)
    subprocess.run(["scancel", first], check=True, timeout=30)
    assert _wait(first)["JobState"] == "CANCELLED"
    assert _result(log_path)["status"] != "complete"
    second = _submit(line, out, "--epochs", RESUME_EPOCHS, "--log", log_path)
    info = _wait(second)
    assert info["JobState"] == "COMPLETED", out.read_text()
    resumed = _result(log_path)
    assert resumed["status"] == "complete"
    assert np.array_equal(resumed["loss"], uninterrupted["loss"])
    assert np.array_equal(resumed["params"], uninterrupted["params"])


@needs_slurm
def test_a_plugin_that_cannot_start_this_mpi_fails_the_job_with_one_line(tmp_path):
    wrong = {"pmi2": "pmix", "pmix": "pmi2"}.get(_plugin(), "pmix")
    out = tmp_path / "wrong.out"
    job_id = _submit(_readme_jobs()["multinode"], out, "--log", tmp_path / "never.h5",
                     env=dict(_environment(), CNNPAR_SRUN_MPI=wrong))
    info = _wait(job_id)
    lines = _lines(out)
    assert info["JobState"] == "FAILED", out.read_text()
    assert len(lines) == 1 and lines[0].startswith("cnnpar: error: launcher: no launcher could start 2 ranks"), lines
    assert f"srun --mpi={wrong}: " in lines[0] and not (tmp_path / "never.h5").exists()
    print(f"forced --mpi={wrong}: job {job_id} failed in {info['RunTime']}: {lines[0][:160]}")


@needs_slurm
def test_srun_without_the_matching_plugin_is_refused_not_run_as_separate_jobs(tmp_path):
    log_path = tmp_path / "x.h5"
    done = subprocess.run(["srun", "--mpi=none", "-n", "2", sys.executable, "-m", "cnnpar.train", "--dataset",
                           "mnist-5k", "--steps", "20", "--log", str(log_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_environment())
    output = done.stdout + done.stderr
    assert not log_path.exists(), output
    if _family() == "openmpi":
        # Open MPI does not fall back to one-rank worlds: its MPI_Init refuses a launch it cannot reach.
        assert done.returncode != 0 and 'direct launched using "srun"' in output, output
        return
    assert done.returncode == 2, output
    ours = [line for line in output.splitlines() if line.startswith("cnnpar")]
    assert len(ours) == 1, ours
    assert ours[0].startswith("cnnpar: error: launcher: srun started 2 tasks, but each sees an MPI world of 1 rank")


# Slurm's time limits count in minutes, and slurmctld checks them every 30 s, sending a --signal warning
# at the first check that finds the job within the warning time plus 30 s of its end: `--time=2` with
# `--signal=B:USR1@60` warns 30-60 s after the start (after the start-up, before the limit). The run
# trains for longer than that (lenet, 120 epochs: about 95 s alone on an idle 2-core machine; the small net's
# 80 epochs took 14 s there and finished before the warning), so its first start cannot finish.
TIME_LIMIT = ("--time=2", "--signal=B:USR1@60")
TIME_LIMIT_EPOCHS = "120"
TIME_LIMIT_ARCH = "lenet"


@needs_slurm
def test_a_time_limit_warning_checkpoints_requeues_and_resumes_bit_identical(tmp_path):
    """A real time limit: the job's own --signal warning stops the run with a checkpoint, the job script
    requeues the job, and the second start resumes and ends bit-identical to an uninterrupted run."""
    log_path, out = tmp_path / "limited.h5", tmp_path / "limited.out"
    line = _readme_jobs()["multinode"].replace(" launch/slurm/", f" {' '.join(TIME_LIMIT)} launch/slurm/")
    job_id = _submit(line, out, "--arch", TIME_LIMIT_ARCH, "--epochs", TIME_LIMIT_EPOCHS, "--log", log_path)
    # The same run without interruption, by the MPI's own launcher, meanwhile (it only slows the job down)
    whole_path = tmp_path / "whole.h5"
    whole = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "cnnpar.train", "--dataset", "mnist-5k", "--reduce", "sum",
                              "--arch", TIME_LIMIT_ARCH, "--epochs", TIME_LIMIT_EPOCHS, "--seed", "1", "--checkpoint-every", "1e",
                              "--log", str(whole_path), "--quiet"], cwd=REPO, env=clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(job_id, timeout_s=120, until=("RUNNING",) + FINAL_STATES)
        # Requeued by its job script at the warning: the time limit never ended it
        info = _wait(job_id, timeout_s=180, until=("PENDING", "REQUEUED") + FINAL_STATES)
        assert info["JobState"] in ("PENDING", "REQUEUED"), out.read_text()
        # The second start gets time to finish, and may begin soon (a requeued job waits otherwise), but not
        # within the second of the requeue: slurmd revoked the job's credential then, and refuses a launch
        # whose credential is not newer, in whole seconds ("Job credential revoked"; the job ends FAILED)
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "TimeLimit=10", "StartTime=now+2"], timeout=30)
        info = _wait(job_id, timeout_s=600)
        output, _ = whole.communicate(timeout=600)
    finally:
        if whole.poll() is None:
            whole.kill()
    assert whole.returncode == 0, output
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "cnnpar: job: SIGUSR1 from Slurm (the time limit is near)" in text
    stopped = [row for row in text.splitlines() if row.startswith("cnnpar: stopped by SIGUSR1 after step ")]
    assert len(stopped) == 1 and f"checkpoint {log_path}.ckpt written" in stopped[0], text
    assert "DUE TO TIME LIMIT" not in text and "requeueing job" in text and "resuming" in text, text
    print(f"time-limited job {job_id}: {stopped[0]}")
    resumed, reference = _result(log_path), _result(whole_path)
    assert resumed["status"] == "complete"
    assert np.array_equal(resumed["step"], reference["step"])
    assert np.array_equal(resumed["loss"], reference["loss"])
    assert np.array_equal(resumed["params"], reference["params"])


def _map_logs(folder) -> dict:
    """{how/name: log} of a map folder's results (not its incomplete/ leftovers)."""
    return {f"{p.parent.name}/{p.name}": p for how in ("one-process", "real-ranks", "noise")
            for p in sorted((folder / how).glob("*.h5"))}


@needs_slurm
def test_map_job_array_equals_a_local_map_and_a_cancelled_task_resubmitted_completes_its_slice(tmp_path):
    line = _readme_jobs()["map"]
    array, local = tmp_path / "array", tmp_path / "local"
    started = time.monotonic()
    job = _submit(line, tmp_path / "map-%a.out", "--out", array)
    report = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", "--ntasks=1",
                             f"--output={tmp_path / 'report.out'}", "launch/slurm/map.sbatch", "--report",
                             str(array)], capture_output=True, text=True, cwd=REPO, env=_environment(),
                            timeout=60)
    assert report.returncode == 0, report.stderr
    report_id = report.stdout.strip().split(";")[0]
    # the same map run here meanwhile, the reference the array's logs must equal
    here = subprocess.Popen([sys.executable, "-m", "cnnpar", "map", "--tiny", "--out", str(local), "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=clean_env())
    try:
        # the task holding the audited race is cancelled while it runs it (the longest point: tens of seconds)
        from cnnpar.experiments import map as tiny_map

        # the task whose slice holds the race (slices are a pure function of the map's points)
        holder, race = next((k, p) for k in range(4)
                            for p in tiny_map.unique_points(tiny_map.slice_parts(tiny_map.parts(tiny=True), k, 4))
                            if p.mode == "race")
        first = f"{job}_{holder}"
        race_log = tiny_map.log_path(array, race)
        deadline = time.monotonic() + 300
        while not (race_log.exists() and _job(first).get("JobState") == "RUNNING"):
            assert time.monotonic() < deadline, (_job(first), (tmp_path / f"map-{holder}.out").read_text()
                                                 if (tmp_path / f"map-{holder}.out").exists() else "")
            time.sleep(0.2)
        subprocess.run(["scancel", first], check=True, timeout=30)
        assert _wait(first)["JobState"] == "CANCELLED"
        again = _submit(line.replace("--array=0-3", f"--array={holder}"), tmp_path / "map-again.out", "--out", array)
        # the report waits for the resubmitted task too (a user does the same after a resubmission)
        subprocess.run(["scontrol", "update", f"jobid={report_id}", f"dependency=afterany:{job}:{again}"],
                       check=True, timeout=30)
        output, _ = here.communicate(timeout=400)
        assert here.returncode == 0, output
    finally:
        if here.poll() is None:
            here.kill()
    info = _wait(report_id, 400)
    assert info["JobState"] == "COMPLETED", (tmp_path / "report.out").read_text()
    tasks = {k: _job(f"{job}_{k}") for k in range(4) if k != holder} | {"again": _job(again)}
    for name, task in tasks.items():
        out = tmp_path / ("map-again.out" if name == "again" else f"map-{name}.out")
        assert task["JobState"] == "COMPLETED", out.read_text()
        assert task["EndTime"] <= info["StartTime"]   # ISO times: the report ran after every task ended
    print(f"map array {job}: 4 tasks (task {holder} cancelled, resubmitted as {again}), report {report_id}, "
          f"{time.monotonic() - started:.0f} s in all")
    # the race the cancel stopped was moved aside and run again (too short to checkpoint)
    assert list((array / "incomplete").glob(race.name.replace(".h5", ".*.h5")))
    assert (array / "report" / "explain.md").exists()

    ours, theirs = _map_logs(array), _map_logs(local)
    assert sorted(ours) == sorted(theirs) and len(ours) == len(tiny_map.unique_points(tiny_map.parts(tiny=True)))
    for name, path in theirs.items():
        with open_log(path) as want, open_log(ours[name]) as got:
            assert got.status == want.status == "complete", name
            assert (got.ranks, got.config["mode"]) == (want.ranks, want.config["mode"])
            if want.config["mode"] == "race":
                continue   # a race's losses differ between any two runs: the same kind of run is all
            assert np.array_equal(got.final["params"], want.final["params"]), name
            assert np.array_equal(got.steps["loss"], want.steps["loss"]), name
            assert np.array_equal(got.steps["rank_loss"], want.steps["rank_loss"]), name
            for column in ("train_loss", "test_loss"):
                assert np.array_equal(got.epochs[column], want.epochs[column]), name
