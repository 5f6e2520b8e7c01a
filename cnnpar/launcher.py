"""Which launcher started this process, how many tasks it started, and which srun MPI plugin fits the MPI here.

A launcher that cannot reach the MPI library that mpi4py links (`srun` with the wrong or no `--mpi` plugin,
Open MPI's `mpirun` driving an MPICH build) still starts N processes, but each initialises MPI alone as a
one-rank world: N independent trainers that collide on one log. The launchers say how many tasks they
started in their environment; MPI says how many ranks it sees. When the two disagree, the trainer stops
with one line that names the launcher to use (`check_world_size`).

The launchers' variables, most specific first (an `mpirun` inside a Slurm allocation starts its daemons with
srun, so its ranks carry a job step's `SLURM_STEP_NUM_TASKS` of one per node as well as their own count):
  Open MPI mpirun/prterun   OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK
  PMI-1/PMI-2 (MPICH Hydra, srun --mpi=pmi2, Intel MPI)   PMI_SIZE, PMI_RANK
  PMIx (srun --mpi=pmix, prterun)   PMIX_RANK (the size is known only after MPI_Init)
  Slurm srun                SLURM_STEP_NUM_TASKS, SLURM_PROCID (a batch script itself has no step count)

`python -m cnnpar.launcher plugin` prints the srun `--mpi` plugin for the MPI that mpi4py links, without
initialising MPI; `python -m cnnpar.launcher check` initialises it and prints one line (ranks, library,
launcher) or fails with the mismatch line: the Slurm scripts run it as their first job step.
"""

from __future__ import annotations

import os
import sys

from .errors import EXIT_USER_ERROR, UserError, exit_on_user_error

# (variable, who sets it) for the task count, most specific first.
TASK_COUNT_VARIABLES = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI launcher (MPICH's mpiexec, srun --mpi=pmi2)"),
    ("SLURM_STEP_NUM_TASKS", "srun"),
)
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")

# srun's --mpi plugin per MPI family: MPICH and its derivatives speak PMI-2 to srun (the PyPI mpich wheel
# refuses PMIx: "unsupported PMI version PMIx"), Open MPI 4 and 5 speak PMIx.
SRUN_PLUGINS = {"mpich": "pmi2", "intel": "pmi2", "mvapich": "pmi2", "openmpi": "pmix"}


def launcher_tasks(environ=None) -> tuple[int, str] | None:
    """(tasks the launcher started, its name), or None when no launcher variable is set (a plain `python`)."""
    environ = os.environ if environ is None else environ
    for variable, who in TASK_COUNT_VARIABLES:
        value = environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), who
    return None


def launcher_rank(environ=None) -> int | None:
    """This process's rank as its launcher numbered it, or None outside any launcher."""
    environ = os.environ if environ is None else environ
    for variable in RANK_VARIABLES:
        value = environ.get(variable, "").strip()
        if value.isdigit():
            return int(value)
    return None


def library_family(version_text: str) -> str:
    """'mpich', 'openmpi', 'intel', 'mvapich' or 'unknown' from MPI_Get_library_version's text."""
    text = (version_text or "").replace("\0", "")
    if "Open MPI" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "MVAPICH" in text:
        return "mvapich"
    if "MPICH" in text:
        return "mpich"
    return "unknown"


def library_summary(version_text: str) -> str:
    """The first line of the library's version text, without the NULs some MPIs pad it with."""
    lines = (version_text or "").replace("\0", "").strip().splitlines()
    return " ".join(lines[0].split()) if lines else "unknown MPI"


def srun_plugin(version_text: str) -> str | None:
    """srun's --mpi plugin for this MPI library, or None when the family is unknown (use the site default)."""
    return SRUN_PLUGINS.get(library_family(version_text))


def advice(version_text: str) -> str:
    """What to launch with, for the MPI that mpi4py links."""
    plugin = srun_plugin(version_text)
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else "the mpiexec of that MPI"
    srun = f"`srun --mpi={plugin}`" if plugin else "srun with the plugin your site documents for it"
    return f"mpi4py here links {library_summary(version_text)}: start it with {mpiexec} or, under Slurm, {srun}"


def rank_pids(tag: str, variable: str = "CNNPAR_SOAK_TAG") -> dict:
    """rank -> pid of the MPI processes whose environment has `variable` set to `tag`, numbered by their
    launcher's rank variable (Open MPI, PMI/Hydra, PMIx or Slurm: RANK_VARIABLES)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in items if b"=" in item)
        if env.get(variable.encode()) != tag.encode():
            continue
        rank = next((env[name.encode()] for name in RANK_VARIABLES if env.get(name.encode(), b"").isdigit()), None)
        if rank is not None:
            found[int(rank)] = int(pid)
    return found


def check_world_size(world_size: int, version_text: str, environ=None) -> None:
    """Refuse N accidental one-rank jobs: the launcher started more (or other) tasks than MPI sees ranks.

    With a world of one rank each process is alone, so only the launcher's rank 0 prints the line (a
    UserError) and the others exit 2 silently; in a bigger world every rank raises and rank 0 prints."""
    found = launcher_tasks(environ)
    if found is None or found[0] == world_size:
        return
    tasks, who = found
    if world_size == 1:
        what = (f"{who} started {tasks} tasks, but each sees an MPI world of 1 rank: they would train as "
                f"{tasks} separate one-rank jobs")
    else:
        what = f"{who} started {tasks} tasks, but MPI sees {world_size} ranks"
    if world_size == 1 and launcher_rank(environ) not in (0, None):
        raise SystemExit(EXIT_USER_ERROR)
    raise UserError("launcher", f"{what}. {advice(version_text)}")


def _library_version() -> str:
    import mpi4py

    mpi4py.rc.initialize = False  # the version is readable before MPI_Init; a wrong launcher may hang there
    from mpi4py import MPI

    return MPI.Get_library_version()


@exit_on_user_error
def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cnnpar.launcher", description=(
        "The MPI that mpi4py links and how to launch it. `plugin` prints srun's --mpi plugin for it (pmi2 for "
        "MPICH, Intel MPI and MVAPICH, pmix for Open MPI; empty when unknown) without initialising MPI; "
        "`check` initialises MPI on every task and prints one line, or fails with exit 2 when the launcher's "
        "task count and MPI's world size disagree."))
    parser.add_argument("what", choices=["plugin", "family", "library", "check"],
                        help="plugin: srun --mpi value; family: mpich, openmpi, intel, mvapich or unknown; "
                             "library: the MPI library's first version line; "
                             "check: start MPI and compare its world size with the launcher's task count")
    args = parser.parse_args(argv)
    if args.what == "plugin":
        print(srun_plugin(_library_version()) or "")
        return 0
    if args.what == "family":
        print(library_family(_library_version()))
        return 0
    if args.what == "library":
        print(library_summary(_library_version()))
        return 0
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    version = MPI.Get_library_version()
    check_world_size(world.Get_size(), version)
    if world.Get_rank() == 0:
        found = launcher_tasks()
        started = f"{found[1]}, {found[0]} tasks" if found else "no launcher"
        print(f"MPI ok: {world.Get_size()} ranks, {library_summary(version)} ({started})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
