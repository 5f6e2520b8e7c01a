"""Plain NumPy reference of the CNN's layers and of a whole network, written for clarity, not speed.

Independent of cnnpar.kernels: im2col convolution, windows reshaped for the pool, float64
throughout (inputs are promoted), so the kernels can be compared against it.
Shapes follow the legend of cnnpar/kernels.py: x (C,H,W), conv weight (F,C,K,K), dense weight (N_out,N_in).
"""

from __future__ import annotations

import numpy as np


# --- conv: im2col ---

def _im2col(x, K, pad):
    """cols (C*K*K, OH*OW): column p holds the KxK patch (all channels) under output position p."""
    C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    OH, OW = H + 2 * pad - K + 1, W + 2 * pad - K + 1
    cols = np.empty((C, K, K, OH, OW))
    for ky in range(K):
        for kx in range(K):
            cols[:, ky, kx] = xp[:, ky:ky + OH, kx:kx + OW]
    return cols.reshape(C * K * K, OH * OW), (OH, OW)


def conv_forward(x, weight, bias, pad):
    x, weight, bias = (np.asarray(a, np.float64) for a in (x, weight, bias))
    F, C, K, _ = weight.shape
    cols, (OH, OW) = _im2col(x, K, pad)
    return (weight.reshape(F, -1) @ cols + bias[:, None]).reshape(F, OH, OW)


def conv_backward(dout, x, weight, pad):
    """(dx, dweight, dbias) of conv_forward for upstream gradient dout (F,OH,OW)."""
    dout, x, weight = (np.asarray(a, np.float64) for a in (dout, x, weight))
    F, C, K, _ = weight.shape
    _, H, W = x.shape
    cols, (OH, OW) = _im2col(x, K, pad)
    d = dout.reshape(F, OH * OW)
    dweight = (d @ cols.T).reshape(weight.shape)
    dbias = d.sum(axis=1)
    dcols = (weight.reshape(F, -1).T @ d).reshape(C, K, K, OH, OW)
    dxp = np.zeros((C, H + 2 * pad, W + 2 * pad))
    for ky in range(K):
        for kx in range(K):
            dxp[:, ky:ky + OH, kx:kx + OW] += dcols[:, ky, kx]
    return dxp[:, pad:pad + H, pad:pad + W], dweight, dbias


# --- relu ---

def relu_forward(x):
    return np.maximum(np.asarray(x, np.float64), 0.0)


def relu_backward(dout, x):
    return np.where(np.asarray(x) > 0, np.asarray(dout, np.float64), 0.0)


# --- 2x2 max pool, stride 2, floor ---

def pool_forward(x):
    """(out (C,H//2,W//2), winner): winner[c, py, px] in 0..3 is the window position of the max,
    the first one in (top-left, top-right, bottom-left, bottom-right) order on ties."""
    x = np.asarray(x, np.float64)
    C, H, W = x.shape
    PH, PW = H // 2, W // 2
    windows = x[:, :2 * PH, :2 * PW].reshape(C, PH, 2, PW, 2).transpose(0, 1, 3, 2, 4).reshape(C, PH, PW, 4)
    winner = windows.argmax(axis=-1)   # numpy's argmax takes the first maximum
    return windows.max(axis=-1), winner


def pool_backward(dout, winner, in_shape):
    C, H, W = in_shape
    PH, PW = winner.shape[1:]
    onehot = (winner[..., None] == np.arange(4)) * np.asarray(dout, np.float64)[..., None]
    dx = np.zeros((C, H, W))
    dx[:, :2 * PH, :2 * PW] = onehot.reshape(C, PH, PW, 2, 2).transpose(0, 1, 3, 2, 4).reshape(C, 2 * PH, 2 * PW)
    return dx


def pool_argmax_flat(winner, in_shape):
    """The kernels' argmax encoding: flat index into (C,H,W) of each window's maximum."""
    C, H, W = in_shape
    c, py, px = np.indices(winner.shape)
    return (c * H + 2 * py + winner // 2) * W + 2 * px + winner % 2


# --- dense ---

def dense_forward(x, weight, bias):
    return np.asarray(weight, np.float64) @ np.asarray(x, np.float64).ravel() + np.asarray(bias, np.float64)


def dense_backward(dout, x, weight):
    dout = np.asarray(dout, np.float64)
    return (np.asarray(weight, np.float64).T @ dout, np.outer(dout, np.asarray(x, np.float64).ravel()), dout.copy())


# --- softmax cross-entropy ---

def softmax_xent_forward(logits, label):
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    probs = np.exp(z) / np.exp(z).sum()
    return -np.log(probs[label]), probs


def softmax_xent_backward(probs, label):
    d = np.array(probs, np.float64)
    d[label] -= 1.0
    return d


# --- a whole network ---

def network_loss_and_grads(layers, params, image, label):
    """One sample through `layers` (a list of (kind, name) with kind conv/relu/pool/dense and the
    conv's pad in params[name + '.pad']), params a dict of named arrays. Returns
    (loss, predicted class, grads dict of the same names)."""
    acts = [np.asarray(image, np.float64)]
    caches = []
    for kind, name in layers:
        x = acts[-1]
        if kind == "conv":
            acts.append(conv_forward(x, params[name + ".weight"], params[name + ".bias"], params[name + ".pad"]))
            caches.append(None)
        elif kind == "relu":
            acts.append(relu_forward(x))
            caches.append(None)
        elif kind == "pool":
            out, winner = pool_forward(x)
            acts.append(out)
            caches.append(winner)
        else:
            acts.append(dense_forward(x, params[name + ".weight"], params[name + ".bias"]))
            caches.append(None)
    loss, probs = softmax_xent_forward(acts[-1], label)
    grads = {}
    d = softmax_xent_backward(probs, label)
    for i in range(len(layers) - 1, -1, -1):
        kind, name = layers[i]
        x = acts[i]
        if kind == "conv":
            d, grads[name + ".weight"], grads[name + ".bias"] = conv_backward(
                d.reshape(acts[i + 1].shape), x, params[name + ".weight"], params[name + ".pad"])
        elif kind == "relu":
            d = relu_backward(d.reshape(x.shape), x)
        elif kind == "pool":
            d = pool_backward(d.reshape(acts[i + 1].shape), caches[i], x.shape)
        else:
            d, grads[name + ".weight"], grads[name + ".bias"] = dense_backward(d, x, params[name + ".weight"])
            d = d.reshape(x.shape)
    return loss, int(np.argmax(acts[-1])), grads
