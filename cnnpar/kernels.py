"""numba kernels: the CNN's layers, and one-call-per-step drivers over a whole layer stack.

Shape legend (one sample; there is no batch axis inside a layer kernel):

    C, H, W     input channels, height, width of a layer's input
    F           output channels of a conv / output features of a dense layer
    K           conv kernel size (square); P zero padding on every side; stride is 1
    OH, OW      conv output size: OH = H + 2P - K + 1, OW = W + 2P - K + 1
    PH, PW      max-pool output size: PH = H // 2, PW = W // 2 (2x2 window, stride 2; an odd last
                row/column is dropped, as PyTorch's floor mode does)
    N_in        dense input features (the previous activation flattened, C*H*W); N_out = F
    n_classes   logits / probabilities of the softmax cross-entropy

    conv weight (F, C, K, K), bias (F,)        dense weight (N_out, N_in), bias (N_out,)

Conventions shared by every kernel:
- Output buffers come first in the argument list; no kernel allocates.
- Backward kernels ADD (+=) into parameter-gradient buffers, so several samples accumulate; the
  caller zeroes them once per step. Input-gradient buffers (dx) are overwritten.
- Kernels are dtype-generic: numba specialises them per dtype (float32 to train, float64 for
  finite-difference tests). Floats follow the dtype of the arrays; accumulators start from a zero of
  that dtype so float32 stays float32.
- fastmath is limited to reassociation/contraction (vectorised reductions, FMAs). No 'nnan'/'ninf':
  the trainer detects divergence by NaN losses, so NaN must propagate.

`network_train_steps` goes further for a rank with no exchange: many whole steps (sampling, forward,
backward, SGD, the step's statistics) in one call. The drivers `network_forward_backward` /
`network_evaluate` run a whole step in ONE call from Python
(a Python->numba call costs about a microsecond, a step about forty). The layer stack is encoded as an
int64 table, one row per layer (columns T_*), built by cnnpar.model; activations, deltas and the
pool argmaxes live in flat workspaces at offsets the table gives. The drivers live in this file on
purpose: numba's cache only notices edits to the file that holds the cached function, so a driver
calling kernels from another module could load stale machine code after a kernel edit.
"""

from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"reassoc", "contract", "nsz"}

# Table layout: op codes and column indices (numba treats these module globals as constants).
OP_CONV = 1
OP_RELU = 2
OP_POOL = 3
OP_DENSE = 4

T_OP = 0
T_C = 1        # input channels (dense: 1)
T_H = 2        # input height (dense: 1)
T_W = 3        # input width (dense: N_in)
T_F = 4        # output channels / features
T_OH = 5
T_OW = 6
T_K = 7
T_P = 8
T_IN = 9       # offset of the layer's input in the activation workspace; -1: the input image
T_OUT = 10     # offset of the layer's output in the activation workspace
T_WEIGHT = 11  # offset of the weight in the flat params/grads; -1: none
T_BIAS = 12
T_DIN = 13     # offset of d(loss)/d(input) in the delta workspace; -1: not wanted (first layer)
T_DOUT = 14    # offset of d(loss)/d(output) in the delta workspace
T_ARGMAX = 15  # offset in the int workspace (pool only)
T_XPAD = 16    # conv only: offset of its padded input (C, H+2P, W+2P) in the activation workspace
T_SCRATCH = 17  # conv only: offset of the scratch all convs share (conv2d_scratch_size long)
T_FUSED = 18    # FUSED_CONV: a conv that runs the pool and relu after it (the next two rows) in its own
                # pass; FUSED_DONE: one of those two rows (nothing left to do); 0: runs on its own
T_FUSED_OUT = 19     # FUSED_CONV: the relu row's output offset (the pooled, rectified activation)
T_FUSED_ARGMAX = 20  # FUSED_CONV: the pool row's argmax offset
T_FUSED_DOUT = 21    # FUSED_CONV: the relu row's d(loss)/d(output) offset
T_COLUMNS = 22

FUSED_CONV = 1
FUSED_DONE = 2


# --------------------------------------------------------------------------------------------- conv
#
# The conv works on the zero-padded input xpad (C, Hp, Wp), Hp = H + 2P, Wp = W + 2P, read as one
# flat row per channel. Output position (oy, ox) then sits at flat index i = oy*Wp + ox of a "wide"
# plane of L = (OH-1)*Wp + OW entries (the Wp-OW entries at the end of each row are junk), and tap
# (ky, kx) reads xpad_flat[c*Hp*Wp + ky*Wp + kx + i]: every tap is ONE contiguous loop of L, which
# vectorises well, where row-by-row loops of OW (24 for small, 10 for lenet's conv2) do not.

@njit(cache=True)
def conv2d_scratch_size(C, H, W, F, K, P):
    """Length of the 1-D scratch buffer conv2d_forward / conv2d_backward need."""
    Hp, Wp = H + 2 * P, W + 2 * P
    OH, OW = Hp - K + 1, Wp - K + 1
    wide = (OH - 1) * Wp + OW
    return 4 * (wide + 2 * (K - 1)) + C * Hp * Wp


