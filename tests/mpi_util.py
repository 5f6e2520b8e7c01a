"""Launch MPI programs from tests, under any MPI: the mpiexec that matches the MPI mpi4py links.

The launcher is $CNNPAR_TEST_MPIEXEC when set, else the mpiexec next to this Python (the `mpich` wheel's),
else the one on PATH (a site's or Debian's Open MPI). Open MPI's mpirun needs to be told to run as root
(containers, CI) and to put more ranks than cores on a machine; MPICH ignores both variables.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
if hasattr(os, "geteuid") and os.geteuid() == 0:
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


def mpiexec() -> str:
    """$CNNPAR_TEST_MPIEXEC, else the launcher the sweeps use (cnnpar.experiments.launchers.default_mpiexec)."""
    chosen = os.environ.get("CNNPAR_TEST_MPIEXEC", "").strip()
    if chosen:
        return chosen
    from cnnpar.experiments.launchers import default_mpiexec

    return default_mpiexec()


@functools.lru_cache(maxsize=1)
def launcher_is_open_mpi() -> bool:
    """Whether the tests' launcher is Open MPI's mpirun (asked of the launcher itself, not its environment)."""
    from cnnpar.experiments.launchers import detect_flavour

    version = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=30)
    return detect_flavour(version.stdout + version.stderr)[0] == "openmpi"


def cnnpar_lines(text: str) -> list[str]:
    """The non-empty lines of a job's output without the launcher's own report of a failed job: Open MPI's
    mpirun adds banners framed by dashed lines, and `[host:pid] ...` notes, after cnnpar's one error line
    (MPICH's mpiexec adds nothing). Open MPI's libevent also warns `[warn] Epoll MOD(1) on fd N failed ... Bad
    file descriptor` when a terminal's ^C reaches mpirun and its ranks at once (their sockets close under it):
    mpirun's line, not cnnpar's."""
    kept, inside = [], False
    for line in text.splitlines():
        if re.fullmatch(r"-{20,}", line.strip()):
            inside = not inside
            continue
        if inside or not line.strip() or re.match(r"\[[\w.-]+:\d+\] ", line) or line.startswith("[warn] Epoll "):
            continue
        kept.append(line)
    return kept


def clean_env(**extra) -> dict:
    """The environment this process started with, plus `extra`, for a child that launches MPI itself.

    An Open MPI singleton (mpi4py initialised inside the test process) adds PMIx and ORTE variables to the
    C environment, which a child inherits when no env is given; a child `mpirun` then takes itself for part
    of that singleton's job and exits 1 without a word. os.environ is the copy taken at start-up."""
    return dict(os.environ, **extra)


def run_mpi(n: int, args: list, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python ARGS...`, output captured as text."""
    full_env = clean_env()
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

    from cnnpar.launcher import rank_pids

    deadline = time.monotonic() + timeout_s
    found = {}
    while time.monotonic() < deadline and len(found) < ranks:
        found = rank_pids(tag, variable)
        time.sleep(0.02)
    assert len(found) == ranks, found
    return found
