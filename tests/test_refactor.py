"""The restructures changed no numerics: runs of this tree and of the last commit before each restructure end
with the same params and per-step losses, bit for bit. Issue 12's (the exchange package, the run-log schema,
the loop's state object) is compared with 38d5212; issue 20's (one home for each fact: the mode families, the
exchange rule, the config fields' roles, the run paths, train.py and data split by concern) with 2f62ac4.
Issue 22's kernel work (conv, pool and relu fused into one pass each way) is compared with 2f62ac4 too, on
the settings whose kernels it changed: both named architectures, and k samples per rank on one rank (the
accuracy map's setting), where each sample's gradient is formed on its own before it is added. So are its
compiled windows of steps (a rank whose exchange does nothing, one rank or --mode local, runs sample,
forward, backward and SGD for many steps in one numba call), on settings that end windows at every kind of
event: the log window, the replica check, a learning-rate warm-up, an epoch's end, a short last step.

The earlier trees come from git history (`git archive`), so this needs a clone that holds those commits; a
shallow clone skips with the reason. When a later change alters the numerics on purpose, move REFERENCES to
the commit that made that change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import io

import numpy as np
import pytest

from mpi_util import REPO, mpiexec

# the trees before each restructure: issue 12's ("README: rewrap") and issue 20's
REFERENCES = ("38d5212", "2f62ac4")


@pytest.fixture(scope="module", params=REFERENCES)
def reference_tree(request, tmp_path_factory):
    reference = request.param
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("no git checkout to take the reference tree from")
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{reference}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {reference} is not in this clone (shallow?)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", reference, "cnnpar", "data"],
                             capture_output=True, check=True).stdout
    tree = tmp_path_factory.mktemp(f"reference-{reference}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _run(tree, n, flags, log):
    # The working tree's own tests import from REPO; the reference runs from its extracted copy.
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    command = [mpiexec(), "-n", str(n), sys.executable, "-m", "cnnpar.train", "--dataset", "mnist-5k",
               "--steps", "300", "--seed", "5", "--quiet", "--log", str(log), *flags]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    import h5py

    with h5py.File(log, "r") as f:  # a completed log opens plainly, before and after
        return np.asarray(f["final/params"]), np.asarray(f["steps/loss"])


_THIS_TREE = {}


def _this_tree_run(n, flags, log):
    """This tree's run of one setting, made once for every reference it is compared with."""
    if (n, flags) not in _THIS_TREE:
        _THIS_TREE[n, flags] = _run(REPO, n, list(flags), log)
    return _THIS_TREE[n, flags]


def _assert_same_bits(reference_tree, n, flags, tmp_path):
    before_params, before_loss = _run(reference_tree, n, flags, tmp_path / "before.h5")
    after_params, after_loss = _this_tree_run(n, tuple(flags), tmp_path / "after.h5")
    assert len(after_loss) == len(before_loss) == 300
    assert np.array_equal(after_params.view(np.uint32), before_params.view(np.uint32))
    assert np.array_equal(after_loss.view(np.uint32), before_loss.view(np.uint32))


@pytest.mark.parametrize("n, flags", [
    (1, []),
    (2, ["--allreduce", "shm"]),
    (2, ["--allreduce", "factored"]),
    (3, ["--allreduce", "mpi"]),
    (3, []),
    (2, ["--samples-per-rank", "2", "--momentum", "0.9", "--reduce", "mean"]),
    (2, ["--mode", "atomic"]),
    (4, ["--pretend-nodes", "2"]),
    (2, ["--reduce", "mean", "--lr-scaling", "linear", "--warmup-steps", "40"]),
])
def test_this_tree_matches_the_one_before_the_restructure_bit_for_bit(tmp_path, reference_tree, n, flags):
    _assert_same_bits(reference_tree, n, flags, tmp_path)


@pytest.mark.parametrize("n, flags", [
    (1, ["--samples-per-rank", "12"]),
    (1, ["--arch", "lenet"]),
    (2, ["--arch", "lenet", "--samples-per-rank", "3", "--allreduce", "shm"]),
    (1, ["--arch", "conv5k3p1,relu,pool,conv4k5,relu,pool,dense10", "--samples-per-rank", "2"]),
])
def test_the_fused_kernels_match_the_tree_before_them_bit_for_bit(request, tmp_path, reference_tree, n, flags):
    if request.node.callspec.params["reference_tree"] != "2f62ac4":
        pytest.skip("issue 22's kernels are compared with their own base only")
    _assert_same_bits(reference_tree, n, flags, tmp_path)


@pytest.mark.parametrize("n, flags", [
    (1, ["--log-window", "37", "--check-every", "50"]),
    (1, ["--reduce", "mean", "--lr-scaling", "linear", "--warmup-steps", "40", "--momentum", "0.9"]),
    (1, ["--samples-per-rank", "14", "--reduce", "mean"]),  # 4,000 = 285 x 14 + 10: step 286 is short
    (2, ["--mode", "local", "--log-window", "64"]),
])
def test_the_compiled_windows_of_steps_match_the_tree_before_them_bit_for_bit(request, tmp_path, reference_tree, n,
                                                                               flags):
    if request.node.callspec.params["reference_tree"] != "2f62ac4":
        pytest.skip("issue 22's windows are compared with its base only")
    _assert_same_bits(reference_tree, n, flags, tmp_path)