@njit(cache=True, fastmath=FASTMATH)
def conv2d_forward(out, xpad, scratch, x, weight, bias, pad):
    """out (F,OH,OW) = conv(x (C,H,W), weight (F,C,K,K)) + bias, stride 1, zero padding `pad`.

    xpad (C,H+2P,W+2P) receives the padded input (the backward reads it); scratch: 1-D,
    conv2d_scratch_size(...) long."""
    _conv_forward(out, out, out, False, xpad, scratch, x, weight, bias, pad)


@njit(cache=True, fastmath=FASTMATH)
def conv_pool_relu_forward(pooled, argmax, plane_shape, xpad, scratch, x, weight, bias, pad):
    """pooled (F,PH,PW) = relu(maxpool2(conv(x) + bias)) in one pass: each filter's output is pooled
    straight from the conv's accumulator, never stored. argmax (F,PH,PW) int32 as maxpool2_forward's
    (flat index into the conv output (F,OH,OW)); plane_shape: any array of shape (F,OH,OW), not touched.
    The same values, bit for bit, as conv2d_forward, maxpool2_forward, relu_forward in turn."""
    _conv_forward(plane_shape, pooled, argmax, True, xpad, scratch, x, weight, bias, pad)


@njit(cache=True, fastmath=FASTMATH)
def _conv_forward(out, pooled, argmax, fused, xpad, scratch, x, weight, bias, pad):
    # out gives the output shape, and receives the output unless fused (then pooled/argmax do)
    F, OH, OW = out.shape
    C, Hp, Wp = xpad.shape
    K = weight.shape[2]
    _pad_input(xpad, x, pad)
    x_flat = xpad.reshape(xpad.size)
    L = (OH - 1) * Wp + OW
    acc = scratch[:L]
    twin_acc = scratch[L:2 * L]
    # K=5 (both named archs): two filters per pass share each input load, and a kernel row's five
    # taps go in one pass so the accumulators are loaded and stored once per five taps. An odd
    # last filter pairs with itself and its twin's result is dropped.
    step = 2 if K == 5 else 1
    for f in range(0, F, step):
        twin = f + 1 if f + 1 < F else f
        b, twin_b = bias[f], bias[twin]
        for i in range(L):
            acc[i] = b
        if K == 5:
            for i in range(L):
                twin_acc[i] = twin_b
        for c in range(C):
            for ky in range(K):
                start = c * Hp * Wp + ky * Wp
                src = x_flat[start:start + L + K - 1]
                w = weight[f, c, ky]
                if K == 5:
                    v = weight[twin, c, ky]
                    w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
                    v0, v1, v2, v3, v4 = v[0], v[1], v[2], v[3], v[4]
                    for i in range(L):
                        s0, s1, s2, s3, s4 = src[i], src[i + 1], src[i + 2], src[i + 3], src[i + 4]
                        acc[i] += w0 * s0 + w1 * s1 + w2 * s2 + w3 * s3 + w4 * s4
                        twin_acc[i] += v0 * s0 + v1 * s1 + v2 * s2 + v3 * s3 + v4 * s4
                elif K == 3:
                    w0, w1, w2 = w[0], w[1], w[2]
                    for i in range(L):
                        acc[i] += w0 * src[i] + w1 * src[i + 1] + w2 * src[i + 2]
                else:
                    for kx in range(K):
                        wk = w[kx]
                        shifted = src[kx:]
                        for i in range(L):
                            acc[i] += wk * shifted[i]
        if fused:
            _pool_relu_wide(pooled[f], argmax[f], acc, Wp, f * OH * OW, OW)
            if K == 5 and twin != f:
                _pool_relu_wide(pooled[twin], argmax[twin], twin_acc, Wp, twin * OH * OW, OW)
        else:
            _unwiden(out[f], acc, Wp)
            if K == 5 and twin != f:
                _unwiden(out[twin], twin_acc, Wp)


@njit(cache=True, fastmath=FASTMATH)
def _pool_relu_wide(pooled, argmax, wide, Wp, plane_at, OW):
    # pooled (PH,PW) = relu(2x2 max of the wide-layout plane); argmax: flat index into (F,OH,OW) of the
    # window's maximum, plane_at being the filter's plane start. Selects in maxpool2_forward's order, so
    # ties and NaN resolve the same way.
    PH, PW = pooled.shape
    zero = pooled.dtype.type(0)
    for py in range(PH):
        top = wide[2 * py * Wp:]
        bottom = wide[(2 * py + 1) * Wp:]
        base = plane_at + 2 * py * OW
        out_row = pooled[py]
        argmax_row = argmax[py]
        for px in range(PW):
            i = 2 * px
            best = top[i]
            where = i
            v = top[i + 1]
            better = v > best
            best = v if better else best
            where = i + 1 if better else where
            v = bottom[i]
            better = v > best
            best = v if better else best
            where = OW + i if better else where
            v = bottom[i + 1]
            better = v > best
            best = v if better else best
            where = OW + i + 1 if better else where
            out_row[px] = best if not (best <= 0) else zero
            argmax_row[px] = base + where


