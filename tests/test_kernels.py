"""Each layer kernel against the NumPy reference (float32) and its backward against central finite
differences (float64). Shapes cover padding, several input channels, odd pool sizes, and the K=5 /
K=3 specialised conv loops as well as the generic one (K=4, K=1)."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from cnnpar import kernels as K

# (C, F, H, W, K, P)
CONV_SHAPES = [(1, 8, 12, 12, 5, 0), (3, 4, 9, 7, 3, 1), (2, 3, 8, 8, 5, 2), (2, 2, 6, 5, 4, 0), (2, 3, 5, 6, 1, 0),
               (1, 2, 4, 4, 3, 2)]
F32_TOL = 1e-5
FD_TOL = 1e-6
EPS = 1e-6


def _rng(*key):
    return np.random.default_rng(list(key))


def _rel_err(a, b):
    a, b = np.ravel(a), np.ravel(b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)
    return np.linalg.norm(a - b) / scale


def _fd(loss, array, indices=None):
    """Central differences of loss() w.r.t. each (or each listed) entry of array, perturbed in place."""
    flat = array.reshape(-1)
    indices = range(flat.size) if indices is None else indices
    grad = np.zeros(flat.size)
    for i in indices:
        keep = flat[i]
        flat[i] = keep + EPS
        up = loss()
        flat[i] = keep - EPS
        down = loss()
        flat[i] = keep
        grad[i] = (up - down) / (2 * EPS)
    return grad.reshape(array.shape)


# ------------------------------------------------------------------------------------------ conv

def _conv_buffers(C, F, H, W, Kk, P, dtype):
    OH, OW = H + 2 * P - Kk + 1, W + 2 * P - Kk + 1
    return (np.full((F, OH, OW), np.nan, dtype), np.full((C, H + 2 * P, W + 2 * P), np.nan, dtype),
            np.full(K.conv2d_scratch_size(C, H, W, F, Kk, P), np.nan, dtype))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_conv_matches_reference_float32(shape):
    C, F, H, W, Kk, P = shape
    rng = _rng(1, *shape)
    x = rng.standard_normal((C, H, W)).astype(np.float32)
    weight = rng.standard_normal((F, C, Kk, Kk)).astype(np.float32)
    bias = rng.standard_normal(F).astype(np.float32)
    out, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, np.float32)
    K.conv2d_forward(out, xpad, scratch, x, weight, bias, P)
    assert np.abs(out - ref.conv_forward(x, weight, bias, P)).max() < F32_TOL * max(1, np.abs(out).max())

    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = np.full(x.shape, np.nan, np.float32)           # overwritten
    dweight = np.ones_like(weight)                        # accumulated into
    dbias = np.ones_like(bias)
    K.conv2d_backward(dx, dweight, dbias, scratch, dout, xpad, weight, P, True)
    want_dx, want_dw, want_db = ref.conv_backward(dout, x, weight, P)
    assert np.abs(dx - want_dx).max() < F32_TOL * max(1, np.abs(want_dx).max())
    assert np.abs(dweight - 1 - want_dw).max() < F32_TOL * max(1, np.abs(want_dw).max())
    assert np.abs(dbias - 1 - want_db).max() < F32_TOL * max(1, np.abs(want_db).max())


def test_conv_backward_without_dx_leaves_it_and_still_accumulates():
    C, F, H, W, Kk, P = 2, 3, 8, 8, 5, 2
    rng = _rng(2)
    x, weight, bias = rng.random((C, H, W)), rng.random((F, C, Kk, Kk)), rng.random(F)
    out, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, np.float64)
    K.conv2d_forward(out, xpad, scratch, x, weight, bias, P)
    dout = rng.random(out.shape)
    dx = np.full(x.shape, 7.0)
    dweight, dbias = np.zeros_like(weight), np.zeros_like(bias)
    for _ in range(2):
        K.conv2d_backward(dx, dweight, dbias, scratch, dout, xpad, weight, P, False)
    _, want_dw, want_db = ref.conv_backward(dout, x, weight, P)
    assert np.all(dx == 7.0)
    np.testing.assert_allclose(dweight, 2 * want_dw, rtol=1e-12)
    np.testing.assert_allclose(dbias, 2 * want_db, rtol=1e-12)


@pytest.mark.parametrize("shape", CONV_SHAPES[1:4], ids=str)
def test_conv_backward_matches_finite_differences(shape):
    C, F, H, W, Kk, P = shape
    rng = _rng(3, *shape)
    x, weight, bias = rng.standard_normal((C, H, W)), rng.standard_normal((F, C, Kk, Kk)), rng.standard_normal(F)
    out, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, np.float64)
    probe = rng.standard_normal(out.shape)   # loss = sum(out * probe), so dL/dout = probe

    def loss():
        K.conv2d_forward(out, xpad, scratch, x, weight, bias, P)
        return float((out * probe).sum())

    loss()
    dx, dweight, dbias = np.empty_like(x), np.zeros_like(weight), np.zeros_like(bias)
    K.conv2d_backward(dx, dweight, dbias, scratch, probe, xpad, weight, P, True)
    assert _rel_err(dx, _fd(loss, x)) < FD_TOL
    assert _rel_err(dweight, _fd(loss, weight)) < FD_TOL
    assert _rel_err(dbias, _fd(loss, bias)) < FD_TOL


# ------------------------------------------------------------------------------------------ relu

def test_relu_matches_reference_and_finite_differences():
    rng = _rng(4)
    x32 = rng.standard_normal((3, 5, 4)).astype(np.float32)
    out = np.empty_like(x32)
    K.relu_forward(out, x32)
    assert np.array_equal(out, ref.relu_forward(x32).astype(np.float32))
    dout = rng.standard_normal(x32.shape).astype(np.float32)
    dx = np.full_like(x32, np.nan)
    K.relu_backward(dx, dout, out)
    assert np.abs(dx - ref.relu_backward(dout, x32)).max() < F32_TOL

    x = rng.standard_normal(40)
    x[np.abs(x) < 1e-3] = 0.5                       # keep clear of the kink
    y = np.empty_like(x)
    probe = rng.standard_normal(40)

    def loss():
        K.relu_forward(y, x)
        return float((y * probe).sum())

    loss()
    dx64 = np.empty_like(x)
    K.relu_backward(dx64, probe, y)
    assert _rel_err(dx64, _fd(loss, x)) < FD_TOL


def test_relu_lets_nan_through():
    x = np.array([np.nan, -1.0, 2.0], np.float32)
    out = np.empty_like(x)
    K.relu_forward(out, x)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 2


# --------------------------------------------------------------------------------------- maxpool

@pytest.mark.parametrize("shape", [(2, 6, 8), (3, 7, 5), (1, 2, 2)], ids=str)
def test_maxpool_matches_reference(shape):
    C, H, W = shape
    x = _rng(5, *shape).standard_normal(shape).astype(np.float32)
    out = np.empty((C, H // 2, W // 2), np.float32)
    argmax = np.empty(out.shape, np.int32)
    K.maxpool2_forward(out, argmax, x)
    want, winner = ref.pool_forward(x)
    assert np.array_equal(out, want.astype(np.float32))
    assert np.array_equal(argmax, ref.pool_argmax_flat(winner, shape))
    dout = _rng(6).standard_normal(out.shape).astype(np.float32)
    dx = np.full(shape, np.nan, np.float32)
    K.maxpool2_backward(dx, dout, argmax)
    assert np.abs(dx - ref.pool_backward(dout, winner, shape)).max() < F32_TOL


def test_maxpool_ties_go_to_the_first_position():
    x = np.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [2.0, 2.0]]], np.float32)
    out = np.empty((2, 1, 1), np.float32)
    argmax = np.empty((2, 1, 1), np.int32)
    K.maxpool2_forward(out, argmax, x)
    assert argmax.ravel().tolist() == [0, 5]


def test_maxpool_backward_matches_finite_differences():
    shape = (2, 5, 6)
    # distinct values, far apart compared to EPS, so no window changes its winner
    x = _rng(7).permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.01
    out = np.empty((2, 2, 3))
    argmax = np.empty(out.shape, np.int32)
    probe = _rng(8).standard_normal(out.shape)

    def loss():
        K.maxpool2_forward(out, argmax, x)
        return float((out * probe).sum())

    loss()
    dx = np.empty_like(x)
    K.maxpool2_backward(dx, probe, argmax)
    assert _rel_err(dx, _fd(loss, x)) < FD_TOL


# ----------------------------------------------------------------------------------------- dense

@pytest.mark.parametrize("n_in, n_out", [(37, 5), (1152, 10), (3, 1)])
def test_dense_matches_reference_float32(n_in, n_out):
    rng = _rng(9, n_in, n_out)
    x = rng.standard_normal(n_in).astype(np.float32)
    weight = rng.standard_normal((n_out, n_in)).astype(np.float32) / np.sqrt(n_in)
    bias = rng.standard_normal(n_out).astype(np.float32)
    out = np.empty(n_out, np.float32)
    K.dense_forward(out, x, weight, bias)
    assert np.abs(out - ref.dense_forward(x, weight, bias)).max() < F32_TOL
    dout = rng.standard_normal(n_out).astype(np.float32)
    dx = np.full(n_in, np.nan, np.float32)
    dweight, dbias = np.ones_like(weight), np.ones_like(bias)
    K.dense_backward(dx, dweight, dbias, dout, x, weight, True)
    want_dx, want_dw, want_db = ref.dense_backward(dout, x, weight)
    assert np.abs(dx - want_dx).max() < F32_TOL
    assert np.abs(dweight - 1 - want_dw).max() < F32_TOL
    assert np.abs(dbias - 1 - want_db).max() < F32_TOL


def test_dense_backward_matches_finite_differences():
    rng = _rng(10)
    x, weight, bias = rng.standard_normal(13), rng.standard_normal((4, 13)), rng.standard_normal(4)
    out = np.empty(4)
    probe = rng.standard_normal(4)

    def loss():
        K.dense_forward(out, x, weight, bias)
        return float((out * probe).sum())

    dx, dweight, dbias = np.empty(13), np.zeros_like(weight), np.zeros_like(bias)
    K.dense_backward(dx, dweight, dbias, probe, x, weight, True)
    assert _rel_err(dx, _fd(loss, x)) < FD_TOL
    assert _rel_err(dweight, _fd(loss, weight)) < FD_TOL
    assert _rel_err(dbias, _fd(loss, bias)) < FD_TOL


# --------------------------------------------------------------------------- softmax x-entropy

def test_softmax_xent_matches_reference_and_finite_differences():
    rng = _rng(11)
    logits32 = (rng.standard_normal(10) * 5).astype(np.float32)
    probs = np.empty(10, np.float32)
    loss32 = K.softmax_xent_forward(probs, logits32, 3)
    want_loss, want_probs = ref.softmax_xent_forward(logits32, 3)
    assert abs(loss32 - want_loss) < F32_TOL and np.abs(probs - want_probs).max() < F32_TOL
    dlogits = np.empty(10, np.float32)
    K.softmax_xent_backward(dlogits, probs, 3)
    assert np.abs(dlogits - ref.softmax_xent_backward(want_probs, 3)).max() < F32_TOL

    logits = rng.standard_normal(7) * 3
    p64 = np.empty(7)
    d64 = np.empty(7)
    K.softmax_xent_forward(p64, logits, 6)
    K.softmax_xent_backward(d64, p64, 6)
    assert _rel_err(d64, _fd(lambda: K.softmax_xent_forward(p64, logits, 6), logits)) < FD_TOL


def test_softmax_xent_is_stable_for_large_logits():
    probs = np.empty(3, np.float32)
    loss = K.softmax_xent_forward(probs, np.array([1000.0, 0.0, -1000.0], np.float32), 1)
    assert np.isfinite(loss) and abs(loss - 1000.0) < 1e-3 and abs(probs.sum() - 1) < 1e-6


# ------------------------------------------------------------------- conv + pool + relu, fused

# (C, F, H, W, K, P): odd conv outputs (a dropped last row/column), several channels, K=5 / 3 / 4
FUSED_SHAPES = [(1, 8, 12, 12, 5, 0), (2, 3, 9, 8, 3, 1), (3, 2, 7, 7, 4, 1), (2, 5, 10, 9, 5, 2)]


def _unfused(x, weight, bias, P, dpooled):
    """The three kernels in turn, as the table ran them before the fusion."""
    C, H, W = x.shape
    F, Kk = weight.shape[0], weight.shape[2]
    out, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, x.dtype)
    K.conv2d_forward(out, xpad, scratch, x, weight, bias, P)
    pooled = np.empty((F, out.shape[1] // 2, out.shape[2] // 2), x.dtype)
    argmax = np.empty(pooled.shape, np.int32)
    K.maxpool2_forward(pooled, argmax, out)
    relu = np.empty_like(pooled)
    K.relu_forward(relu, pooled)
    dpool = np.empty_like(pooled)
    K.relu_backward(dpool, dpooled, relu)
    dplane = np.empty_like(out)
    K.maxpool2_backward(dplane, dpool, argmax)
    dx, dweight, dbias = np.full(x.shape, np.nan, x.dtype), np.ones_like(weight), np.ones_like(bias)
    K.conv2d_backward(dx, dweight, dbias, scratch, dplane, xpad, weight, P, True)
    return relu, argmax, dplane, dx, dweight, dbias


def _fused(x, weight, bias, P, dpooled):
    C, H, W = x.shape
    F, Kk = weight.shape[0], weight.shape[2]
    plane, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, x.dtype)
    pooled = np.full((F, plane.shape[1] // 2, plane.shape[2] // 2), np.nan, x.dtype)
    argmax = np.full(pooled.shape, -1, np.int32)
    K.conv_pool_relu_forward(pooled, argmax, plane, xpad, scratch, x, weight, bias, P)
    dx, dweight, dbias = np.full(x.shape, np.nan, x.dtype), np.ones_like(weight), np.ones_like(bias)
    K.conv_pool_relu_backward(dx, dweight, dbias, scratch, plane, dpooled, pooled, argmax, xpad, weight, P, True)
    return pooled, argmax, plane, dx, dweight, dbias


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_conv_pool_relu_equals_the_three_kernels_bit_for_bit(shape):
    C, F, H, W, Kk, P = shape
    rng = _rng(12, *shape)
    x = rng.standard_normal((C, H, W)).astype(np.float32)
    weight = rng.standard_normal((F, C, Kk, Kk)).astype(np.float32)
    bias = rng.standard_normal(F).astype(np.float32)
    OH, OW = H + 2 * P - Kk + 1, W + 2 * P - Kk + 1
    dpooled = rng.standard_normal((F, OH // 2, OW // 2)).astype(np.float32)
    for want, got in zip(_unfused(x, weight, bias, P, dpooled), _fused(x, weight, bias, P, dpooled)):
        assert want.dtype == got.dtype and np.array_equal(want.view(np.uint8), got.view(np.uint8))


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_conv_pool_relu_matches_reference_float32(shape):
    C, F, H, W, Kk, P = shape
    rng = _rng(13, *shape)
    x = rng.standard_normal((C, H, W)).astype(np.float32)
    weight = rng.standard_normal((F, C, Kk, Kk)).astype(np.float32)
    bias = rng.standard_normal(F).astype(np.float32)
    conv = ref.conv_forward(x, weight, bias, P)
    pooled_ref, winner = ref.pool_forward(conv)
    dpooled = rng.standard_normal(pooled_ref.shape).astype(np.float32)
    pooled, argmax, _, dx, dweight, dbias = _fused(x, weight, bias, P, dpooled)
    assert np.abs(pooled - ref.relu_forward(pooled_ref)).max() < F32_TOL * max(1, np.abs(pooled).max())
    assert np.array_equal(argmax, ref.pool_argmax_flat(winner, conv.shape))
    dplane = ref.pool_backward(ref.relu_backward(dpooled, pooled_ref), winner, conv.shape)
    want_dx, want_dw, want_db = ref.conv_backward(dplane, x, weight, P)
    assert np.abs(dx - want_dx).max() < F32_TOL * max(1, np.abs(want_dx).max())
    assert np.abs(dweight - 1 - want_dw).max() < F32_TOL * max(1, np.abs(want_dw).max())
    assert np.abs(dbias - 1 - want_db).max() < F32_TOL * max(1, np.abs(want_db).max())


@pytest.mark.parametrize("shape", FUSED_SHAPES[1:3], ids=str)
def test_fused_conv_pool_relu_backward_matches_finite_differences(shape):
    C, F, H, W, Kk, P = shape
    rng = _rng(14, *shape)
    x, weight, bias = rng.standard_normal((C, H, W)), rng.standard_normal((F, C, Kk, Kk)), rng.standard_normal(F)
    plane, xpad, scratch = _conv_buffers(C, F, H, W, Kk, P, np.float64)
    pooled = np.empty((F, plane.shape[1] // 2, plane.shape[2] // 2))
    argmax = np.empty(pooled.shape, np.int32)
    probe = rng.standard_normal(pooled.shape)   # loss = sum(pooled * probe)

    def loss():
        K.conv_pool_relu_forward(pooled, argmax, plane, xpad, scratch, x, weight, bias, P)
        return float((pooled * probe).sum())

    loss()
    # keep clear of the kinks: no pooled value near 0, no window with a near tie
    conv = ref.conv_forward(x, weight, bias, P)[:, :2 * pooled.shape[1], :2 * pooled.shape[2]]
    windows = np.sort(conv.reshape(F, pooled.shape[1], 2, pooled.shape[2], 2).transpose(0, 1, 3, 2, 4)
                      .reshape(F, pooled.shape[1], pooled.shape[2], 4), axis=-1)
    assert np.abs(windows[..., 3]).min() > 1e-4 and (windows[..., 3] - windows[..., 2]).min() > 1e-4
    kept_argmax = argmax.copy()
    dx, dweight, dbias = np.empty_like(x), np.zeros_like(weight), np.zeros_like(bias)
    K.conv_pool_relu_backward(dx, dweight, dbias, scratch, plane, probe, pooled, kept_argmax, xpad, weight, P,
                              True)
    assert _rel_err(dx, _fd(loss, x)) < FD_TOL
    assert _rel_err(dweight, _fd(loss, weight)) < FD_TOL
    assert _rel_err(dbias, _fd(loss, bias)) < FD_TOL
