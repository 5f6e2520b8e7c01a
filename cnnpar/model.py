"""Architectures, the layer grammar, and the flat parameter layout.

Named architectures (`--arch NAME`):

    small   conv8k5,relu,pool,dense10                 conv 1->8 5x5, relu, maxpool 2, dense 1152->10
    lenet   conv6k5p2,relu,pool,conv16k5,relu,pool,dense120,relu,dense84,relu,dense10

(the final dense of a named architecture follows the data set's number of classes).

Layer grammar (`--arch "conv8k5p0,relu,pool,dense10"`): comma-separated layers, first to last,
case and spaces ignored:

    conv<F>k<K>[p<P>]   convolution to F channels, KxK kernel, stride 1, P zeros of padding on every
                        side (default 0): output size H + 2P - K + 1
    relu                max(x, 0)
    pool                2x2 max-pool, stride 2; an odd last row/column is dropped (floor, as PyTorch)
    dense<N>            fully connected to N features; flattens what comes in (C*H*W)

A stack must end with dense<n_classes> (the logits of the softmax cross-entropy); nothing spatial
(conv, pool) may follow a dense; every size must stay >= 1. Mistakes are UserError('--arch', ...).

Parameters live in ONE flat buffer (float32 for training) and gradients in ONE flat buffer of the
same layout: layer by layer, weight then bias, each C-contiguous. `Network.layout` lists
(name, shape, offset, size); `Network.views(flat)` gives named views. Allreduce, one-sided windows,
the optimizer and checkpoints all work on the flat arrays with no packing.

The kernels run 'relu,pool' as 'pool,relu' (same values, same gradients, a quarter of the relu
work); Network.layers keeps the order as written.

Weights: conv weight (F, C, K, K), dense weight (N_out, N_in) (PyTorch's layouts). Init from
np.random.default_rng(seed), so every rank given the same seed holds the same replica: He normal
(std sqrt(2/fan_in)) for conv and for dense layers followed by relu, Glorot uniform for the output
layer, LeCun normal (std sqrt(1/fan_in)) for any other dense; biases 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import kernels as K
from .errors import UserError

ARCHS: dict[str, str] = {
    "small": "conv8k5,relu,pool,dense10",
    "lenet": "conv6k5p2,relu,pool,conv16k5,relu,pool,dense120,relu,dense84,relu,dense10",
}

ARCH_HELP = ("'small' (conv 1->8 5x5, relu, 2x2 maxpool, dense 10), 'lenet' (conv 6 5x5 pad 2, relu, pool, "
             "conv 16 5x5, relu, pool, dense 120, relu, dense 84, relu, dense 10), or a comma-separated "
             "layer stack: conv<F>k<K>[p<P>] (F channels, KxK kernel, stride 1, P zero padding), relu, "
             "pool (2x2 max, stride 2, odd sizes floored), dense<N>; it must end with dense<number of "
             "classes>, e.g. \"conv8k5p0,relu,pool,dense10\"")

_INT32 = np.dtype(np.int32)
_TOKEN = re.compile(r"conv(\d+)k(\d+)(?:p(\d+))?|relu|pool|dense(\d+)")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a stack as written (Network.layers), with its input and output shapes."""
    kind: str                      # 'conv' | 'relu' | 'pool' | 'dense'
    name: str                      # 'conv1', 'relu2', 'dense1', ...
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    features: int = 0              # conv F / dense N_out
    kernel: int = 0
    pad: int = 0


def parse_arch(arch: str) -> list[tuple]:
    """The grammar string (or a named architecture's) as a list of (kind, F/N, K, P) tuples."""
    text = ARCHS.get(arch.strip().lower(), arch)
    text = re.sub(r"\s+", "", text.lower())
    if not text:
        raise UserError("--arch", f"empty architecture; use {' or '.join(ARCHS)} or a layer stack such as "
                                  f"\"{ARCHS['small']}\"")
    layers = []
    for position, token in enumerate(text.split(","), 1):
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise UserError("--arch", f"layer {position} '{token}' is not a layer: write conv<F>k<K>[p<P>], "
                                      f"relu, pool or dense<N> (e.g. conv8k5p2, dense10), comma-separated")
        if token.startswith("conv"):
            f, k, p = int(match[1]), int(match[2]), int(match[3] or 0)
            if f < 1 or k < 1:
                raise UserError("--arch", f"layer {position} '{token}': channels and kernel size must be >= 1")
            layers.append(("conv", f, k, p))
        elif token.startswith("dense"):
            n = int(match[4])
            if n < 1:
                raise UserError("--arch", f"layer {position} '{token}': a dense layer needs >= 1 feature")
            layers.append(("dense", n, 0, 0))
        else:
            layers.append((token, 0, 0, 0))
    return layers


