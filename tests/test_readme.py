"""README's copy-paste lines are what CI runs and what the main job is."""

import re

from mpi_util import REPO

# CI runs the cluster recipe in its own virtual environment, beside the MPICH one of the test line.
CI_CLUSTER_VENV = ".venv-openmpi"


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _ci_lines() -> list[str]:
    return [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_line():
    readme = (REPO / "README.md").read_text()
    test_line = next(block for block in _bash_blocks(readme) if "pytest" in block)
    assert "'.[mpich,test]'" in test_line  # a fresh machine gets its MPI from the mpich extra
    assert test_line in _ci_lines()


def test_readme_main_job_line_installs_mpich_and_is_mpirun_12_ranks():
    readme = (REPO / "README.md").read_text()
    main_line = _bash_blocks(readme)[0]
    assert "pip install -e '.[mpich]'" in main_line
    assert main_line.endswith("mpirun -n 12 python -m cnnpar.train")


def test_ci_runs_the_readme_cluster_recipe_without_the_mpich_wheel():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## On a cluster"):]
    recipe = _bash_blocks(section)[0].splitlines()
    install = next(line for line in recipe if "pip install" in line).split("#")[0].strip()
    assert "mpich" not in install and install.endswith("pip check")
    check = next(line for line in recipe if "cnnpar.launcher library" in line).split("#")[0].strip()
    ci = _ci_lines()
    assert install.replace(".venv", CI_CLUSTER_VENV) in ci
    assert any(line.startswith(check + " ") for line in ci)
