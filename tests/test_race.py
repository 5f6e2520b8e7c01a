"""Race modes (cnnpar/exchange/race.py): the audit's estimator in-process, the exchanges under mpiexec
(tests/mpi_race_driver.py), lost updates that are real on this machine, and the trainer end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpar.exchange import race
from cnnpar.errors import UserError
from mpi_util import REPO, run_mpi

DRIVER = Path(__file__).with_name("mpi_race_driver.py")


def _racy_sum(contrib: np.ndarray, keep: list, order: list) -> np.float32:
    """What a racy accumulator ends with: -0.0 plus the surviving contributions, float32, in some order."""
    total = np.float32(-0.0)
    for r in order:
        if r in keep:
            total = np.float32(total + contrib[r])
    return total


# ----------------------------------------------------------------------------------------------------
# The audit's estimator, in-process
# ----------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_lost_count_is_exact_when_contributions_are_distinct_powers_of_two(data):
    # Subset sums of distinct powers of two are unique (and exact in float32): the lost set is identifiable.
    n = data.draw(st.integers(1, 12))
    elements = 40
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    signs = rng.choice([-1.0, 1.0], size=(n, elements))
    contrib = (signs * 2.0 ** rng.permuted(np.tile(np.arange(n), (elements, 1)), axis=1).T).astype(np.float32)
    true_lost = rng.integers(0, n, size=elements)          # 0 .. n-1: the last writer always survives
    racy = np.empty(elements, np.float32)
    for e in range(elements):
        order = list(rng.permutation(n))
        keep = order[true_lost[e]:]
        racy[e] = _racy_sum(contrib[:, e], keep, order)
    *_, differ, lost = race.lost_per_element(contrib, racy)
    assert np.array_equal(lost, true_lost)
    assert np.array_equal(differ, true_lost > 0)
    rel, frac, total = race.audit_figures(contrib, racy)
    assert total == true_lost.sum() and frac == pytest.approx((true_lost > 0).mean())
    assert (rel == 0) == (total == 0)


def test_lost_count_on_generic_gradients_is_a_tight_lower_bound():
    rng = np.random.default_rng(5)
    n, elements = 12, 3000
    contrib = rng.standard_normal((n, elements)).astype(np.float32) * rng.lognormal(0, 2, (n, 1)).astype(np.float32)
    contrib[rng.random((n, elements)) < 0.3] = 0.0          # many exact zeros, as in real gradients
    true_lost = np.zeros(elements, np.int64)
    racy = np.empty(elements, np.float32)
    for e in range(elements):
        order = list(rng.permutation(n))
        k = int(rng.integers(0, n))
        keep = order[k:]
        racy[e] = _racy_sum(contrib[:, e], keep, order)
        true_lost[e] = np.count_nonzero(contrib[order[:k], e])   # losing a zero is invisible and harmless
    *_, lost = race.lost_per_element(contrib, racy)
    # The true lost set always explains the racy value within the rigorous float32 bound, so the fewest
    # explaining contributions never exceed the truth; coincidences make it smaller, rarely.
    assert np.all(lost <= true_lost)
    assert np.mean(lost == true_lost) > 0.99
    assert lost.sum() >= 0.99 * true_lost.sum()


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_summation_order_alone_is_never_counted_as_loss(data):
    # atomic mode / MPI sums in any order: rel error is float32 rounding only, nothing differs or is lost
    n = data.draw(st.integers(1, 16))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    scale = 10.0 ** rng.uniform(-30, 30, size=(n, 1))
    contrib = (rng.standard_normal((n, 64)) * scale).astype(np.float32)
    racy = np.array([_racy_sum(contrib[:, e], list(range(n)), list(rng.permutation(n))) for e in range(64)],
                    np.float32)
    rel, frac, lost = race.audit_figures(contrib, racy)
    assert frac == 0 and lost == 0
    exact = contrib.astype(np.float64).sum(axis=0)
    bound = np.linalg.norm(race.summation_tolerance(np.abs(contrib.astype(np.float64)).sum(axis=0), n))
    assert rel <= bound / np.linalg.norm(exact) + 1e-300
    if n == 1:
        assert rel == 0


def test_negative_zero_makes_one_rank_bitwise():
    g = np.array([0.0, -0.0, 1.5, -2.25, 1e-45, -1e-45, np.inf, -np.inf, np.nan, 3.4e38], np.float32)
    acc = np.full(g.size, -0.0, np.float32)
    race.racy_add(acc, g)
    assert np.array_equal(acc.view(np.uint32), g.view(np.uint32))
    rel, frac, lost = race.audit_figures(g[None, :6], acc[:6])
    assert (rel, frac, lost) == (0.0, 0.0, 0)


def _simulate_hogwild(rng, n, size, lockstep):
    p0 = rng.standard_normal(size).astype(np.float32) * 0.1
    grads = rng.standard_normal((n, size)).astype(np.float32)
    scale = np.float32(0.01)
    p = p0.copy()
    true_lost = np.zeros(size, np.int64)
    for e in range(size):
        order = list(rng.permutation(n))
        k = (n - 1) if lockstep and rng.random() < 0.7 else int(rng.integers(0, n)) if rng.random() < 0.2 else 0
        value = p[e]
        for r in order[k:]:
            value = np.float32(value - np.float32(scale * grads[r, e]))
        p[e] = value
        true_lost[e] = k
    return p0, p, grads, true_lost, scale


@pytest.mark.parametrize("lockstep", [False, True])
def test_hogwild_audit_recovers_scale_and_lost_updates(lockstep):
    rng = np.random.default_rng(11 + lockstep)
    p0, p1, grads, true_lost, scale = _simulate_hogwild(rng, 4, 4000, lockstep)
    s, rel_s = race.hogwild_scale(p0, p1, grads)
    assert s == pytest.approx(float(scale), rel=1e-5) and rel_s < 1e-4
    rel, frac, lost = race.hogwild_audit_figures(p0, p1, grads)
    assert lost <= true_lost.sum() and lost >= 0.97 * true_lost.sum()
    assert frac == pytest.approx((true_lost > 0).mean(), abs=0.02)
    none = race.hogwild_audit_figures(p0, p0 - scale * grads.sum(axis=0).astype(np.float32), grads)
    assert none[1] == 0 and none[2] == 0


def test_window_choice_and_user_errors():
    assert race.choose_window("race", "auto", 1) == "shared"
    assert race.choose_window("race", "auto", 3) == "rma"
    assert race.choose_window("atomic", "rma", 1) == "rma"
    assert race.choose_window("hogwild", "auto", 1) == "shared"
    with pytest.raises(UserError) as err:
        race.choose_window("race", "shared", 2)
    assert err.value.culprit == "--race-window"
    with pytest.raises(UserError) as err:
        race.choose_window("hogwild", "auto", 2)
    assert err.value.culprit == "--mode"
    with pytest.raises(UserError):
        race.choose_window("hogwild", "rma", 1)


# ----------------------------------------------------------------------------------------------------
# The exchanges under MPI
# ----------------------------------------------------------------------------------------------------

def _driver(n, *args, timeout=120):
    done = run_mpi(n, [DRIVER, *map(str, args)], timeout=timeout)
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_race_and_atomic_on_both_windows(n):
    """Every rank reads the same sum; n=1 bitwise; atomic exact within summation order and audited lossless;
    audit rows self-consistent; rotation correct under skew; close() twice frees the window."""
    out = _driver(n, "check")
    for window in ("shared", "rma"):
        for op in ("race", "atomic"):
            for audit in (False, True):
                assert f"ok {window} {op} audit={audit} n={n}" in out


@pytest.mark.parametrize("n", [1, 3])
def test_hogwild_shares_one_parameter_buffer(n):
    out = _driver(n, "hogwild")
    assert f"ok hogwild audit=True n={n}" in out


def test_lost_updates_are_real_on_this_machine():
    """Four ranks add buffers of ones at the same moment; the result counts the surviving contributions
    exactly. The shared window loses a little (only where two cores' read-modify-writes of one cache line
    interleave), the rma window loses whole buffers (its Get ... Put spans milliseconds), atomic nothing."""
    out = _driver(4, "contention", "shared:race:4194304:40", "rma:race:262144:10", "shared:atomic:4194304:4",
                  "rma:atomic:262144:4", timeout=180)
    rows = {(r["window"], r["mode"]): r for r in map(json.loads, out.strip().splitlines())}
    assert rows["shared", "race"]["lossy_rounds"] >= 1, rows["shared", "race"]
    assert rows["rma", "race"]["lossy_rounds"] >= 1, rows["rma", "race"]
    assert max(rows["rma", "race"]["lost_fraction"]) >= 0.25   # at least one whole buffer of four
    for window in ("shared", "rma"):
        assert rows[window, "atomic"]["lossy_rounds"] == 0


def test_auto_picks_rma_across_nodes_and_shared_refuses_clearly():
    out = _driver(2, "choose", "race", "auto", 2)
    assert json.loads(out.strip().splitlines()[-1])["window"] == "rma"
    done = run_mpi(2, [DRIVER, "choose", "race", "shared", 2], timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("cnnpar: error:")]
    assert lines == [lines[0]] and "--race-window" in lines[0] and "2 nodes" in lines[0]
    done = run_mpi(2, [DRIVER, "choose", "hogwild", "auto", 2], timeout=60)
    assert done.returncode == 2 and "cnnpar: error: --mode: hogwild" in done.stderr


# ----------------------------------------------------------------------------------------------------
# The trainer end to end (skipped until the trainer's modules are all present)
# ----------------------------------------------------------------------------------------------------

def _trainer_ready() -> bool:
    return all((REPO / "cnnpar" / f"{name}.py").exists() or (REPO / "cnnpar" / name / "__init__.py").exists()
               for name in ("data", "model", "optim", "runlog", "train"))


needs_trainer = pytest.mark.skipif(not _trainer_ready(), reason="the trainer is not complete yet")


@needs_trainer
def test_trainer_race_with_one_rank_equals_sync_bitwise(tmp_path):
    from cnnpar.runlog import open_log
    from mpi_util import run_train

    flags = ["--dataset", "mnist-5k", "--steps", "30", "--seed", "2", "--quiet"]
    finals = {}
    for mode in ("sync", "race", "atomic"):
        done = run_train(1, *flags, "--mode", mode, "--log", tmp_path / f"{mode}.h5")
        assert done.returncode == 0, done.stderr
        with open_log(tmp_path / f"{mode}.h5") as log:
            finals[mode] = np.asarray(log.final["params"])
    for mode in ("race", "atomic"):
        assert np.array_equal(finals[mode].view(np.uint32), finals["sync"].view(np.uint32)), mode


@needs_trainer
@pytest.mark.parametrize("mode,n", [("race", 3), ("hogwild", 2)])
def test_trainer_audit_logs_every_step(tmp_path, mode, n):
    from cnnpar.runlog import open_log
    from mpi_util import run_train

    path = tmp_path / f"{mode}.h5"
    steps = 40
    done = run_train(n, "--dataset", "mnist-5k", "--steps", str(steps), "--mode", mode, "--race-audit",
                     "--quiet", "--log", path, "--log-window", "16")
    assert done.returncode == 0, done.stderr
    with open_log(path) as log:
        assert log.complete
        audit = log.audit
        audited = steps if mode == "race" else steps - 1   # hogwild: the last update is never audited
        assert audit is not None and list(audit["step"]) == list(range(audited))
        lost, frac = np.asarray(audit["lost_contributions"]), np.asarray(audit["frac_elements_differ"])
        assert np.all(lost >= 0) and np.array_equal(lost == 0, frac == 0)
        assert np.all(np.isfinite(np.asarray(audit["rel_l2_error"])))


@needs_trainer
@pytest.mark.parametrize("mode,fault_rank", [("race", 0), ("hogwild", 1)])
def test_a_failing_rank_ends_every_rank_without_hanging(tmp_path, mode, fault_rank):
    # close() must not block in the collective Win.Free while the job is being aborted
    done = run_mpi(3, [REPO / "tests" / "mpi_fault_driver.py", "--mode", mode, "--steps", "50", "--quiet",
                       "--log", tmp_path / "fault.h5"], timeout=60,
                   env={"FAULT_RANK": str(fault_rank), "FAULT_CALL": "5"})
    assert done.returncode != 0
    assert "injected fault" in done.stderr
