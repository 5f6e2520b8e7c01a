"""The sufficient-factor exchange (cnnpar/exchange/factored.py): bitwise the flat rank-order sum.

In-process: the reconstruction kernel against a NumPy model of the dense kernel's rounding (zeros, -0,
NaN, inf, subnormals, products that underflow); a real network's factors rebuild its own gradient; the
step kernel synchronises threads. Under mpiexec (tests/mpi_factored_driver.py, one job per rank count):
real one-sample gradients of small and lenet, every protocol and wait policy, against numpy and the flat
ShmAllreduce on every step."""

from __future__ import annotations

import functools
import json
import threading
import time

import numpy as np
import pytest

from cnnpar import model
from cnnpar.exchange import factored as F
from cnnpar.exchange import primitives as P
from mpi_util import REPO, run_mpi

DRIVER = REPO / "tests" / "mpi_factored_driver.py"


def same(a, b):
    """The same float32 bits, or both NaN (a NaN's payload is not part of the contract)."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def dense_term(g, x, rounding):
    """What kernels.dense_backward writes into a zeroed row for factor g and input x, modelled in NumPy.

    ROUND_FUSED: fma(g, x, +0). A float32 x float32 product is exact in float64, so adding +0 there (which
    turns an exact -0 into +0) and rounding once to float32 is the fma. ROUND_TWICE: (g * x) + 0 in float32."""
    g, x = np.float32(g), np.asarray(x, np.float32)
    if g == 0:
        return np.zeros_like(x)
    with np.errstate(all="ignore"):
        if rounding == F.ROUND_FUSED:
            return (np.float64(g) * x.astype(np.float64) + 0.0).astype(np.float32)
        return (g * x) + np.float32(0.0)


def reference_gradient(payload, layout, rounding):
    """The full gradient one rank's payload stands for, in NumPy."""
    grads = np.zeros(layout.n_params, np.float32)
    for lo, hi, at in layout.segs:
        grads[lo:hi] = payload[at:at + hi - lo]
    for w0, n_out, n_in, _, x_at, g_at in layout.layers:
        x = payload[x_at:x_at + n_in]
        for o in range(n_out):
            grads[w0 + o * n_in:w0 + (o + 1) * n_in] = dense_term(payload[g_at + o], x, rounding)
    return grads


def special_payloads(layout, n, rng):
    """Payloads of n ranks full of the awkward cases: +-0, NaN, inf, subnormals, underflowing products."""
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 2.0 ** -149, -(2.0 ** -149), 2.0 ** -130,
                         1e-30, -1e-30, 1e30, 3.0, -0.5], np.float32)
    payloads = rng.standard_normal((n, layout.payload)).astype(np.float32)
    payloads *= np.float32(10.0) ** rng.integers(-30, 5, payloads.shape).astype(np.float32)
    pick = rng.random(payloads.shape) < 0.15
    payloads[pick] = rng.choice(specials, int(pick.sum()))
    return payloads


@pytest.mark.parametrize("rounding", [F.ROUND_FUSED, F.ROUND_TWICE])
@pytest.mark.parametrize("arch", ["small", "lenet"])
def test_rebuild_equals_rank_order_sum_of_modelled_kernel(arch, rounding):
    network = model.build_network(arch)
    layout = F.FactorLayout(network)
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 5):
        payloads = special_payloads(layout, n, rng)
        # a few rows with g = +-0, tiny g (products underflow, to -0 where g < 0), NaN and inf g
        for _, n_out, _, _, _, g_at in layout.layers:
            rows = payloads[:, g_at:g_at + n_out]
            rows[:, 0] = 0.0
            rows[-1, 1 % n_out] = -0.0
            rows[0, 2 % n_out] = -(2.0 ** -100)
            rows[0, 3 % n_out] = np.nan
            rows[n - 1, 4 % n_out] = np.inf
        per_rank = [reference_gradient(p, layout, rounding) for p in payloads]
        with np.errstate(invalid="ignore"):  # inf + -inf
            expected = functools.reduce(np.add, per_rank)
        got = F.rebuild_reference(payloads, layout, rounding)
        ok = same(got, expected)
        assert ok.all(), (n, int(np.argmin(ok)), got[np.argmin(ok)], expected[np.argmin(ok)])
        # the awkward cases really occur: -0 in the sum, NaN where any rank has one, +0 from -0 + 0
        assert np.isnan(got).any() and (np.isnan(got) == np.isnan(expected)).all()
        if n == 1 and rounding == F.ROUND_FUSED:
            assert ((got == 0) & np.signbit(got)).any()


