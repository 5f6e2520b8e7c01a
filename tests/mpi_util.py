"""Launch MPI programs from tests: the mpiexec that sits next to this Python (the `mpich` wheel's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec next to this Python or on PATH; install the project (it brings MPICH)")
    return found


def run_mpi(n: int, args: list, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python ARGS...`, output captured as text."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    command = [mpiexec(), "-n", str(n), sys.executable, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)


def run_train(n: int, *flags, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_mpi(n, ["-m", "cnnpar.train", *flags], timeout=timeout, env=env)


def wait_for_rank_pids(tag: str, ranks: int, variable: str = "CNNPAR_TEST_TAG", timeout_s: float = 60) -> dict:
    """rank -> pid of a just-started job's ranks, found by the tag in their environment."""
    import time

    sys.path.insert(0, str(REPO / "launch"))
    from soak import rank_pids

    deadline = time.monotonic() + timeout_s
    found = {}
    while time.monotonic() < deadline and len(found) < ranks:
        found = rank_pids(tag, variable)
        time.sleep(0.02)
    assert len(found) == ranks, found
    return found
