"""The whole network (flat gradient vs finite differences and vs the NumPy reference, batched vs
single samples), the parameter layout and init, the layer grammar, SGD, and training on real data."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from cnnpar.errors import UserError
from cnnpar.model import ARCH_HELP, ARCHS, ParamSpec, build_network, parse_arch
from cnnpar.optim import SGD

ARCH_NAMES = ["small", "lenet"]


def _batch(network, k, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    images = rng.random((k,) + network.input_shape).astype(dtype)
    labels = rng.integers(0, network.n_classes, k).astype(np.int32)
    return images, labels


def _reference_grads(network, params, images, labels):
    """Sum over samples of the reference's loss and flat gradient (float64)."""
    views = {name: np.asarray(v, np.float64) for name, v in network.views(params).items()}
    for layer in network.layers:
        if layer.kind == "conv":
            views[layer.name + ".pad"] = layer.pad
    layers = [(layer.kind, layer.name) for layer in network.layers]
    flat = np.zeros(network.n_params)
    flat_views = network.views(flat)
    loss_sum, correct = 0.0, 0
    for image, label in zip(images, labels):
        loss, predicted, grads = ref.network_loss_and_grads(layers, views, image, int(label))
        loss_sum += loss
        correct += predicted == label
        for name, grad in grads.items():
            flat_views[name] += grad
    return loss_sum, correct, flat


# ------------------------------------------------------------------------------- whole network

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_network_gradient_matches_reference_float32(arch):
    network = build_network(arch)
    params = network.init_params(1)
    images, labels = _batch(network, 3, seed=2)
    grads = np.zeros_like(params)
    loss, correct = network.forward_backward(params, grads, images, labels)
    want_loss, want_correct, want = _reference_grads(network, params, images, labels)
    assert abs(loss - want_loss) < 1e-5 * max(1.0, want_loss)
    assert correct == want_correct
    # float32 sums of up to 576 products: compare against the gradient's own scale
    assert np.abs(grads - want).max() < 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_network_gradient_matches_finite_differences_float64(arch):
    network = build_network(arch, dtype=np.float64)
    params = network.init_params(3)
    params += np.random.default_rng(4).normal(0, 0.01, params.shape)   # nonzero biases too
    images, labels = _batch(network, 2, seed=5, dtype=np.float64)
    grads = np.zeros_like(params)
    network.forward_backward(params, grads, images, labels)
    rng = np.random.default_rng(6)
    picks = []
    for spec in network.layout:   # a few entries of every weight and bias
        picks.extend(spec.offset + rng.choice(spec.size, min(spec.size, 6), replace=False))
    eps = 1e-6
    numeric = []
    for i in picks:
        keep = params[i]
        params[i] = keep + eps
        up = network.evaluate(params, images, labels)[0]
        params[i] = keep - eps
        down = network.evaluate(params, images, labels)[0]
        params[i] = keep
        numeric.append((up - down) / (2 * eps))
    numeric, analytic = np.array(numeric), grads[picks]
    assert np.linalg.norm(numeric - analytic) / np.linalg.norm(numeric) < 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_batched_equals_sum_of_single_samples(arch):
    network = build_network(arch)
    params = network.init_params(7)
    images, labels = _batch(network, 4, seed=8)
    batched = np.zeros_like(params)
    loss, correct = network.forward_backward(params, batched, images, labels)
    singles = np.zeros_like(params)
    loss_sum, correct_sum = 0.0, 0
    for s in range(4):
        one = np.zeros_like(params)  # as a rank with one sample computes it
        one_loss, one_correct = network.forward_backward(params, one, images[s:s + 1], labels[s:s + 1])
        singles += one               # as an exchange adds the ranks' gradients, in rank order
        loss_sum += one_loss
        correct_sum += one_correct
    assert np.array_equal(batched, singles)   # the same bits, not just the same sum up to rounding
    assert loss == pytest.approx(loss_sum, rel=1e-12) and correct == correct_sum


def test_forward_backward_adds_into_grads_and_empty_batch_is_a_no_op():
    network = build_network("small")
    params = network.init_params(0)
    images, labels = _batch(network, 2)
    once = np.zeros_like(params)
    network.forward_backward(params, once, images, labels)
    twice = np.zeros_like(params)
    network.forward_backward(params, twice, images, labels)
    network.forward_backward(params, twice, images, labels)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6, atol=1e-12)
    before = twice.copy()
    assert network.forward_backward(params, twice, images[:0], labels[:0]) == (0.0, 0)
    assert np.array_equal(twice, before)


