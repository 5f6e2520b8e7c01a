"""The package as a user installs it: a wheel built from this tree, installed non-editable into a fresh virtual
environment, and used from a folder outside the clone (no checkout on sys.path, no launch/ or analysis/
scripts): training, a stop and a resume, `runlog info`, a smoke sweep, the table, the plots, a map part and
its report, all through the installed `cnnpar` command.

Under the tests' Open MPI (CNNPAR_TEST_MPIEXEC) the wheel is installed without the mpich extra, as README's
cluster recipe does, and mpi4py runs on that MPI; otherwise with it, as README's quick start does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from mpi_util import REPO, clean_env, launcher_is_open_mpi, mpiexec

pytestmark = pytest.mark.skipif(os.environ.get("CNNPAR_SKIP_WHEEL") == "1", reason="CNNPAR_SKIP_WHEEL=1")


def _source_files() -> set:
    """What the wheel must carry: every module of the package, and the bundled data as cnnpar/_mnist5k."""
    files = {str(p.relative_to(REPO)) for p in (REPO / "cnnpar").rglob("*.py") if "__pycache__" not in p.parts}
    files |= {f"cnnpar/_mnist5k/{p.name}" for p in (REPO / "data" / "mnist-5k").glob("*.gz")}
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin folder, a working folder outside the clone, the environment to run it with)."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"),
                            str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("cnnpar-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(_source_files() - names)
    assert missing == [], f"the wheel lacks {missing}"
    assert not [n for n in names if n.startswith(("launch/", "analysis/", "tests/"))], "the wheel carries scripts"

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    spec = f"{wheel}" if launcher_is_open_mpi() else f"{wheel}[mpich]"
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], capture_output=True, text=True,
                          timeout=900, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    work = root / "outside"
    work.mkdir()
    env = clean_env(PYTHONUNBUFFERED="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return venv / "bin", work, env


def _launcher(bin_dir: Path) -> str:
    return mpiexec() if launcher_is_open_mpi() else str(bin_dir / "mpiexec")


def _run(installed, *command, timeout=600) -> subprocess.CompletedProcess:
    bin_dir, work, env = installed
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=work, env=env,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_installed_package_is_not_the_checkout(installed):
    bin_dir, _, _ = installed
    where = _run(installed, bin_dir / "python", "-c", "import cnnpar, os; print(os.path.dirname(cnnpar.__file__))")
    location = Path(where.stdout.strip())
    assert REPO not in (location, *location.parents), location
    assert (location / "_mnist5k").is_dir()


def test_train_stop_resume_and_runlog_info_from_the_wheel(installed):
    bin_dir, work, env = installed
    log = work / "run.h5"
    flags = ["--dataset", "mnist-5k", "--epochs", "200", "--checkpoint-every", "1e", "--log", str(log)]
    # 200 epochs cannot end before the first checkpoint is seen; the job is stopped there and continued
    job = subprocess.Popen([_launcher(bin_dir), "-n", "2", str(bin_dir / "cnnpar"), "train", *flags, "--quiet"],
                           cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not Path(f"{log}.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, job.communicate()[0]
    os.killpg(job.pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert "stopped by SIGTERM" in output, output
    info = _run(installed, bin_dir / "cnnpar", "runlog", "info", log).stdout
    assert "preempted" in info, info
    resumed = _run(installed, _launcher(bin_dir), "-n", "2", bin_dir / "python", "-m", "cnnpar.train", *flags,
                   "--resume", "auto")
    assert "resuming" in resumed.stdout + resumed.stderr
    assert "test accuracy" in resumed.stdout + resumed.stderr
    info = _run(installed, bin_dir / "cnnpar", "runlog", "info", log).stdout
    assert "complete" in info, info


def test_sweep_table_plots_map_and_report_from_the_wheel(installed):
    bin_dir, work, _ = installed
    cnnpar = bin_dir / "cnnpar"
    _run(installed, cnnpar, "sweep", "--preset", "smoke", "--out", "smoke", "--launcher", _launcher(bin_dir))
    logs = sorted((work / "smoke").glob("*.h5"))
    assert len(logs) == 4, logs
    table = _run(installed, cnnpar, "table", *logs, "--paper").stdout
    assert "ranks" in table.lower() and "sync" in table, table
    _run(installed, cnnpar, "plots", *logs, "--out", "figures")
    assert (work / "figures" / "accuracy.png").is_file()
    _run(installed, cnnpar, "map", "--tiny", "--parts", "tiny", "--out", "map", "--jobs", "1")
    _run(installed, cnnpar, "report", "map", "--out", "report")
    assert (work / "report" / "explain.md").is_file()
