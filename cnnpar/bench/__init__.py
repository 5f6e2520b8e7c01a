"""Benchmarks: `cnnpar bench NAME` (or `python launch/bench_NAME.py`). Each module's main() is one benchmark;
its docstring says what it measures and how. Speed goals live here, never in timed tests."""

from pathlib import Path

# The folder that holds this cnnpar package (a checkout, or site-packages): benchmarks that compare two trees
# run this one with PYTHONPATH set to it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