def test_evaluate_matches_forward_backward_and_gives_predictions():
    network = build_network("lenet")
    params = network.init_params(9)
    images, labels = _batch(network, 5, seed=10)
    loss, correct = network.forward_backward(params, np.zeros_like(params), images, labels)
    predictions = np.full(5, -1, np.int32)
    eval_loss, eval_correct = network.evaluate(params, images, labels, predictions)
    assert eval_loss == loss and eval_correct == correct
    assert np.all((predictions >= 0) & (predictions < 10))
    assert int((predictions == labels).sum()) == correct
    assert network.evaluate(params, images, labels) == (eval_loss, eval_correct)


def test_bad_labels_and_shapes_are_refused():
    network = build_network("small")
    params = network.init_params(0)
    images, labels = _batch(network, 2)
    with pytest.raises(ValueError):
        network.forward_backward(params, np.zeros_like(params), images, np.array([0, 10], np.int32))
    with pytest.raises(ValueError):
        network.evaluate(params, images[:, :, :27], labels)
    with pytest.raises(ValueError):
        network.evaluate(params, images, labels[:1])


def test_user_stack_with_odd_pool_and_padding_matches_reference():
    network = build_network("conv3k4p1,relu,pool,conv2k3,pool,dense7,relu,dense5", (2, 11, 9), 5)
    # 11x9 -> conv k4 p1 -> 10x8 -> pool 5x4 -> conv k3 -> 3x2 -> pool (floor) 1x1 -> dense
    assert [layer.out_shape for layer in network.layers][:5] == [(3, 10, 8), (3, 10, 8), (3, 5, 4), (2, 3, 2),
                                                                  (2, 1, 1)]
    params = network.init_params(11)
    images, labels = _batch(network, 2, seed=12)
    grads = np.zeros_like(params)
    loss, _ = network.forward_backward(params, grads, images, labels)
    want_loss, _, want = _reference_grads(network, params, images, labels)
    assert abs(loss - want_loss) < 1e-5 * max(1.0, want_loss)
    assert np.abs(grads - want).max() < 1e-5 * max(1.0, np.abs(want).max())


# -------------------------------------------------------------------------------- layout, init

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layout_views_tile_the_flat_buffer(arch):
    network = build_network(arch)
    assert all(isinstance(spec, ParamSpec) for spec in network.layout)
    names = [spec.name for spec in network.layout]
    assert len(set(names)) == len(names)
    offset = 0
    for spec in network.layout:   # in order, no gap, no overlap
        assert spec.offset == offset and spec.size == int(np.prod(spec.shape))
        offset += spec.size
    assert offset == network.n_params
    flat = np.zeros(network.n_params, np.float32)
    views = network.views(flat)
    for i, (name, view) in enumerate(views.items()):
        assert np.shares_memory(view, flat) and view.shape == network.layout[i].shape
        view[...] = i + 1
    assert np.all(flat > 0)   # every entry belongs to exactly one view (each written once, none left 0)
    counts = np.bincount(flat.astype(np.int64))[1:]
    assert counts.tolist() == [spec.size for spec in network.layout]


def test_small_layout_is_as_documented():
    network = build_network("small")
    assert [(spec.name, spec.shape) for spec in network.layout] == [
        ("conv1.weight", (8, 1, 5, 5)), ("conv1.bias", (8,)), ("dense1.weight", (10, 1152)), ("dense1.bias", (10,))]
    assert network.n_params == 200 + 8 + 11520 + 10
    assert network.flops_per_sample()["forward"] == 2 * (8 * 24 * 24 * 25 + 11520)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_init_is_seeded_identical_across_builds_and_scaled(arch):
    a = build_network(arch).init_params(42)
    b = build_network(arch).init_params(42)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, build_network(arch).init_params(43))
    network = build_network(arch)
    views = network.views(a)
    for spec in network.layout:
        if spec.name.endswith(".bias"):
            assert np.all(views[spec.name] == 0)
    conv = views["conv1.weight"]
    fan_in = int(np.prod(conv.shape[1:]))
    assert conv.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.35)   # He


# ------------------------------------------------------------------------------------- grammar

def test_named_archs_and_help():
    assert set(ARCHS) >= {"small", "lenet"}
    for name in ARCHS:
        assert name in ARCH_HELP
    assert build_network("small").grammar == "conv8k5,relu,pool,dense10"
    assert build_network("LeNet").n_params == 61706   # PyTorch's LeNet-5 on 28x28 with pad 2
    assert build_network("small", n_classes=3).layout[-1].shape == (3,)
    assert parse_arch(" conv8K5P0 , relu,pool, dense10") == [("conv", 8, 5, 0), ("relu", 0, 0, 0),
                                                             ("pool", 0, 0, 0), ("dense", 10, 0, 0)]