@njit(cache=True, fastmath=FASTMATH)
def _unwiden(plane, wide, Wp):
    # (OH, OW) plane <- the wide layout's rows of stride Wp
    OH, OW = plane.shape
    for oy in range(OH):
        wide_row = wide[oy * Wp:]
        row = plane[oy]
        for ox in range(OW):
            row[ox] = wide_row[ox]


@njit(cache=True, fastmath=FASTMATH)
def _widen(margined, plane, Wp, M):
    # margined[M + oy*Wp + ox] <- plane[oy, ox], and 0 in the junk columns between rows; returns
    # the plane's sum. The M-entry margins stay as they were: zero, as conv2d_backward set them.
    OH, OW = plane.shape
    zero = margined.dtype.type(0)
    total = zero
    for oy in range(OH):
        wide_row = margined[M + oy * Wp:]
        row = plane[oy]
        for ox in range(OW):
            g = row[ox]
            wide_row[ox] = g
            total += g
        if oy < OH - 1:
            for ox in range(OW, Wp):
                wide_row[ox] = zero
    return total


@njit(cache=True, fastmath=FASTMATH)
def _dx_row_k5(dst, margined, w):
    # dst[j] += sum_kx w[kx] * margined[j + 4 - kx]: one kernel row's five taps in one pass
    w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
    for j in range(dst.shape[0]):
        dst[j] += w0 * margined[j + 4] + w1 * margined[j + 3] + w2 * margined[j + 2] + w3 * margined[j + 1] + w4 * margined[j]


@njit(cache=True, fastmath=FASTMATH)
def _pad_input(xpad, x, pad):
    C, H, W = x.shape
    if pad > 0:
        xpad[:] = 0
    for c in range(C):
        for y in range(H):
            dst = xpad[c, y + pad, pad:]
            src = x[c, y]
            for i in range(W):
                dst[i] = src[i]


@njit(cache=True, fastmath=FASTMATH)
def conv2d_backward(dx, dweight, dbias, scratch, dout, xpad, weight, pad, need_dx):
    """dweight += dL/dweight, dbias += dL/dbias; dx (C,H,W) = dL/dx when need_dx (else untouched).

    dout (F,OH,OW) is dL/dout; xpad is the padded input conv2d_forward left; scratch as for forward."""
    F, OH, OW = dout.shape
    C, Hp, Wp = xpad.shape
    K = weight.shape[2]
    zero = scratch.dtype.type(0)
    x_flat = xpad.reshape(xpad.size)
    L = (OH - 1) * Wp + OW
    M = K - 1
    # dout of up to four filters in the wide layout, junk entries 0, M zeros either side
    Lm = L + 2 * M
    margined0 = scratch[:Lm]
    margined1 = scratch[Lm:2 * Lm]
    margined2 = scratch[2 * Lm:3 * Lm]
    margined3 = scratch[3 * Lm:4 * Lm]
    dxpad = scratch[4 * Lm:4 * Lm + C * Hp * Wp]
    # _widen fills a plane's wide layout, junk columns included; only the margins need clearing
    for k in range(4):
        for i in range(M):
            scratch[k * Lm + i] = zero
            scratch[k * Lm + M + L + i] = zero
    if need_dx:
        for i in range(dxpad.shape[0]):
            dxpad[i] = zero
    # K=5 (both named archs) takes four filters per pass over a kernel row: the five shifted src
    # loads, the costly part, then feed twenty accumulators (which still fit in registers) where a
    # pair of filters fed ten. A last partial block repeats its last filter, reading that filter's
    # plane again; the repeats' sums are dropped.
    step = 4 if K == 5 else 1
    last = F - 1
    for f in range(0, F, step):
        f1 = min(f + 1, last) if K == 5 else f
        f2 = min(f + 2, last) if K == 5 else f
        f3 = min(f + 3, last) if K == 5 else f
        dbias[f] += _widen(margined0, dout[f], Wp, M)
        d0 = margined0[M:M + L]
        d1 = d0
        d2 = d0
        d3 = d0
        if f1 != f:
            dbias[f1] += _widen(margined1, dout[f1], Wp, M)
            d1 = margined1[M:M + L]
        if f2 != f1:
            dbias[f2] += _widen(margined2, dout[f2], Wp, M)
            d2 = margined2[M:M + L]
        elif f2 != f:
            d2 = d1
        if f3 != f2:
            dbias[f3] += _widen(margined3, dout[f3], Wp, M)
            d3 = margined3[M:M + L]
        elif f3 != f:
            d3 = d2
        for c in range(C):
            for ky in range(K):
                start = c * Hp * Wp + ky * Wp
                src = x_flat[start:start + L + K - 1]
                if K == 5:
                    # dweight[f, c, ky, kx] += sum_i d[i] * src[i + kx], for the four filters at once
                    a0 = a1 = a2 = a3 = a4 = zero
                    b0 = b1 = b2 = b3 = b4 = zero
                    e0 = e1 = e2 = e3 = e4 = zero
                    h0 = h1 = h2 = h3 = h4 = zero
                    for i in range(L):
                        s0, s1, s2, s3, s4 = src[i], src[i + 1], src[i + 2], src[i + 3], src[i + 4]
                        g = d0[i]
                        a0 += g * s0
                        a1 += g * s1
                        a2 += g * s2
                        a3 += g * s3
                        a4 += g * s4
                        g = d1[i]
                        b0 += g * s0
                        b1 += g * s1
                        b2 += g * s2
                        b3 += g * s3
                        b4 += g * s4
                        g = d2[i]
                        e0 += g * s0
                        e1 += g * s1
                        e2 += g * s2
                        e3 += g * s3
                        e4 += g * s4
                        g = d3[i]
                        h0 += g * s0
                        h1 += g * s1
                        h2 += g * s2
                        h3 += g * s3
                        h4 += g * s4
                    _add5(dweight[f, c, ky], a0, a1, a2, a3, a4)
                    if f1 != f:
                        _add5(dweight[f1, c, ky], b0, b1, b2, b3, b4)
                    if f2 != f1:
                        _add5(dweight[f2, c, ky], e0, e1, e2, e3, e4)
                    if f3 != f2:
                        _add5(dweight[f3, c, ky], h0, h1, h2, h3, h4)
                else:
                    dw = dweight[f, c, ky]
                    for kx in range(K):
                        shifted = src[kx:]
                        a = zero
                        for i in range(L):
                            a += d0[i] * shifted[i]
                        dw[kx] += a
                if need_dx:
                    # dxpad[start + j] += sum_kx w[kx] * d[j - kx]  (= margined[j + M - kx])
                    dst = dxpad[start:start + L + M]
                    if K == 5:
                        _dx_row_k5(dst, margined0, weight[f, c, ky])
                        if f1 != f:
                            _dx_row_k5(dst, margined1, weight[f1, c, ky])
                        if f2 != f1:
                            _dx_row_k5(dst, margined2, weight[f2, c, ky])
                        if f3 != f2:
                            _dx_row_k5(dst, margined3, weight[f3, c, ky])
                    else:
                        w = weight[f, c, ky]
                        for kx in range(K):
                            wk = w[kx]
                            shifted = margined0[M - kx:]
                            for j in range(L + M):
                                dst[j] += wk * shifted[j]
    if need_dx:
        H, W = dx.shape[1], dx.shape[2]
        dxpad3 = dxpad.reshape((C, Hp, Wp))
        for c in range(C):
            for y in range(H):
                src_row = dxpad3[c, y + pad, pad:]
                dst_row = dx[c, y]
                for i in range(W):
                    dst_row[i] = src_row[i]


