"""Packaging that pyproject.toml cannot say: every package under cnnpar/ is found, none listed by hand (a
hand-kept list once left cnnpar.runlog out of the wheel), plus the bundled data, which lives once in
data/mnist-5k and is installed as cnnpar._mnist5k (pyproject.toml maps the folder)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["cnnpar", "cnnpar.*"]) + ["cnnpar._mnist5k"])