def test_kernel_rounding_is_known_and_matches_the_network_driver():
    """The probe (kernels.dense_backward alone) must agree with what the whole forward_backward writes:
    with activations scaled to subnormals, products underflow and -0 appears exactly when fused."""
    rounding = F.kernel_rounding()
    assert rounding in (F.ROUND_FUSED, F.ROUND_TWICE)
    network = model.build_network("lenet")
    params = network.init_params(0)
    grads = np.zeros(network.n_params, np.float32)
    image = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32) * np.float32(2.0 ** -146)
    network.forward_backward(params, grads, image, np.array([3], np.int32))
    layout = F.FactorLayout(network)
    w0, n_out, n_in = layout.layers[0][:3]
    dense = grads[w0:w0 + n_out * n_in]
    negative_zeros = int(((dense == 0) & np.signbit(dense)).sum())
    assert (negative_zeros > 0) == (rounding == F.ROUND_FUSED)
    own = F.rebuild_reference(F.pack(grads, network._work, layout)[None], layout, rounding)
    assert same(own, grads).all()


def _samples(count, seed=0):
    try:
        from cnnpar import data

        dataset = data.load_dataset("mnist-5k")
        return dataset.train_images[:count], dataset.train_labels[:count]
    except Exception:
        rng = np.random.default_rng(seed)
        return rng.random((count, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, count).astype(np.int32)


@pytest.mark.parametrize("arch", ["small", "lenet", "conv4k3,relu,pool,dense32,relu,dense10"])
def test_network_factors_rebuild_its_own_gradient(arch):
    network = model.build_network(arch)
    layout = F.FactorLayout(network)
    rounding = F.kernel_rounding()
    params = network.init_params(1)
    images, labels = _samples(12)
    rng = np.random.default_rng(1)
    for i in range(len(labels)):
        image = images[i:i + 1] if i % 2 == 0 else rng.random((1, 1, 28, 28), dtype=np.float32)
        grads = np.zeros(network.n_params, np.float32)
        network.forward_backward(params, grads, image, labels[i:i + 1])
        own = F.rebuild_reference(F.pack(grads, network._work, layout)[None], layout, rounding)
        assert same(own, grads).all(), (arch, i)
        params -= np.float32(0.05) * grads  # later samples on trained weights
    # the trainer's entry point leaves the same factors
    if hasattr(network, "sampled_forward_backward"):
        step = network.sampled_forward_backward(images, labels)
        grads = np.zeros(network.n_params, np.float32)
        step(params, grads, np.arange(len(labels), dtype=np.int64), 5, 6)
        own = F.rebuild_reference(F.pack(grads, network._work, layout)[None], layout, rounding)
        assert same(own, grads).all()


def test_a_rank_without_a_sample_publishes_zero_whatever_its_workspace_holds():
    network = model.build_network("small")
    layout = F.FactorLayout(network)
    params = network.init_params(0)
    images, labels = _samples(2)
    network.forward_backward(params, np.zeros(network.n_params, np.float32), images[:1], labels[:1])
    grads = np.zeros(network.n_params, np.float32)
    network.forward_backward(params, grads, images[:0], labels[:0])  # the epoch's short last step
    own = F.rebuild_reference(F.pack(grads, network._work, layout)[None], layout, F.kernel_rounding())
    assert own.view(np.uint32).max() == 0  # +0 everywhere, like the gradient


def test_applies():
    small = model.build_network("small")
    assert F.applies(small, 1) and F.applies(model.build_network("lenet"), 1)
    assert not F.applies(small, 2)  # two samples: a sum of two outer products
    assert not F.applies(model.build_network("small", dtype=np.float64), 1)
    assert not F.applies(model.build_network("dense10"), 1)  # fed by the image: nothing in the workspace
    assert not F.applies(model.build_network("dense64,relu,dense10"), 1)  # the big layer is not factored
    layout = F.FactorLayout(small)
    assert (layout.payload, layout.factored_floats) == (1370, 11520)


@pytest.mark.parametrize("protocol", ["all", "single"])
@pytest.mark.parametrize("yields", [0, -1])
def test_step_kernel_synchronises_threads(protocol, yields):
    """Three threads play three ranks on one control block and slot array, with their own networks'
    workspaces and random delays: the nogil kernels run truly in parallel, like processes on a window."""
    if yields >= 0 and not P.HAVE_FUTEX:
        pytest.skip("no futex on this platform")
    n, steps = 3, 120
    network = model.build_network("small")
    layout = F.FactorLayout(network)
    rounding = F.kernel_rounding()
    stride = -(-layout.payload // 16) * 16
    rows = 2 * n if protocol == "all" else n
    ctrl = np.zeros(P.N_FIELDS * P.LINE, np.int64)
    slots = np.zeros((rows, stride), np.float32)
    result = np.zeros(layout.n_params, np.float32)
    rng = np.random.default_rng(0)
    payloads = np.stack([special_payloads(layout, n, rng) for _ in range(steps)])
    # each "rank" holds a gradient and a workspace consistent with its payload
    works = [np.zeros(network._work.shape, np.float32) for _ in range(n)]
    delays = rng.random((steps, n)) < 0.05
    outputs = np.zeros((steps, n, layout.n_params), np.float32)
    errors = []

    def rank_main(r):
        try:
            for s in range(steps):
                if delays[s, r]:
                    time.sleep(0.001)
                grads = reference_gradient(payloads[s, r], layout, rounding)
                for _, _, n_in, x_work, x_at, _ in layout.layers:
                    works[r][x_work:x_work + n_in] = payloads[s, r, x_at:x_at + n_in]
                phase = P.PH_START
                while phase != P.PH_FINISHED:
                    code = F._factored_step(ctrl, slots, result, grads, works[r], layout.segs, layout.layers, r, n,
                                            s + 1, phase, 2000 if r == 0 else 0, yields, F.PROTOCOLS[protocol],
                                            5_000_000, rounding)
                    phase = code & 7
                outputs[s, r] = grads
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a thread is stuck: lost wake-up or ordering bug"
    for s in range(steps):
        with np.errstate(invalid="ignore"):  # inf + -inf
            expected = functools.reduce(np.add, [reference_gradient(p, layout, rounding) for p in payloads[s]])
        for r in range(n):
            assert same(outputs[s, r], expected).all(), (s, r)


def test_verify_catches_a_stale_workspace():
    """On its first steps the exchange checks that this rank's factors rebuild its own gradient."""
    from types import SimpleNamespace

    from mpi4py import MPI

    network = model.build_network("small")
    params = network.init_params(0)
    images, labels = _samples(2)
    exchange = F.FactoredShmAllreduce(SimpleNamespace(yield_when_waiting=False), network, comm=MPI.COMM_SELF,
                                      verify_steps=2)
    try:
        grads = np.zeros(network.n_params, np.float32)
        network.forward_backward(params, grads, images[:1], labels[:1])
        expected = grads.copy()
        assert exchange.reduce(grads) >= 0 and same(grads, expected).all()  # one rank: its own gradient
        grads = np.zeros(network.n_params, np.float32)
        network.forward_backward(params, grads, images[1:2], labels[1:2])
        network.evaluate(params, images[:1], labels[:1])  # overwrites the activations: the factors are stale
        with pytest.raises(RuntimeError, match="do not rebuild"):
            exchange.reduce(grads)
    finally:
        exchange.close()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mpi_factored_sums_bitwise_like_the_flat_exchange(n):
    steps = 12
    proc = run_mpi(n, [DRIVER, "--steps", str(steps)], timeout=150)
    assert proc.returncode == 0, f"driver failed at n={n}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert summary.get("done") and summary["ranks"] == n, proc.stdout[-2000:]
    results = {(r["arch"], r["exchange"]): r for r in lines[:-1]}
    expected = {"auto", "factored"}
    if n > 1:
        waits = ("spin", "yield-block", "block") if n <= 2 else ("spin", "yield-block")
        expected |= {f"factored-{p}-{w}" for p in ("all", "single") for w in waits}
    for arch in ("small", "lenet"):
        assert expected <= {name for a, name in results if a == arch}, arch
    for key, result in results.items():
        # the driver raises on the first step that is not bitwise equal, so these only confirm it ran
        assert result["bitwise_steps"] == steps, key
        assert result["nan_steps"] >= 1, key  # the NaN step gave NaN, not a number
    oversubscribed = summary["oversubscribed"]
    for arch in ("small", "lenet"):
        auto = results[(arch, "auto")]
        if n == 1:
            assert auto["class"] == "MpiAllreduce"
        else:
            assert auto["class"] == "FactoredShmAllreduce"
            assert auto["protocol"] == ("single" if oversubscribed else "all")
            assert auto["policy"] == ("yield-block" if oversubscribed else "spin")
    if n > 1:
        assert summary["auto_k2"] == summary["auto_no_network"] == "ShmAllreduce"
        assert summary["factored_k2_exit"] == 2
