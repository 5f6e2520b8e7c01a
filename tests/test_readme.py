"""README's copy-paste lines are what CI runs and what the main job is."""

import re

from mpi_util import REPO


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_line():
    readme = (REPO / "README.md").read_text()
    test_line = next(block for block in _bash_blocks(readme) if "pytest" in block)
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_line in ci_lines


def test_readme_main_job_line_is_mpirun_12_ranks():
    readme = (REPO / "README.md").read_text()
    main_line = _bash_blocks(readme)[0]
    assert main_line.endswith("mpirun -n 12 python -m cnnpar.train")