@njit(cache=True, fastmath=FASTMATH)
def conv_pool_relu_backward(dx, dweight, dbias, scratch, dplane, dpooled, pooled, argmax, xpad, weight, pad,
                            need_dx):
    """The backward of conv_pool_relu_forward: dpooled (F,PH,PW) is dL/d(its output), pooled and argmax
    what it left. dplane (F,OH,OW) receives dL/d(conv output); the rest as conv2d_backward, and the
    same bits as relu_backward, maxpool2_backward, conv2d_backward in turn, with one call and one pass
    over the pooled values instead of three."""
    plane = dplane.reshape(dplane.size)
    zero = plane.dtype.type(0)
    for i in range(plane.shape[0]):
        plane[i] = zero
    dpooled_flat = dpooled.reshape(dpooled.size)
    pooled_flat = pooled.reshape(pooled.size)
    argmax_flat = argmax.reshape(argmax.size)
    for j in range(dpooled_flat.shape[0]):
        plane[argmax_flat[j]] = dpooled_flat[j] if not (pooled_flat[j] <= 0) else zero
    conv2d_backward(dx, dweight, dbias, scratch, dplane, xpad, weight, pad, need_dx)


@njit(cache=True, fastmath=FASTMATH)
def _add5(dst, v0, v1, v2, v3, v4):
    dst[0] += v0
    dst[1] += v1
    dst[2] += v2
    dst[3] += v3
    dst[4] += v4


# --------------------------------------------------------------------------------------------- relu

@njit(cache=True, fastmath=FASTMATH)
def relu_forward(out, x):
    """out = max(x, 0), elementwise, any shape (flat views in the drivers)."""
    x_flat = x.reshape(x.size)
    out_flat = out.reshape(out.size)
    zero = out.dtype.type(0)
    for i in range(x_flat.shape[0]):
        v = x_flat[i]
        # not (v <= 0) rather than v > 0: NaN passes through, so divergence still shows
        out_flat[i] = v if not (v <= 0) else zero


@njit(cache=True, fastmath=FASTMATH)
def relu_backward(dx, dout, out):
    """dx = dout where the forward output was positive, else 0; `out` is relu_forward's output."""
    dx_flat = dx.reshape(dx.size)
    dout_flat = dout.reshape(dout.size)
    out_flat = out.reshape(out.size)
    zero = dx.dtype.type(0)
    for i in range(out_flat.shape[0]):
        dx_flat[i] = dout_flat[i] if not (out_flat[i] <= 0) else zero