def _plan(arch: str, input_shape: tuple[int, int, int], n_classes: int) -> list[LayerSpec]:
    parsed = parse_arch(arch)
    if arch.strip().lower() in ARCHS and parsed[-1][0] == "dense":
        parsed[-1] = ("dense", n_classes, 0, 0)   # a named arch fits the data set's classes
    counts: dict[str, int] = {}
    shape = input_shape
    flat = False
    layers = []
    for position, (kind, features, kernel, pad) in enumerate(parsed, 1):
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}{counts[kind]}"
        c, h, w = shape
        where = f"layer {position} '{name}' gets {c}x{h}x{w}"
        if kind == "conv":
            if flat:
                raise UserError("--arch", f"layer {position} (conv) comes after a dense layer; put every conv "
                                          f"and pool before the first dense")
            oh, ow = h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1
            if oh < 1 or ow < 1:
                raise UserError("--arch", f"{where}: a {kernel}x{kernel} kernel with padding {pad} leaves "
                                          f"{oh}x{ow}; use a smaller kernel, more padding, or fewer pools before it")
            out = (features, oh, ow)
        elif kind == "pool":
            if flat:
                raise UserError("--arch", f"layer {position} (pool) comes after a dense layer; put every conv "
                                          f"and pool before the first dense")
            if h < 2 or w < 2:
                raise UserError("--arch", f"{where}: a 2x2 pool needs at least 2x2; remove a pool or shrink "
                                          f"less before it")
            out = (c, h // 2, w // 2)
        elif kind == "relu":
            out = shape
        else:
            out = (1, 1, features)
            flat = True
        layers.append(LayerSpec(kind, name, shape, out, features, kernel, pad))
        shape = out
    last = layers[-1]
    if last.kind != "dense" or last.features != n_classes:
        got = f"'{last.name}'" if last.kind != "dense" else f"dense{last.features}"
        raise UserError("--arch", f"the stack must end with dense{n_classes} (the logits for {n_classes} "
                                  f"classes), not {got}; append ',dense{n_classes}' or fix the last layer")
    return layers


CACHE_LINE_BYTES = 64


def aligned_zeros(n: int, dtype) -> np.ndarray:
    """A zeroed 1-D array starting on a cache line. numpy only promises 16 bytes, and where a flat block
    happens to start decides whether the kernels' 64-byte vector loads split cache lines: measured up
    to ~15% of a step at one rank, changing from run to run with unrelated allocations."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + CACHE_LINE_BYTES, np.uint8)
    skip = -raw.ctypes.data % CACHE_LINE_BYTES
    return raw[skip:skip + n * dtype.itemsize].view(dtype)


class Network:
    """A layer stack bound to an input shape and dtype: layout, init, and the one-call step.

    Holds its own workspace, so it is per process and not thread-safe."""

    def __init__(self, arch: str, input_shape, n_classes: int, dtype):
        self.arch = arch
        self.input_shape = tuple(int(v) for v in input_shape)
        self.n_classes = int(n_classes)
        self.dtype = np.dtype(dtype)
        self._layers = _plan(arch, self.input_shape, self.n_classes)
        self.layers: tuple[LayerSpec, ...] = tuple(self._layers)
        self.grammar = ",".join(_token(layer) for layer in self._layers)
        self.layout, self.n_params = self._build_layout()
        self._specs = {spec.name: spec for spec in self.layout}
        self.table, n_work, n_iwork = self._build_table()
        self._work = aligned_zeros(n_work, self.dtype)
        self._iwork = aligned_zeros(n_iwork, np.int32)
        self._sample_grads = aligned_zeros(self.n_params, self.dtype)  # one sample's gradient when k > 1
        self._no_predictions = np.empty(0, np.int32)

    def __repr__(self) -> str:
        return (f"Network(arch={self.arch!r}, grammar={self.grammar!r}, input_shape={self.input_shape}, "
                f"n_classes={self.n_classes}, n_params={self.n_params}, dtype={self.dtype})")

    # --- layout ---
    def _build_layout(self):
        specs = []
        offset = 0
        for layer in self._layers:
            if layer.kind == "conv":
                shapes = [(layer.features, layer.in_shape[0], layer.kernel, layer.kernel), (layer.features,)]
            elif layer.kind == "dense":
                shapes = [(layer.features, int(np.prod(layer.in_shape))), (layer.features,)]
            else:
                continue
            for suffix, shape in zip(("weight", "bias"), shapes):
                size = int(np.prod(shape))
                specs.append(ParamSpec(f"{layer.name}.{suffix}", shape, offset, size))
                offset += size
        return tuple(specs), offset

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views ('conv1.weight', ...) into a flat params or grads buffer; no copies."""
        if flat.shape != (self.n_params,):
            raise ValueError(f"flat buffer has shape {flat.shape}, expected ({self.n_params},)")
        return {spec.name: flat[spec.offset:spec.offset + spec.size].reshape(spec.shape) for spec in self.layout}

    def init_params(self, seed: int) -> np.ndarray:
        """A new flat parameter buffer, identical for the same seed on every rank (see module doc)."""
        rng = np.random.default_rng(seed)
        flat = aligned_zeros(self.n_params, self.dtype)
        views = self.views(flat)
        params = [layer for layer in self._layers if layer.kind in ("conv", "dense")]
        for index, layer in enumerate(self._layers):
            if layer.kind not in ("conv", "dense"):
                continue
            weight = views[f"{layer.name}.weight"]
            fan_in = int(np.prod(weight.shape[1:]))
            followed_by_relu = index + 1 < len(self._layers) and self._layers[index + 1].kind == "relu"
            if layer is params[-1]:
                limit = np.sqrt(6.0 / (fan_in + weight.shape[0]))
                values = rng.uniform(-limit, limit, weight.shape)
            elif layer.kind == "conv" or followed_by_relu:
                values = rng.normal(0.0, np.sqrt(2.0 / fan_in), weight.shape)
            else:
                values = rng.normal(0.0, np.sqrt(1.0 / fan_in), weight.shape)
            weight[...] = values
        return flat

    # --- the kernel table and workspace ---
    def _execution_order(self) -> list[LayerSpec]:
        """The layers as the kernels run them: 'relu,pool' becomes 'pool,relu'. Both give the same
        values and the same gradients (max and relu commute, and the gradient reaches the window's
        argmax exactly when that max is > 0), but the relu then touches a quarter of the values."""
        steps, i = [], 0
        while i < len(self._layers):
            layer = self._layers[i]
            if layer.kind == "relu" and i + 1 < len(self._layers) and self._layers[i + 1].kind == "pool":
                pool = self._layers[i + 1]
                steps.append(LayerSpec("pool", pool.name, layer.in_shape, pool.out_shape))
                steps.append(LayerSpec("relu", layer.name, pool.out_shape, pool.out_shape))
                i += 2
            else:
                steps.append(layer)
                i += 1
        return steps

    def _build_table(self):
        steps = self._execution_order()
        table = np.full((len(steps), K.T_COLUMNS), -1, np.int64)
        table[:, K.T_FUSED] = 0
        act = 0              # activation offsets grow from the start of the workspace
        acts, sizes = [], []
        iwork = 0
        for layer in steps:
            size = int(np.prod(layer.out_shape))
            acts.append(act)
            sizes.append(size)
            act += size
        n_classes = self.n_classes
        probs_at = act
        act += n_classes
        delta = act          # then one delta per activation, same sizes
        deltas = []
        for size in sizes:
            deltas.append(delta)
            delta += size
        xpads = {}           # then each conv's padded input, kept from its forward to its backward
        scratch_size = 0
        for i, layer in enumerate(steps):
            if layer.kind == "conv":
                c, h, w = layer.in_shape
                xpads[i] = delta
                delta += c * (h + 2 * layer.pad) * (w + 2 * layer.pad)
                # the plain-Python body of the kernel (the same integers): building a network compiles nothing
                scratch_size = max(scratch_size, int(K.conv2d_scratch_size.py_func(c, h, w, layer.features,
                                                                                     layer.kernel, layer.pad)))
        scratch_at = delta   # one scratch, shared by the convs (each uses it only within a call)
        n_work = delta + scratch_size
        for i, layer in enumerate(steps):
            row = table[i]
            c, h, w = layer.in_shape
            f, oh, ow = layer.out_shape
            if layer.kind == "dense":
                c, h, w = 1, 1, c * h * w
                f, oh, ow = layer.features, 1, 1
            row[K.T_OP] = {"conv": K.OP_CONV, "relu": K.OP_RELU, "pool": K.OP_POOL, "dense": K.OP_DENSE}[layer.kind]
            row[K.T_C:K.T_OW + 1] = (c, h, w, f, oh, ow)
            row[K.T_K], row[K.T_P] = layer.kernel, layer.pad
            row[K.T_IN] = acts[i - 1] if i > 0 else -1
            row[K.T_OUT] = acts[i]
            row[K.T_DIN] = deltas[i - 1] if i > 0 else -1
            row[K.T_DOUT] = deltas[i]
            if layer.kind in ("conv", "dense"):
                row[K.T_WEIGHT] = self._specs[f"{layer.name}.weight"].offset
                row[K.T_BIAS] = self._specs[f"{layer.name}.bias"].offset
            if layer.kind == "pool":
                row[K.T_ARGMAX] = iwork
                iwork += f * oh * ow
            if layer.kind == "conv":
                row[K.T_XPAD], row[K.T_SCRATCH] = xpads[i], scratch_at
        # conv, pool, relu in a row (as 'conv,relu,pool' runs) are one pass of the conv's kernels
        for i in range(len(steps) - 2):
            if ([layer.kind for layer in steps[i:i + 3]] == ["conv", "pool", "relu"]
                    and table[i, K.T_FUSED] == 0):
                table[i, K.T_FUSED] = K.FUSED_CONV
                table[i + 1, K.T_FUSED] = table[i + 2, K.T_FUSED] = K.FUSED_DONE
                table[i, K.T_FUSED_OUT] = table[i + 2, K.T_OUT]
                table[i, K.T_FUSED_ARGMAX] = table[i + 1, K.T_ARGMAX]
                table[i, K.T_FUSED_DOUT] = table[i + 2, K.T_DOUT]
        assert probs_at == table[-1, K.T_OUT] + n_classes
        # the first layer's unused dx is a typed view of the workspace start: make it long enough
        n_work = max(n_work, int(np.prod(self.input_shape)))
        return table, n_work, max(iwork, 1)

    # --- compute ---
    def _as_batch(self, images, labels):
        # the common case costs a few attribute reads; anything else is converted or refused
        if (images.dtype is self.dtype and labels.dtype is _INT32 and images.flags.c_contiguous
                and labels.flags.c_contiguous and images.shape[1:] == self.input_shape
                and labels.shape[0] == images.shape[0] and images.ndim == 4 and labels.ndim == 1):
            return images, labels
        if images.dtype != self.dtype or not images.flags.c_contiguous:
            images = np.ascontiguousarray(images, self.dtype)
        if images.shape[1:] != self.input_shape or images.ndim != 4:
            raise ValueError(f"images have shape {images.shape}, expected (k,) + {self.input_shape}")
        if labels.dtype != np.int32 or not labels.flags.c_contiguous:
            labels = np.ascontiguousarray(labels, np.int32)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        return images, labels

    def forward_backward(self, params: np.ndarray, grads: np.ndarray, images: np.ndarray,
                         labels: np.ndarray) -> tuple[float, int]:
        """ADD the gradients of the k samples' losses into grads; return (loss sum, number correct).

        images (k, C, H, W) of any k >= 0, labels (k,) int32. One numba call; nothing allocated
        when images/labels already have the network's dtype/int32 and are C-contiguous."""
        images, labels = self._as_batch(images, labels)
        loss_sum, n_correct = K.network_forward_backward(params, grads, self._sample_grads, self._work,
                                                         self._iwork, self.table, images, labels)
        return float(loss_sum), int(n_correct)

    def sampled_forward_backward(self, images: np.ndarray, labels: np.ndarray):
        """The trainer's step function f(params, grads, order, start, stop) -> (loss sum, number correct):
        forward_backward on the samples images[order[start:stop]] of a whole dataset, order int64.

        images and labels are checked (and converted if need be) once, here, not on every step: at one
        sample per rank a step is ~20 us, and copying the batch out in Python cost ~3 of them."""
        images, labels = self._as_batch(images, labels)
        kernel = K.network_forward_backward_at
        sample_grads, work, iwork, table = self._sample_grads, self._work, self._iwork, self.table

        def forward_backward_at(params, grads, order, start, stop):
            return kernel(params, grads, sample_grads, work, iwork, table, images, labels, order, start, stop)

        return forward_backward_at

    def sampled_train_steps(self, images: np.ndarray, labels: np.ndarray):
        """For a rank whose exchange does nothing (one rank, --mode local): the function
        f(rows, params, grads, velocity, order, starts, stops, step_counts, first_step, step_in_epoch, n_steps,
        epoch, lr, mean, momentum, sums) -> sums that runs n_steps whole steps (sample, forward, backward,
        SGD) in one numba call, as the trainer's loop would one by one (`K.network_train_steps`); sums is
        (loss sum, number correct, samples counted, samples done), continued."""
        images, labels = self._as_batch(images, labels)
        kernel = K.network_train_steps
        sample_grads, work, iwork, table = self._sample_grads, self._work, self._iwork, self.table

        def train_steps(rows, params, grads, velocity, order, starts, stops, step_counts, first_step, step_in_epoch,
                        n_steps, epoch, lr, mean, momentum, sums):
            return kernel(rows, params, grads, velocity, sample_grads, work, iwork, table, images, labels, order,
                          starts, stops, step_counts, first_step, step_in_epoch, n_steps, epoch, lr, mean, momentum,
                          *sums)

        return train_steps

    def evaluate(self, params: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 predictions_out: np.ndarray | None = None) -> tuple[float, int]:
        """Forward only, any batch size: (loss sum, number correct); optionally int32 predictions."""
        images, labels = self._as_batch(images, labels)
        if predictions_out is None:
            predictions_out = self._no_predictions
        elif predictions_out.dtype != np.int32 or predictions_out.shape != labels.shape:
            raise ValueError(f"predictions_out must be int32 of shape {labels.shape}")
        loss_sum, n_correct = K.network_evaluate(params, self._work, self._iwork, self.table, images, labels,
                                                 predictions_out)
        return float(loss_sum), int(n_correct)

    def flops_per_sample(self) -> dict:
        """Nominal floating-point operations per sample (multiply-adds x 2) of the dense formulation:
        forward, backward (weight grads, and input grads except for the first layer), total."""
        forward = backward = 0
        for index, layer in enumerate(self._layers):
            if layer.kind == "conv":
                f, oh, ow = layer.out_shape
                macs = f * oh * ow * layer.in_shape[0] * layer.kernel * layer.kernel
            elif layer.kind == "dense":
                macs = layer.features * int(np.prod(layer.in_shape))
            else:
                continue
            forward += 2 * macs
            backward += 2 * macs * (2 if index > 0 else 1)
        return {"forward": forward, "backward": backward, "total": forward + backward}


def _token(layer: LayerSpec) -> str:
    if layer.kind == "conv":
        return f"conv{layer.features}k{layer.kernel}" + (f"p{layer.pad}" if layer.pad else "")
    if layer.kind == "dense":
        return f"dense{layer.features}"
    return layer.kind


def build_network(arch: str = "small", input_shape=(1, 28, 28), n_classes: int = 10,
                  dtype=np.float32) -> Network:
    """A Network for `arch` (a name in ARCHS or a layer grammar) on inputs of input_shape (C, H, W)."""
    if not isinstance(arch, str):
        raise UserError("--arch", f"expected a name or a layer stack, got {arch!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or any(int(v) < 1 for v in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return Network(arch.strip(), shape, int(n_classes), dtype)