@pytest.mark.parametrize("arch, words", [
    ("conv8k5,relu,pool,dense10,softmax", "'softmax' is not a layer"),
    ("conv8x5,dense10", "'conv8x5' is not a layer"),
    ("", "empty"),
    ("conv8k29,dense10", "leaves 0x0"),
    ("conv4k5,pool,conv4k5,pool,pool,pool,pool,dense10", "needs at least 2x2"),
    ("conv8k5,relu,pool", "must end with dense10"),
    ("conv8k5,dense12", "must end with dense10"),
    ("conv8k5,dense10,relu", "must end with dense10"),
    ("dense20,conv8k5,dense10", "after a dense"),
    ("dense20,pool,dense10", "after a dense"),
    ("conv0k5,dense10", ">= 1"),
])
def test_grammar_errors_name_the_flag_and_the_fix(arch, words):
    with pytest.raises(UserError) as err:
        build_network(arch)
    assert err.value.culprit == "--arch" and words in err.value.message


# ------------------------------------------------------------------------------------------ SGD

def test_sgd_sum_and_mean():
    params = np.array([1.0, 2.0, 3.0], np.float32)
    grads = np.array([0.5, -1.0, 2.0], np.float32)
    plain = params.copy()
    SGD(3, lr=0.1, reduce="sum").step(plain, grads, n_samples=4)
    np.testing.assert_allclose(plain, params - 0.1 * grads, rtol=1e-6)
    mean = params.copy()
    SGD(3, lr=0.1, reduce="mean").step(mean, grads, n_samples=4)
    np.testing.assert_allclose(mean, params - 0.1 * grads / 4, rtol=1e-6)
    overridden = params.copy()
    SGD(3, lr=0.1).step(overridden, grads, 4, lr=1.0)
    np.testing.assert_allclose(overridden, params - grads, rtol=1e-6)
    untouched = params.copy()
    SGD(3, lr=0.1).step(untouched, grads, 0)
    assert np.array_equal(untouched, params)
    cleared, used = params.copy(), grads.copy()
    SGD(3, lr=0.1, reduce="sum").step(cleared, used, 4, zero_grads=True)
    assert np.array_equal(cleared, plain) and np.all(used == 0)


def test_sgd_momentum_against_a_hand_computation():
    opt = SGD(2, lr=0.5, momentum=0.9, reduce="mean")
    params = np.array([1.0, -1.0], np.float32)
    g1 = np.array([2.0, 4.0], np.float32)
    g2 = np.array([-2.0, 0.0], np.float32)
    opt.step(params, g1, 2)   # v = g1 = [2, 4];           p -= 0.5/2 * v -> [0.5, -2.0]
    np.testing.assert_allclose(opt.velocity, [2.0, 4.0])
    np.testing.assert_allclose(params, [0.5, -2.0])
    opt.step(params, g2, 2, zero_grads=True)   # v = 0.9 v + g2 = [-0.2, 3.6]; p -= 0.25 v -> [0.55, -2.9]
    np.testing.assert_allclose(opt.velocity, [-0.2, 3.6], rtol=1e-6)
    np.testing.assert_allclose(params, [0.55, -2.9], rtol=1e-6)
    assert np.all(g2 == 0)
    assert opt.velocity.dtype == np.float32


def test_sgd_refuses_bad_settings():
    for kwargs in ({"lr": 0.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "reduce": "max"}):
        with pytest.raises(ValueError):
            SGD(3, **kwargs)
    with pytest.raises(ValueError):
        SGD(3, lr=0.1).step(np.zeros(4, np.float32), np.zeros(4, np.float32), 1)


# ------------------------------------------------------------------------------- real training

def test_a_few_hundred_sgd_steps_lower_the_training_loss_on_real_data():
    from cnnpar.data import load_dataset

    data = load_dataset("mnist-5k")
    network = build_network("small", data.train_images.shape[1:], data.n_classes)
    params = network.init_params(0)
    grads = np.zeros_like(params)
    optimizer = SGD(network.n_params, lr=0.01)
    probe_images, probe_labels = data.train_images[:500], data.train_labels[:500]
    loss_before, _ = network.evaluate(params, probe_images, probe_labels)
    order = np.random.default_rng(0).permutation(len(data.train_labels))
    for step in range(300):   # 300 steps of 4 samples: 1200 samples
        batch = order[4 * step:4 * step + 4]
        grads.fill(0)
        network.forward_backward(params, grads, data.train_images[batch], data.train_labels[batch])
        optimizer.step(params, grads, 4)
    loss_after, correct = network.evaluate(params, probe_images, probe_labels)
    assert loss_after < 0.5 * loss_before
    assert correct > 0.7 * 500