# ------------------------------------------------------------------------------------------ maxpool

@njit(cache=True, fastmath=FASTMATH)
def maxpool2_forward(out, argmax, x):
    """out (C,PH,PW) = max over 2x2 windows of x (C,H,W); argmax (C,PH,PW) int32 records the flat
    index into x's (C,H,W) of each window's maximum (the first one on ties) for the backward."""
    C, PH, PW = out.shape
    H, W = x.shape[1], x.shape[2]
    for c in range(C):
        for py in range(PH):
            top = x[c, 2 * py]
            bottom = x[c, 2 * py + 1]
            base = (c * H + 2 * py) * W
            out_row = out[c, py]
            argmax_row = argmax[c, py]
            for px in range(PW):
                # selects, not branches: which of the four wins is data-dependent, so branches
                # mispredicted about half the time, and selects let the loop vectorise.
                # A NaN compares false, as in a chain of ifs: the same value and index.
                i = 2 * px
                best = top[i]
                where = i
                v = top[i + 1]
                better = v > best
                best = v if better else best
                where = i + 1 if better else where
                v = bottom[i]
                better = v > best
                best = v if better else best
                where = W + i if better else where
                v = bottom[i + 1]
                better = v > best
                best = v if better else best
                where = W + i + 1 if better else where
                out_row[px] = best
                argmax_row[px] = base + where


@njit(cache=True, fastmath=FASTMATH)
def maxpool2_backward(dx, dout, argmax):
    """dx (C,H,W) = dout routed to each window's argmax, 0 elsewhere (an odd last row/column too)."""
    dx_flat = dx.reshape(dx.size)
    dout_flat = dout.reshape(dout.size)
    argmax_flat = argmax.reshape(argmax.size)
    # clear, then scatter: a vectorised clear and one store per window beat four selects per window
    zero = dx.dtype.type(0)
    for i in range(dx_flat.shape[0]):
        dx_flat[i] = zero
    for j in range(dout_flat.shape[0]):
        dx_flat[argmax_flat[j]] = dout_flat[j]


# -------------------------------------------------------------------------------------------- dense

@njit(cache=True, fastmath=FASTMATH)
def dense_forward(out, x, weight, bias):
    """out (N_out,) = weight (N_out,N_in) @ x (N_in,) + bias."""
    n_out, n_in = weight.shape
    for o in range(n_out):
        w_row = weight[o]
        acc = out.dtype.type(0)
        for i in range(n_in):
            acc += w_row[i] * x[i]
        out[o] = acc + bias[o]


@njit(cache=True, fastmath=FASTMATH)
def dense_backward(dx, dweight, dbias, dout, x, weight, need_dx):
    """dweight += outer(dout, x), dbias += dout; dx (N_in,) = weight.T @ dout when need_dx."""
    n_out, n_in = weight.shape
    if need_dx:
        dx[:] = 0
    for o in range(n_out):
        g = dout[o]
        dbias[o] += g
        if g == 0:
            continue
        dw_row = dweight[o]
        for i in range(n_in):
            dw_row[i] += g * x[i]
        if need_dx:
            w_row = weight[o]
            for i in range(n_in):
                dx[i] += g * w_row[i]


# ------------------------------------------------------------------------------ softmax x-entropy

@njit(cache=True, fastmath=FASTMATH)
def softmax_xent_forward(probs, logits, label):
    """probs (n_classes,) = softmax(logits); returns the loss -log probs[label] (computed stably)."""
    n = logits.shape[0]
    top = logits[0]
    for j in range(1, n):
        if logits[j] > top:
            top = logits[j]
    total = probs.dtype.type(0)
    for j in range(n):
        e = np.exp(logits[j] - top)
        probs[j] = e
        total += e
    for j in range(n):
        probs[j] /= total
    return np.log(total) - (logits[label] - top)


@njit(cache=True, fastmath=FASTMATH)
def softmax_xent_backward(dlogits, probs, label):
    """dlogits (n_classes,) = probs - onehot(label): the loss's gradient w.r.t. the logits."""
    for j in range(probs.shape[0]):
        dlogits[j] = probs[j]
    dlogits[label] -= 1


# ------------------------------------------------------------------------------------------ drivers

