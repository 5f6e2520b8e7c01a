"""The MPI launcher a sweep starts its runs with: the mpiexec next to this Python, one from PATH, or srun."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cnnpar.errors import UserError


@dataclass
class Launcher:
    argv: list            # e.g. ['/venv/bin/mpiexec'] or ['srun', '--mpi=pmi2']
    flavour: str          # 'mpich', 'openmpi', 'intel', 'slurm' or 'unknown'
    version: str = ""
    cores: int = 1

    def command(self, ranks: int, python: str, train_args: list) -> list:
        if any("{n}" in a for a in self.argv):
            cmd = [a.replace("{n}", str(ranks)) for a in self.argv]
        else:
            cmd = list(self.argv) + ["-n", str(ranks)]
        if self.flavour == "openmpi":
            if ranks > self.cores:
                cmd.append("--oversubscribe")
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd.append("--allow-run-as-root")
        return cmd + [python, "-m", "cnnpar.train"] + list(train_args)


def detect_flavour(version_text: str) -> tuple:
    """(flavour, version) from a launcher's `--version` output."""
    text = version_text or ""
    patterns = [
        ("openmpi", r"\(Open(?:RTE| MPI)\)\s*([\d.]+\w*)"),
        ("openmpi", r"Open MPI[^\d\n]*([\d.]+\w*)"),
        ("openmpi", r"\bprte(?:run)? \(PRRTE\)\s*([\d.]+)"),
        ("intel", r"Intel\(R\) MPI Library[^\n]*?Version\s*([\d.]+\w*)"),
        ("intel", r"Intel\(R\) MPI Library()"),
        ("mpich", r"HYDRA build details:\s*\n\s*Version:\s*([\d.]+\w*)"),
        ("mpich", r"MPICH Version:\s*([\d.]+\w*)"),
        ("slurm", r"^slurm[- ]+([\d.]+)"),
        ("mpich", r"\b(?:HYDRA|MPICH)\b()"),
    ]
    for flavour, pattern in patterns:
        match = re.search(pattern, text, re.M | re.I if flavour != "intel" else re.M)
        if match:
            return flavour, match.group(1)
    return "unknown", ""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_mpiexec() -> str:
    beside = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if (beside / name).exists():
            return str(beside / name)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    raise UserError("mpiexec", "not found next to this Python nor on PATH; install the project (its mpich "
                               "wheel brings one), load your site's MPI module, or give --launcher")


def make_launcher(spec: str | None, run=subprocess.run) -> Launcher:
    """The launcher from --launcher (or the default mpiexec) with its flavour detected."""
    argv = shlex.split(spec) if spec else [default_mpiexec()]
    if not argv:
        raise UserError("--launcher", "empty launcher")
    program = os.path.basename(argv[0])
    if program == "srun":
        return Launcher(argv, "slurm", "", usable_cores())
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if not exe or not os.path.exists(exe):
        raise UserError("--launcher", f"{argv[0]} not found")
    try:
        done = run([exe, "--version"], capture_output=True, text=True, timeout=30)
        text = (done.stdout or "") + (done.stderr or "")
    except (OSError, subprocess.TimeoutExpired) as err:
        text = ""
        print(f"sweep: note: `{argv[0]} --version` failed ({err}); launching it without flavour-specific flags",
              file=sys.stderr)
    flavour, version = detect_flavour(text)
    return Launcher(argv, flavour, version, usable_cores())
