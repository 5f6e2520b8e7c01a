"""Sufficient-factor shared-memory exchange (Xie et al. 2015, "sufficient factor broadcasting").

With one sample per rank, a dense layer's weight gradient is a rank-1 outer product, dW = outer(dout, x):
N_out x N_in floats that are fully determined by N_out + N_in. For the `small` network that is 11,520 of
the 11,738 gradient floats, so a rank that publishes its dense layers' inputs x instead of their dW moves
~5.5 KB per step between cores instead of 46 KB, and every reader rebuilds the rows it needs from the
factors in its own cache. The exchange is otherwise ShmAllreduce's (cnnpar/exchange/shm.py): one MPI-3
shared window, never-reset atomic counters, the same wait policies, futex sleeping and close semantics.

What each rank publishes per step (its "payload"):
    * every gradient value that is not a factored dense weight, as is: conv weights and all biases;
    * for each dense layer whose input is an activation (T_IN >= 0), that input x, read from the network's
      workspace, where network_forward_backward leaves it (each layer has its own activation and delta
      slot, and the backward only writes deltas, so nothing overwrites a dense layer's x after its forward).
    dout is not published separately: the layer's bias gradient is 0 + dout, equal to dout except that -0
    becomes +0, and the kernel skips a row exactly when dout == 0, which -0 and +0 both satisfy. Taking g
    from the gradient buffer also makes a step without a sample (the epoch's short last step) safe: its
    gradient is all zero, so g = 0 and every row is skipped, whatever stale x the workspace still holds.

Bitwise equality with the flat exchange. The result must be ((dW0 + dW1) + dW2) + ... in float32, element
by element, where dWr is exactly what the kernel wrote on rank r. kernels.dense_backward computes, on a
zeroed gradient, `if g == 0: continue` else `dw[i] += g * x[i]` with fastmath 'contract', which LLVM turns
into fma(g, x[i], +0.0) where the CPU has FMA: one rounding of the exact product, and +0 (not -0) when the
exact product is zero. Without FMA it is (g * x[i]) + 0.0: the same value except where the product
underflows to -0 (then +0). The two differ only for products below 2^-149, but they do differ, so
`kernel_rounding()` asks the compiled kernel which one it does (a product that underflows to -0) and the
reconstruction, compiled without fastmath so that nothing is re-associated, contracted or folded (nsz
would fold the `+ 0.0`), forms that exact term and adds the ranks' terms in rank order. A row whose g is
0 contributes +0.0 (the zeroed gradient), added like any other term, so a -0 from an earlier rank turns
into +0 exactly as in the flat sum. NaN and inf propagate as in the flat sum (they are the same IEEE
operations); only a NaN's payload bits may differ, which no comparison or update can observe.

Protocols (the synchronisation is shm.py's; see its module docstring for the memory-ordering
argument, which carries over slot for slot):
    all     (ranks <= cores) payload slots double-buffered by step parity; each rank copies its payload in,
            arrives on A, waits for A and rebuilds the whole sum into its own gradient. One flag phase.
    single  (ranks > cores) the rank completing A rebuilds the sum once into the result buffer and bumps R;
            the others wait for R and copy the result out.
    A 'slices' variant (each rank rebuilds 1/n of the parameters, a second flag phase, copy out) was
    measured at n = 2..12 and never won, so it is not kept.

docs/performance.md ("Sufficient factors") has the measurements behind the defaults.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .. import kernels as K
from ..dist import compile_once
from ..modes import factored_fits
from .interface import Exchange
from .primitives import (F_ARRIVE, F_REDUCE_NS, F_RESULT, LINE, N_FIELDS, P_ALL, P_SINGLE, PH_FINISHED, PH_START,
                         PH_WAIT_ARRIVE, PH_WAIT_RESULT, PHASE_BITS, SPIN_NS_DEFAULT, WAIT_SLICE_NS, SlotWindow, arrive,
                         copy_prefix, drive, now_ns, publish_result, round_up, wait_settings, wait_until)

PROTOCOLS = {"single": P_SINGLE, "all": P_ALL}

# Factoring is worth it only when the payload is clearly smaller than the gradient: it trades moving
# floats between cores for multiplying them locally, and each rank rebuilds n ranks' terms.
MAX_PAYLOAD_FRACTION = 0.5

ROUND_FUSED, ROUND_TWICE = 1, 0  # how the kernel forms dW: fma(g, x, +0) or (g * x) + 0


# ----------------------------------------------------------------------------------------------------
# The factor layout of a network
# ----------------------------------------------------------------------------------------------------

class FactorLayout:
    """Where each rank's payload comes from and where it goes.

    segs (S, 3) int64: gradient ranges [lo, hi) published as is, and where each starts in the payload.
    layers (L, 5) int64: per factored dense layer: weight offset w0, n_out, n_in, offset of x in the
    network's workspace, offset of x in the payload; and (column 5) the payload offset of its bias, i.e. g.
    """

    def __init__(self, network):
        table = np.asarray(network.table)
        self.n_params = m = int(network.n_params)
        factored = []
        for row in table:
            if row[K.T_OP] != K.OP_DENSE or row[K.T_IN] < 0 or row[K.T_WEIGHT] < 0:
                continue  # a dense layer fed by the image itself has no x in the workspace: sent flat
            n_in = int(row[K.T_C] * row[K.T_H] * row[K.T_W])
            n_out = int(row[K.T_F] * row[K.T_OH] * row[K.T_OW])
            factored.append((int(row[K.T_WEIGHT]), n_out, n_in, int(row[K.T_IN]), int(row[K.T_BIAS])))
        factored.sort()
        segs, at, lo = [], 0, 0
        for w0, n_out, n_in, _, _ in factored:
            if w0 > lo:
                segs.append((lo, w0, at))
                at += w0 - lo
            lo = w0 + n_out * n_in
        if lo < m:
            segs.append((lo, m, at))
            at += m - lo

        def payload_of(index):
            for s_lo, s_hi, s_at in segs:
                if s_lo <= index < s_hi:
                    return s_at + index - s_lo
            raise AssertionError("a dense bias inside a factored weight range")

        layers = []
        for w0, n_out, n_in, x_at, b0 in factored:
            layers.append((w0, n_out, n_in, x_at, at, payload_of(b0)))
            at += n_in
        self.segs = np.array(segs, np.int64).reshape(-1, 3)
        self.layers = np.array(layers, np.int64).reshape(-1, 6)
        self.payload = at
        self.factored_floats = sum(n_out * n_in for _, n_out, n_in, _, _ in factored)


def kernel_rounding() -> int | None:
    """How the compiled kernels.dense_backward forms a dense weight gradient on a zeroed buffer:
    ROUND_FUSED (fma(g, x, +0): one rounding, an underflowing negative product stays -0), ROUND_TWICE
    ((g * x) + 0: it becomes +0), or None when it does neither consistently (then do not factor)."""
    return _kernel_rounding()


@functools.lru_cache(maxsize=None)
def _kernel_rounding():
    tiny = np.float32(2.0 ** -60)
    seen = set()
    for n_in in (1, 7, 67, 1152):  # a scalar loop, a vector body and its remainder
        x = np.full(n_in, tiny, np.float32)
        dout = np.array([-2.0 ** -100, 2.0 ** -100, 3.0], np.float32)  # -2^-160 underflows to -0 if fused
        weight = np.zeros((3, n_in), np.float32)
        dweight = np.zeros_like(weight)
        K.dense_backward(np.zeros(n_in, np.float32), dweight, np.zeros(3, np.float32), dout, x, weight, False)
        if np.any(dweight[:2] != 0) or not np.all(dweight[2] == np.float32(3.0) * tiny):
            return None
        seen.update(np.signbit(dweight[0]).tolist())
        if np.any(np.signbit(dweight[1])):
            return None
    if len(seen) != 1:
        return None
    return ROUND_FUSED if seen.pop() else ROUND_TWICE


def applies(network, samples_per_rank: int) -> bool:
    """Whether the factored exchange can reproduce this network's summed gradient bit for bit, and pays:
    one sample per rank (with more, a rank's dW is a sum of outer products), float32, at least one dense
    layer fed by an activation, a payload at most MAX_PAYLOAD_FRACTION of the gradient, and a kernel whose
    rounding of g * x is known (kernel_rounding)."""
    if network is None or not factored_fits(samples_per_rank, np.dtype(network.dtype)):
        return False
    layout = FactorLayout(network)
    if layout.layers.shape[0] == 0 or layout.payload > MAX_PAYLOAD_FRACTION * layout.n_params:
        return False
    return kernel_rounding() is not None


def applies_on_every_rank(dist, network, samples_per_rank: int) -> bool:
    """`applies`, with the kernels compiled once per node, agreed by all ranks of dist.comm (collective)."""
    from mpi4py import MPI

    local = network is not None and factored_fits(samples_per_rank, np.dtype(network.dtype))
    if dist.comm.allreduce(int(local), op=MPI.MIN) == 0:
        return False
    compile_once(dist, warm_kernels)  # also asks the dense kernel how it rounds
    ok = applies(network, samples_per_rank)
    return dist.comm.allreduce(int(ok), op=MPI.MIN) == 1


# ----------------------------------------------------------------------------------------------------
# Kernels (no fastmath: every operation must round exactly as written)
# ----------------------------------------------------------------------------------------------------

@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: the FMA instruction, or libm's fmaf without one)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        fn = builder.module.declare_intrinsic("llvm.fma", [ir.FloatType()], fnty)
        return builder.call(fn, list(args))

    if a == b == c == types.float32:
        return types.float32(a, b, c), codegen
    return None


@njit(cache=True, nogil=True)
def _pack(slot, grads, work, segs, layers):
    """This rank's payload: the flat values, then each factored layer's input x."""
    for s in range(segs.shape[0]):
        lo, hi, at = segs[s, 0], segs[s, 1], segs[s, 2]
        src = grads[lo:hi]
        dst = slot[at:at + hi - lo]
        for i in range(hi - lo):
            dst[i] = src[i]
    for j in range(layers.shape[0]):
        n_in, x_at, at = layers[j, 2], layers[j, 3], layers[j, 4]
        src = work[x_at:x_at + n_in]
        dst = slot[at:at + n_in]
        for i in range(n_in):
            dst[i] = src[i]


@njit(cache=True, nogil=True)
def _add_terms(dst, first, g0, x0, g1, x1, pair, rounding):
    """dst (+)= the kernel's dW row segment for factor g0 and input x0, then (pair) for g1 and x1, in that
    order: dst = t0 [+ t1] when `first`, else (dst + t0) [+ t1]. t = fma(g, x, +0) or (g * x) + 0, as the
    kernel rounds. The caller passes g = 0 with x = zeros for a row the kernel skipped (g == 0): that
    term is then +0 whatever the real x holds (even NaN), like the untouched zeroed gradient. Two ranks
    per pass halve the loads and stores of dst, which is what a rebuild spends its time on."""
    zero = np.float32(0.0)
    m = dst.shape[0]
    if rounding == 1:
        if first and pair:
            for i in range(m):
                dst[i] = _fma(g0, x0[i], zero) + _fma(g1, x1[i], zero)
        elif first:
            for i in range(m):
                dst[i] = _fma(g0, x0[i], zero)
        elif pair:
            for i in range(m):
                dst[i] = (dst[i] + _fma(g0, x0[i], zero)) + _fma(g1, x1[i], zero)
        else:
            for i in range(m):
                dst[i] = dst[i] + _fma(g0, x0[i], zero)
    else:
        if first and pair:
            for i in range(m):
                dst[i] = (g0 * x0[i] + zero) + (g1 * x1[i] + zero)
        elif first:
            for i in range(m):
                dst[i] = g0 * x0[i] + zero
        elif pair:
            for i in range(m):
                dst[i] = (dst[i] + (g0 * x0[i] + zero)) + (g1 * x1[i] + zero)
        else:
            for i in range(m):
                dst[i] = dst[i] + (g0 * x0[i] + zero)


@njit(cache=True, nogil=True)
def _rebuild(out, slots, first_row, n, segs, layers, rounding):
    """out = the rank-order float32 sum over slots[first_row .. first_row+n-1] of each rank's gradient,
    rebuilt from its payload (out is indexed like the flat gradient)."""
    for s in range(segs.shape[0]):
        a, b, at = segs[s, 0], segs[s, 1], segs[s, 2]
        dst = out[a:b]
        head = slots[first_row, at:at + b - a]
        for i in range(b - a):
            dst[i] = head[i]
        for r in range(first_row + 1, first_row + n):
            row = slots[r, at:at + b - a]
            for i in range(b - a):
                dst[i] += row[i]
    widest = 1
    for j in range(layers.shape[0]):
        widest = max(widest, layers[j, 2])
    zeros = np.zeros(widest, np.float32)
    zero = np.float32(0.0)
    for j in range(layers.shape[0]):
        w0, n_out, n_in, x_at, g_at = layers[j, 0], layers[j, 1], layers[j, 2], layers[j, 4], layers[j, 5]
        # row by row, all ranks' terms of a row while it sits in L1 (a 1152-float row is 4.6 KB)
        for o in range(n_out):
            dst = out[w0 + o * n_in:w0 + (o + 1) * n_in]
            for r in range(0, n, 2):
                pair = r + 1 < n
                slot = slots[first_row + r]
                g0, x0 = slot[g_at + o], slot[x_at:x_at + n_in]
                if g0 == 0:
                    g0, x0 = zero, zeros[:n_in]
                g1, x1 = zero, zeros[:n_in]
                if pair:
                    slot = slots[first_row + r + 1]
                    if slot[g_at + o] != 0:
                        g1, x1 = slot[g_at + o], slot[x_at:x_at + n_in]
                _add_terms(dst, r == 0, g0, x0, g1, x1, pair, rounding)


@njit(cache=True, nogil=True)
def _factored_step(ctrl, slots, result, grads, work, segs, layers, rank, n, seq, phase, spin_ns, yields, protocol,
                   slice_ns, rounding):
    """One exchange step, resumable at `phase`; returns the phase reached | (ns waited << 3), as
    shm._shm_step, whose 'all' and 'single' protocols these are with the slot copy replaced by
    _pack and the sum by _rebuild."""
    m = grads.shape[0]
    target = n * seq
    start = now_ns()
    if protocol == P_ALL:
        base = (seq & 1) * n
        if phase == PH_START:
            _pack(slots[base + rank], grads, work, segs, layers)
            arrive(ctrl, F_ARRIVE, target)
        done, ns = wait_until(ctrl, F_ARRIVE, target, spin_ns, yields, start, slice_ns)
        if not done:
            return PH_WAIT_ARRIVE | (ns << PHASE_BITS)
        _rebuild(grads, slots, base, n, segs, layers, rounding)
        return PH_FINISHED | (ns << PHASE_BITS)
    if phase == PH_START:
        _pack(slots[rank], grads, work, segs, layers)
        if arrive(ctrl, F_ARRIVE, target):
            t = now_ns()
            _rebuild(result, slots, 0, n, segs, layers, rounding)
            ctrl[F_REDUCE_NS * LINE] = now_ns() - t  # read by the waiters after their acquire of R
            publish_result(ctrl)  # R: seq-1 -> seq (release, full barrier), then wake sleepers
            copy_prefix(grads, result, m)
            return PH_FINISHED
    done, ns = wait_until(ctrl, F_RESULT, seq, spin_ns, yields, start, slice_ns)
    if not done:
        return PH_WAIT_RESULT | (ns << PHASE_BITS)
    ns = max(0, ns - ctrl[F_REDUCE_NS * LINE])  # the reducer's rebuilding is exchange work, not waiting
    copy_prefix(grads, result, m)
    return PH_FINISHED | (ns << PHASE_BITS)


def rebuild_reference(payloads: np.ndarray, layout: FactorLayout, rounding: int) -> np.ndarray:
    """_rebuild over every parameter of the payloads (n, >= layout.payload) of n ranks, rank order (tests)."""
    payloads = np.ascontiguousarray(payloads, np.float32)
    out = np.empty(layout.n_params, np.float32)
    _rebuild(out, payloads, 0, payloads.shape[0], layout.segs, layout.layers, rounding)
    return out


def pack(grads: np.ndarray, work: np.ndarray, layout: FactorLayout) -> np.ndarray:
    """A rank's payload for the gradient in `grads` and the factors in `work` (the network's workspace)."""
    slot = np.zeros(layout.payload, np.float32)
    _pack(slot, grads, work, layout.segs, layout.layers)
    return slot


# ----------------------------------------------------------------------------------------------------
# The exchange
# ----------------------------------------------------------------------------------------------------

class FactoredShmAllreduce(Exchange):
    """The summed gradient of the ranks of `comm` (one node, one sample per rank each step), bitwise equal to
    ShmAllreduce's, from each rank's sufficient factors.

    wait: as ShmAllreduce ('spin', 'block', 'yield-block', 'yield'; None = $CNNPAR_SHM_WAIT, else
    'yield-block' when dist.yield_when_waiting else 'spin'). protocol: 'all', 'single'; None =
    'single' unless spinning, else 'all'. verify_steps: on that many first steps each rank checks, before
    publishing, that its factors rebuild its own gradient bit for bit, and raises RuntimeError if not
    (a trainer that touched the network's workspace between forward_backward and reduce, or several
    samples per rank)."""

    name = "factored"

    def __init__(self, dist, network, comm=None, wait: str | None = None, protocol: str | None = None,
                 spin_ns: int = SPIN_NS_DEFAULT, own_comm: bool = False, verify_steps: int = 1):
        self._comm = comm if comm is not None else dist.node
        self._rank, self._n = self._comm.Get_rank(), self._comm.Get_size()
        self._window = None
        if np.dtype(network.dtype) != np.float32:
            raise ValueError("the factored exchange sums float32 gradients")
        layout = FactorLayout(network)
        if layout.layers.shape[0] == 0:
            raise ValueError(f"{network.grammar!r} has no dense layer fed by an activation: nothing to factor")
        rounding = kernel_rounding()
        roundings = self._comm.allgather(rounding)
        if rounding is None or len(set(roundings)) != 1:
            raise RuntimeError(f"the dense kernel's rounding of g * x is not known on every rank ({roundings})")
        self.layout = layout
        self.rounding = rounding
        self._m = layout.n_params
        self._work = network._work
        self._segs, self._layers = layout.segs, layout.layers
        self.wait_policy, self._spin_ns, self._yields = wait_settings(dist, wait, spin_ns)
        wait = self.wait_policy
        if protocol is None:
            protocol = "all" if wait == "spin" else "single"
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        self.protocol = protocol
        self._protocol = PROTOCOLS[protocol]

        # Layout: [control block][payload slots, whole 4 KiB pages each][result, unless 'all']
        stride = round_up(max(layout.payload, 1), 1024)
        rows = 2 * self._n if protocol == "all" else self._n
        result_floats = 0 if protocol == "all" else round_up(self._m, 1024)
        self._window = SlotWindow(self._comm, rows, stride, result_floats, own_comm=own_comm)
        self._ctrl, self._slots, self._result = self._window.ctrl, self._window.slots, self._window.result
        self._seq = 0
        self._verify_left = int(verify_steps)
        self.last_wait_s = 0.0
        self.wait_slice_ns = WAIT_SLICE_NS
        self.resumed = 0
        self.bytes_per_rank = layout.payload * 4

    def _verify(self, grads: np.ndarray) -> None:
        own = rebuild_reference(pack(grads, self._work, self.layout)[None], self.layout, self.rounding)
        bad = (own.view(np.uint32) != grads.view(np.uint32)) & ~(np.isnan(own) & np.isnan(grads))
        if bad.any():
            i = int(np.argmax(bad))
            raise RuntimeError(f"factored exchange: this rank's factors do not rebuild its gradient (element {i}: "
                               f"{own[i]!r} vs {grads[i]!r}); it needs exactly one sample per rank and the network's "
                               f"workspace as forward_backward left it")

    def reduce(self, grads: np.ndarray) -> float:
        if self._verify_left > 0:
            self._verify_left -= 1
            self._verify(grads)
        self._seq += 1
        waited, resumed = drive(lambda at: _factored_step(self._ctrl, self._slots, self._result, grads, self._work,
                                                          self._segs, self._layers, self._rank, self._n, self._seq,
                                                          at, self._spin_ns, self._yields, self._protocol,
                                                          self.wait_slice_ns, self.rounding),
                                PH_START, PH_FINISHED)
        self.resumed += resumed
        self.last_wait_s = waited * 1e-9
        return self.last_wait_s

    def close(self) -> None:
        self._ctrl = self._slots = self._result = self._work = None
        if self._window is not None:
            self._window.close()


def warm_kernels() -> None:
    """Compile the step kernel for every protocol (applies_on_every_rank runs this once per node)."""
    from ..model import build_network

    network = build_network("small")
    layout = FactorLayout(network)
    rounding = kernel_rounding()
    grads = np.zeros(layout.n_params, np.float32)
    ctrl = np.zeros(N_FIELDS * LINE, np.int64)
    slots = np.zeros((2, round_up(layout.payload, 16)), np.float32)
    result = np.zeros(layout.n_params, np.float32)
    for protocol in PROTOCOLS.values():
        ctrl[:] = 0
        _factored_step(ctrl, slots, result, grads, network._work, layout.segs, layout.layers, 0, 1, 1, PH_START,
                       0, 0, protocol, WAIT_SLICE_NS, ROUND_FUSED if rounding is None else rounding)