@njit(cache=True, fastmath=FASTMATH)
def _layer_forward(params, work, iwork, row, image):
    op = row[T_OP]
    if row[T_FUSED] == FUSED_DONE:
        return
    C, H, W, F, OH, OW = row[T_C], row[T_H], row[T_W], row[T_F], row[T_OH], row[T_OW]
    if row[T_IN] < 0:
        x_flat = image.reshape(image.size)
    else:
        x_flat = work[row[T_IN]:row[T_IN] + C * H * W]
    out_flat = work[row[T_OUT]:row[T_OUT] + F * OH * OW]
    if op == OP_CONV:
        K, P = row[T_K], row[T_P]
        weight = params[row[T_WEIGHT]:row[T_WEIGHT] + F * C * K * K].reshape((F, C, K, K))
        bias = params[row[T_BIAS]:row[T_BIAS] + F]
        Hp, Wp = H + 2 * P, W + 2 * P
        xpad = work[row[T_XPAD]:row[T_XPAD] + C * Hp * Wp].reshape((C, Hp, Wp))
        scratch = work[row[T_SCRATCH]:row[T_SCRATCH] + conv2d_scratch_size(C, H, W, F, K, P)]
        if row[T_FUSED] == FUSED_CONV:
            pooled_shape = (F, OH // 2, OW // 2)
            n_pooled = F * (OH // 2) * (OW // 2)
            pooled = work[row[T_FUSED_OUT]:row[T_FUSED_OUT] + n_pooled].reshape(pooled_shape)
            argmax = iwork[row[T_FUSED_ARGMAX]:row[T_FUSED_ARGMAX] + n_pooled].reshape(pooled_shape)
            conv_pool_relu_forward(pooled, argmax, out_flat.reshape((F, OH, OW)), xpad, scratch,
                                   x_flat.reshape((C, H, W)), weight, bias, P)
        else:
            conv2d_forward(out_flat.reshape((F, OH, OW)), xpad, scratch, x_flat.reshape((C, H, W)), weight, bias, P)
    elif op == OP_RELU:
        relu_forward(out_flat, x_flat)
    elif op == OP_POOL:
        argmax = iwork[row[T_ARGMAX]:row[T_ARGMAX] + F * OH * OW].reshape((F, OH, OW))
        maxpool2_forward(out_flat.reshape((F, OH, OW)), argmax, x_flat.reshape((C, H, W)))
    else:
        n_in = C * H * W
        weight = params[row[T_WEIGHT]:row[T_WEIGHT] + F * n_in].reshape((F, n_in))
        bias = params[row[T_BIAS]:row[T_BIAS] + F]
        dense_forward(out_flat, x_flat, weight, bias)


@njit(cache=True, fastmath=FASTMATH)
def _layer_backward(params, grads, work, iwork, row, image):
    op = row[T_OP]
    if row[T_FUSED] == FUSED_DONE:
        return
    C, H, W, F, OH, OW = row[T_C], row[T_H], row[T_W], row[T_F], row[T_OH], row[T_OW]
    n_in = C * H * W
    n_out = F * OH * OW
    need_dx = row[T_DIN] >= 0
    if row[T_IN] < 0:
        x_flat = image.reshape(image.size)
    else:
        x_flat = work[row[T_IN]:row[T_IN] + n_in]
    # with no dx wanted, any correctly typed view will do: the kernel does not touch it
    din = work[row[T_DIN]:row[T_DIN] + n_in] if need_dx else work[0:n_in]
    dout = work[row[T_DOUT]:row[T_DOUT] + n_out]
    if op == OP_CONV:
        K, P = row[T_K], row[T_P]
        w0, b0 = row[T_WEIGHT], row[T_BIAS]
        weight = params[w0:w0 + F * C * K * K].reshape((F, C, K, K))
        dweight = grads[w0:w0 + F * C * K * K].reshape((F, C, K, K))
        Hp, Wp = H + 2 * P, W + 2 * P
        xpad = work[row[T_XPAD]:row[T_XPAD] + C * Hp * Wp].reshape((C, Hp, Wp))
        scratch = work[row[T_SCRATCH]:row[T_SCRATCH] + conv2d_scratch_size(C, H, W, F, K, P)]
        if row[T_FUSED] == FUSED_CONV:
            pooled_shape = (F, OH // 2, OW // 2)
            n_pooled = F * (OH // 2) * (OW // 2)
            pooled = work[row[T_FUSED_OUT]:row[T_FUSED_OUT] + n_pooled].reshape(pooled_shape)
            dpooled = work[row[T_FUSED_DOUT]:row[T_FUSED_DOUT] + n_pooled].reshape(pooled_shape)
            argmax = iwork[row[T_FUSED_ARGMAX]:row[T_FUSED_ARGMAX] + n_pooled].reshape(pooled_shape)
            conv_pool_relu_backward(din.reshape((C, H, W)), dweight, grads[b0:b0 + F], scratch,
                                    dout.reshape((F, OH, OW)), dpooled, pooled, argmax, xpad, weight, P, need_dx)
        else:
            conv2d_backward(din.reshape((C, H, W)), dweight, grads[b0:b0 + F], scratch,
                            dout.reshape((F, OH, OW)), xpad, weight, P, need_dx)
    elif op == OP_RELU:
        relu_backward(din, dout, work[row[T_OUT]:row[T_OUT] + n_out])
    elif op == OP_POOL:
        argmax = iwork[row[T_ARGMAX]:row[T_ARGMAX] + n_out].reshape((F, OH, OW))
        maxpool2_backward(din.reshape((C, H, W)), dout.reshape((F, OH, OW)), argmax)
    else:
        w0, b0 = row[T_WEIGHT], row[T_BIAS]
        weight = params[w0:w0 + F * n_in].reshape((F, n_in))
        dweight = grads[w0:w0 + F * n_in].reshape((F, n_in))
        dense_backward(din, dweight, grads[b0:b0 + F], dout, x_flat, weight, need_dx)


@njit(cache=True, fastmath=FASTMATH)
def network_forward_backward(params, grads, sample_grads, work, iwork, table, images, labels):
    """For each sample of images (k, C, H, W) / labels (k,): see _forward_backward_samples."""
    return _forward_backward_samples(params, grads, sample_grads, work, iwork, table, images, labels, None,
                                     0, images.shape[0])


@njit(cache=True, fastmath=FASTMATH)
def network_forward_backward_at(params, grads, sample_grads, work, iwork, table, images, labels, order, start,
                                stop):
    """The same for samples order[start:stop] of a whole dataset (images (N, C, H, W), labels (N,)):
    the trainer's step with its sampling inside the one call, so no batch is copied out in Python."""
    return _forward_backward_samples(params, grads, sample_grads, work, iwork, table, images, labels, order,
                                     start, stop)


@njit(cache=True, fastmath=FASTMATH)
def _forward_backward_samples(params, grads, sample_grads, work, iwork, table, images, labels, order, start,
                              stop):
    """For each sample: forward through the table's layers, softmax cross-entropy, backward in exact
    reverse order, gradients ADDED into `grads`. Returns (sum of the samples' losses, number correct).

    With more than one sample, each sample's gradient is first computed on its own in `sample_grads`
    (n_params scratch) and then added to `grads` in sample order. So k samples on one rank sum exactly
    as k ranks' single-sample gradients do when an exchange adds them in rank order: the same
    bits, not merely the same sum up to rounding. One sample goes straight into `grads`.

    work holds activations and deltas (offsets in the table; the last layer's logits at
    table[-1, T_OUT], then probs, then dlogits = table[-1, T_DOUT]); iwork the pool argmaxes."""
    n_layers = table.shape[0]
    last = table[n_layers - 1]
    n_classes = last[T_F]
    logits = work[last[T_OUT]:last[T_OUT] + n_classes]
    probs = work[last[T_OUT] + n_classes:last[T_OUT] + 2 * n_classes]
    dlogits = work[last[T_DOUT]:last[T_DOUT] + n_classes]
    separate = stop - start > 1
    target = sample_grads if separate else grads
    loss_sum = 0.0
    n_correct = 0
    for s in range(start, stop):
        i = s
        if order is not None:  # resolved when numba compiles: None and an array get separate machine code
            i = order[s]
            if i < 0 or i >= images.shape[0]:
                raise ValueError("a sample index is outside the dataset")
        image = images[i]
        for layer in range(n_layers):
            _layer_forward(params, work, iwork, table[layer], image)
        label = labels[i]
        if label < 0 or label >= n_classes:
            raise ValueError("a label is outside 0..n_classes-1")
        loss_sum += softmax_xent_forward(probs, logits, label)
        if _argmax(logits) == label:
            n_correct += 1
        softmax_xent_backward(dlogits, probs, label)
        if separate:
            target[:] = 0.0
        for layer in range(n_layers - 1, -1, -1):
            _layer_backward(params, target, work, iwork, table[layer], image)
        if separate:
            for i in range(grads.shape[0]):
                grads[i] += target[i]
    return loss_sum, n_correct


@njit(cache=True)
def sgd_step_kernel(params, grads, velocity, scale, momentum, zero_grads):
    """params -= scale * grads, or with momentum > 0 through the velocity buffer (updated in place);
    with zero_grads, grads are cleared in the same pass (saves the caller a separate sweep). cnnpar.optim
    documents the update; it lives here because `network_train_steps` calls it (see the module docstring)."""
    zero = grads.dtype.type(0)
    if momentum == 0.0:
        if zero_grads:
            for i in range(params.shape[0]):
                params[i] -= scale * grads[i]
                grads[i] = zero
        else:
            for i in range(params.shape[0]):
                params[i] -= scale * grads[i]
    else:
        for i in range(params.shape[0]):
            v = momentum * velocity[i] + grads[i]
            velocity[i] = v
            params[i] -= scale * v
            if zero_grads:
                grads[i] = zero


# The clock Python's time.perf_counter reads (CLOCK_MONOTONIC on Linux and macOS), read from compiled code
# through libc's clock_gettime: a compiled window's step times, and the exchanges' waits (primitives), are in
# the loop's seconds.
HAS_STEP_CLOCK = hasattr(time, "clock_gettime") and hasattr(time, "CLOCK_MONOTONIC")
_CLOCK_ID = time.CLOCK_MONOTONIC if HAS_STEP_CLOCK else 1


@intrinsic
def now_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds (clock_gettime through the vDSO: ~20 ns, no system call)."""

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ts = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))  # struct timespec: tv_sec, tv_nsec (LP64)
        fnty = ir.FunctionType(i32, [i32, ts.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(i32, _CLOCK_ID), ts])
        zero = ir.Constant(i32, 0)
        sec = builder.load(builder.gep(ts, [zero, ir.Constant(i32, 0)]))
        nsec = builder.load(builder.gep(ts, [zero, ir.Constant(i32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return types.int64(), codegen


@intrinsic
def _prefetch(typingctx, flat, index):
    """Ask the core to bring the cache line holding flat[index] into L1 (x86 prefetcht0); changes no value."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, aryty, array, [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, keep in every cache level, data cache
        builder.call(function, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(flat, types.intp), codegen


@njit(cache=True)
def _prefetch_samples(images, order, start, stop):
    """Prefetch the images of samples order[start:stop]: a sample drawn from a data set larger than L2 costs
    ~3.5 us more to train on than one in cache (its 3 KB come line by line from memory as the first layer
    reads them), which the step before can hide."""
    for s in range(start, stop):
        i = order[s]
        if 0 <= i < images.shape[0]:
            image = images[i].reshape(images[i].size)
            for at in range(0, image.size, 64 // image.itemsize):
                _prefetch(image, at)


# Columns of a compiled window's rows: cnnpar.window.StepWindow.FIELDS, in its order
R_STEP, R_EPOCH, R_LOSS_SUM, R_COUNT, R_STEP_COUNT, R_ARRIVE_S, R_REDUCE_S, R_WAIT_S, R_LR = range(9)


@njit(cache=True)
def network_train_steps(rows, params, grads, velocity, sample_grads, work, iwork, table, images, labels, order,
                        starts, stops, step_counts, first_step, step_in_epoch, n_steps, epoch, lr, mean, momentum,
                        loss_sum, n_correct, n_counted, samples_done):
    """n_steps whole training steps of a rank whose exchange is nothing (one rank, or --mode local), in one
    call: per step its samples order[starts[j]:stops[j]] (j from step_in_epoch), forward and backward into
    `grads` (`_forward_backward_samples`), then SGD (`sgd_step_kernel`, scale lr, or lr / step_counts[j]
    with `mean`; a step of no samples only clears grads), exactly the calls and the arithmetic of the
    Python loop, so the same bits. Each step's statistics go to rows[i] (R_* columns; its times from the
    monotonic clock). Returns the running sums the loop keeps, continued over these steps in its order:
    (loss_sum, n_correct, n_counted, samples_done).

    Compiled without fastmath: the float64 sums must add in step order (the kernels it calls keep theirs)."""
    for i in range(n_steps):
        j = step_in_epoch + i
        start = starts[j]
        stop = stops[j]
        step_count = step_counts[j]
        if j + 1 < starts.shape[0]:  # the next step's samples arrive while this one computes
            _prefetch_samples(images, order, starts[j + 1], stops[j + 1])
        t0 = now_ns()
        step_loss, step_correct = _forward_backward_samples(params, grads, sample_grads, work, iwork, table,
                                                            images, labels, order, start, stop)
        t1 = now_ns()
        if step_count <= 0:
            grads[:] = 0
        else:
            scale = lr
            if mean:
                scale = scale / step_count
            sgd_step_kernel(params, grads, velocity, grads.dtype.type(scale), momentum, True)
        row = rows[i]
        row[R_STEP] = first_step + i
        row[R_EPOCH] = epoch
        row[R_LOSS_SUM] = step_loss
        row[R_COUNT] = stop - start
        row[R_STEP_COUNT] = step_count
        row[R_ARRIVE_S] = (t1 - t0) * 1e-9
        row[R_REDUCE_S] = 0.0  # no exchange
        row[R_WAIT_S] = 0.0
        row[R_LR] = lr
        loss_sum += step_loss
        n_correct += step_correct
        n_counted += stop - start
        samples_done += step_count
    return loss_sum, n_correct, n_counted, samples_done


@njit(cache=True, fastmath=FASTMATH)
def network_evaluate(params, work, iwork, table, images, labels, predictions_out):
    """Forward only: (sum of losses, number correct); predictions_out[s] = argmax of the logits
    (pass an empty array to skip)."""
    n_layers = table.shape[0]
    last = table[n_layers - 1]
    n_classes = last[T_F]
    logits = work[last[T_OUT]:last[T_OUT] + n_classes]
    probs = work[last[T_OUT] + n_classes:last[T_OUT] + 2 * n_classes]
    want_predictions = predictions_out.shape[0] > 0
    loss_sum = 0.0
    n_correct = 0
    for s in range(images.shape[0]):
        image = images[s]
        for layer in range(n_layers):
            _layer_forward(params, work, iwork, table[layer], image)
        label = labels[s]
        if label < 0 or label >= n_classes:
            raise ValueError("a label is outside 0..n_classes-1")
        loss_sum += softmax_xent_forward(probs, logits, label)
        predicted = _argmax(logits)
        if predicted == label:
            n_correct += 1
        if want_predictions:
            predictions_out[s] = predicted
    return loss_sum, n_correct


@njit(cache=True)
def _argmax(values):
    best = 0
    for j in range(1, values.shape[0]):
        if values[j] > values[best]:
            best = j
    return best
