"""Shared-memory gradient exchanges: `--allreduce shm` (one node) and `--allreduce hier` (several nodes).

Design, measurements and the targets they meet or miss: docs/performance.md.

shm (one node)
    One MPI-3 shared-memory window on the node communicator holds a control block, one gradient slot per
    rank and a result buffer. Default step when ranks <= cores ("slices", two flag phases):

        1. every rank copies its gradient into its slot and arrives (atomic fetch-add on counter A);
        2. once A says all ranks arrived, rank r sums its own slice of the parameters over the slots in rank
           order 0..n-1 into the result, and arrives on counter D;
        3. once D says all slices are summed, every rank copies the result back into its gradient.

    When ranks outnumber cores a second round of sleeping and waking costs more than it saves, so there the
    default is one phase ("single"): the rank that arrives last sums every slot (same order, same bits),
    bumps counter R and wakes the others. A third protocol ("all") double-buffers the slots and lets every
    rank sum all of them itself after one phase (small n only).

    The sum is formed in a fixed order (slot 0 + slot 1 + ... + slot n-1, float32, element by element) by
    every protocol, so the result is bitwise identical to `functools.reduce(np.add, grads_of_rank_0..n-1)` and
    does not depend on timing; MPI_Allreduce agrees with it within float32 summation-order tolerance.

hier (several nodes)
    The shm steps 1-2 on each node, then the node leaders (node_rank 0) MPI_Allreduce the node sums while the
    other ranks of the node sleep, and a node-local broadcast through the same window (counter R). The result
    is the MPI sum over nodes of the per-node rank-order sums: deterministic for a fixed layout, bitwise equal
    to `sum_node0 + sum_node1` for two nodes, within tolerance of MPI_Allreduce in general.

Synchronisation and memory ordering
    The counters are never reset: at step s (1, 2, ...) a phase is complete when its counter reaches n*s.
    Every counter update is an LLVM `atomicrmw add seq_cst` (x86: `lock xadd`, a full barrier) and every flag
    read is an LLVM `load atomic acquire` (x86: a plain `mov` the compiler may not move or hoist out of the
    wait loop). In C++ memory-model terms: a rank's writes to its slot are sequenced before its release RMW on
    A; the RMWs of all ranks on A form one release sequence; a waiter's acquire load that reads n*s therefore
    synchronizes with every rank's RMW, so all slot writes happen-before its reads of the slots. The same
    argument covers the result buffer and counter D, and the re-use of a slot or the result at step s+1 (a
    rank only rewrites its slot after D reached n*s, i.e. after everyone finished reading slots; the result is
    only rewritten after A reached n*(s+1), i.e. after everyone copied the step-s result out). Because these
    are real LLVM atomics inside one @njit kernel, neither LLVM nor the CPU can reorder the gradient copies
    across the flag operations, and the wait loop re-reads the flag on every iteration; on x86 (TSO) this
    compiles to the same instructions a hand-written C version would use, and on AArch64 to ldar/ldaddal.

Waiting, the atomics and the futex sleeping are exchange/primitives.py's (its docstring); the time a rank
spent waiting is measured inside the kernel and returned by `reduce` as the step's wait seconds.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .interface import Exchange
from .primitives import (F_DONE, F_PROBE_A, F_PROBE_B, F_ARRIVE, F_REDUCE_NS, F_RESULT, IS_X86, LINE,
                         N_FIELDS, P_ALL, P_SINGLE, P_SLICES, PH_FINISHED, PH_START, PH_WAIT_ARRIVE, PH_WAIT_DONE,
                         PH_WAIT_RESULT, PHASE_BITS, SPIN_NS_DEFAULT, WAIT_SLICE_NS, SlotWindow, arrive, copy_prefix,
                         cpu_relax, drive, fetch_add, load_acquire, now_ns, publish_result, round_up, wait_field,
                         wait_settings, wait_until)
from .primitives import warm_kernels as _warm_primitives

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


@intrinsic
def _stream_store_chunks(typingctx, dst, src, chunks):
    """dst[:16*chunks] = src[:16*chunks] with non-temporal (streaming) stores of 64 bytes, then sfence.

    dst must be 64-byte aligned (a slot row is). The lines go to memory without first being fetched and
    without invalidating other cores' copies one by one: when the other core is far (another die or socket,
    ~0.5 us per cache-line round trip) this is several times cheaper than ordinary stores into lines the
    other core has read; the reader then fetches them from memory. x86 only (sfence orders them before the
    release RMW that publishes the slot)."""

    def codegen(context, builder, sig, args):
        dty, sty, cty = sig.args
        dst_ary = context.make_array(dty)(context, builder, args[0])
        src_ary = context.make_array(sty)(context, builder, args[1])
        count = context.cast(builder, args[2], cty, types.intp)
        vec = ir.VectorType(ir.FloatType(), 16)
        dptr = builder.bitcast(dst_ary.data, vec.as_pointer())
        sptr = builder.bitcast(src_ary.data, vec.as_pointer())
        hint = builder.module.add_metadata([ir.Constant(_I32, 1)])
        aligned = builder.icmp_unsigned("==", builder.and_(builder.ptrtoint(dst_ary.data, _I64),
                                                           ir.Constant(_I64, 63)), ir.Constant(_I64, 0))
        with builder.if_else(aligned) as (then, otherwise):
            with then:
                with cgutils.for_range(builder, count) as loop:
                    value = builder.load(builder.gep(sptr, [loop.index]), align=4)
                    store = builder.store(value, builder.gep(dptr, [loop.index]), align=64)
                    store.set_metadata("nontemporal", hint)
            with otherwise:  # not 64-byte aligned (never for a slot row): ordinary stores
                with cgutils.for_range(builder, count) as loop:
                    value = builder.load(builder.gep(sptr, [loop.index]), align=4)
                    builder.store(value, builder.gep(dptr, [loop.index]), align=4)
        sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
        builder.call(sfence, [])
        return context.get_dummy_value()

    return types.void(dst, src, chunks), codegen


# ----------------------------------------------------------------------------------------------------


ALL_UP_TO = 4              # spinning: protocol 'all' up to this many ranks, 'slices' above
FAR_ROUND_TRIP_NS = 250    # cache-line round trip above which slots are written with streaming stores
PROBE_ROUNDS = 500


@njit(cache=True, nogil=True)
def _sum_rows(slots, first_row, n, out, lo, hi):
    """out[0:hi-lo] = slots[first_row][lo:hi] + ... + slots[first_row+n-1][lo:hi], left to right, float32.

    Row by row over 1-D views: LLVM vectorises these loops (2-D indexing in one loop nest does not get
    vectorised and is ~4x slower). Each element still sees the additions in rank order."""
    head = slots[first_row, lo:hi]
    for i in range(hi - lo):
        out[i] = head[i]
    for j in range(first_row + 1, first_row + n):
        row = slots[j, lo:hi]
        for i in range(hi - lo):
            out[i] += row[i]



@njit(cache=True, nogil=True)
def _copy_except(dst, src, m, skip_lo, skip_hi, nontemporal):
    """dst[:m] = src[:m] except [skip_lo, skip_hi), which reduce_begin already copied; streaming stores
    when `nontemporal` (and nothing was pre-copied)."""
    if skip_lo >= skip_hi:
        if nontemporal:
            chunks = m // 16
            _stream_store_chunks(dst, src, chunks)
            for i in range(chunks * 16, m):
                dst[i] = src[i]
        else:
            copy_prefix(dst, src, m)
        return
    for i in range(skip_lo):
        dst[i] = src[i]
    for i in range(skip_hi, m):
        dst[i] = src[i]



PROTOCOLS = {"slices": P_SLICES, "single": P_SINGLE, "all": P_ALL}


@njit(cache=True, nogil=True)
def _shm_step(ctrl, slots, result, grads, rank, n, lo, hi, seq, phase, spin_ns, yields, protocol, node_only,
              slice_ns, pre_lo, pre_hi, nontemporal):
    """One exchange step, resumable at `phase`. Returns the phase reached | (ns waited << 3).

    P_SLICES: copy in, arrive A, wait A, sum my slice into result, arrive D, wait D, copy out.
    P_SINGLE: copy in, arrive A; the last arrival sums every slot into result and bumps R; the others
              wait for R; copy out.
    P_ALL:    copy into slot row (seq % 2) * n + rank, arrive A, wait A, every rank sums all n rows of that
              half straight into grads. Double buffering makes one phase enough: a rank rewrites its row of
              half h at step s+2 only after A counted everyone at step s+1, i.e. after all finished reading
              half h at step s.
    node_only (hier, P_SLICES): stop after this rank's slice is summed and counted on D (PH_WAIT_DONE).
    [pre_lo, pre_hi): already copied into the slot by reduce_begin (empty when pre_lo >= pre_hi).
    nontemporal: copy into the slot with streaming stores (see _stream_store_chunks).
    Every variant forms the same rank-order float32 sum, so all give bitwise the same result."""
    m = grads.shape[0]
    target = n * seq
    start = now_ns()
    waited = 0
    if protocol == P_ALL:
        base = (seq & 1) * n
        if phase == PH_START:
            _copy_except(slots[base + rank], grads, m, pre_lo, pre_hi, nontemporal)
            arrive(ctrl, F_ARRIVE, target)
        done, ns = wait_until(ctrl, F_ARRIVE, target, spin_ns, yields, start, slice_ns)
        if not done:
            return PH_WAIT_ARRIVE | (ns << PHASE_BITS)
        _sum_rows(slots, base, n, grads, 0, m)
        return PH_FINISHED | (ns << PHASE_BITS)
    if phase == PH_START:
        _copy_except(slots[rank], grads, m, pre_lo, pre_hi, nontemporal)
        last = arrive(ctrl, F_ARRIVE, target)
        if protocol == P_SINGLE:
            if last:
                t = now_ns()
                _sum_rows(slots, 0, n, result, 0, m)
                ctrl[F_REDUCE_NS * LINE] = now_ns() - t  # read by the waiters after their acquire of R
                publish_result(ctrl)  # R: seq-1 -> seq (release, full barrier), then wake sleepers
                copy_prefix(grads, result, m)
                return PH_FINISHED
            phase = PH_WAIT_RESULT
        else:
            phase = PH_WAIT_ARRIVE
    if phase == PH_WAIT_ARRIVE:
        done, ns = wait_until(ctrl, F_ARRIVE, target, spin_ns, yields, start, slice_ns)
        waited += ns
        if not done:
            return PH_WAIT_ARRIVE | (waited << PHASE_BITS)
        _sum_rows(slots, 0, n, result[lo:hi], lo, hi)
        arrive(ctrl, F_DONE, target)
        if node_only:
            return PH_WAIT_DONE | (waited << PHASE_BITS)
        phase = PH_WAIT_DONE
    if phase == PH_WAIT_DONE:
        done, ns = wait_until(ctrl, F_DONE, target, spin_ns, yields, start, slice_ns)
        waited += ns
        if not done:
            return PH_WAIT_DONE | (waited << PHASE_BITS)
    elif phase == PH_WAIT_RESULT:
        done, ns = wait_until(ctrl, F_RESULT, seq, spin_ns, yields, start, slice_ns)
        if done and protocol == P_SINGLE:  # the reducer's summing is exchange work, not waiting for a rank
            ns = max(0, ns - ctrl[F_REDUCE_NS * LINE])
        waited += ns
        if not done:
            return PH_WAIT_RESULT | (waited << PHASE_BITS)
    copy_prefix(grads, result, m)
    return PH_FINISHED | (waited << PHASE_BITS)


@njit(cache=True, nogil=True)
def _probe_round_trip(ctrl, rank, rounds):
    """Ranks 0 and 1 bounce a counter `rounds` times; returns the mean round trip in ns (rank 0). Only run
    when ranks <= cores (both spin at once); a descheduled partner only makes it slow, not stuck."""
    a, b = F_PROBE_A * LINE, F_PROBE_B * LINE
    t0 = now_ns()
    for k in range(1, 2 * rounds + 1):
        if k == rounds + 1:  # the first half lines the two ranks up; time the second
            t0 = now_ns()
        if rank == 0:
            fetch_add(ctrl, a, 1)
            while load_acquire(ctrl, b) < k:
                cpu_relax()
        else:
            while load_acquire(ctrl, a) < k:
                cpu_relax()
            fetch_add(ctrl, b, 1)
    return (now_ns() - t0) // rounds


@njit(cache=True, nogil=True)
def _copy_in(slots, rank, grads, lo, hi):
    copy_prefix(slots[rank, lo:hi], grads[lo:hi], hi - lo)


# ----------------------------------------------------------------------------------------------------
# The exchanges
# ----------------------------------------------------------------------------------------------------

def _slices(m: int, n: int, align: int = 16) -> list:
    """Split [0, m) into n contiguous slices on `align`-element (64-byte) boundaries."""
    bounds = [min(m, round_up(m * r // n, align)) for r in range(n + 1)]
    bounds[-1] = m
    return [(bounds[r], bounds[r + 1]) for r in range(n)]


class ShmAllreduce(Exchange):
    """Sum of the gradients of the ranks of `comm` (all on one node) through a shared-memory window.

    wait: 'spin' (spin up to spin_ns, then sleep), 'block' (sleep at once), 'yield-block' (sched_yield 16
    times, then sleep), 'yield' (sched_yield only); None = $CNNPAR_SHM_WAIT if set (experiments), else
    'yield-block' when dist.yield_when_waiting else 'spin'. protocol: 'slices' (two phases, parallel sums), 'single' (one
    phase, the last arrival sums), 'all' (one phase, every rank sums everything); None = 'single' unless
    spinning, else 'slices'. Every protocol gives bitwise the same, rank-ordered sum.

    Overlap: reduce_begin(grads, lo, hi) hands over a slice early, reduce_end(grads) completes the step."""

    name = "shm"

    def __init__(self, dist, n_params: int, comm=None, wait: str | None = None, protocol: str | None = None,
                 spin_ns: int = SPIN_NS_DEFAULT, node_only: bool = False, own_comm: bool = False,
                 nontemporal: bool | None = None):
        self._comm = comm if comm is not None else dist.node  # own_comm: free it too on close (made for this)
        self._rank, self._n = self._comm.Get_rank(), self._comm.Get_size()
        self._m = int(n_params)
        self.wait_policy, self._spin_ns, self._yields = wait_settings(dist, wait, spin_ns)
        wait = self.wait_policy
        if protocol is None:
            protocol = "single" if wait != "spin" else ("all" if self._n <= ALL_UP_TO else "slices")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        if node_only:
            protocol = "slices"
        self.protocol = protocol
        self._protocol = PROTOCOLS[protocol]
        self._node_only = node_only

        # Layout: [control block][n slots, each a whole number of 4 KiB pages][result]
        stride = round_up(max(self._m, 1), 1024)
        rows = 2 * self._n if protocol == "all" else self._n  # 'all' double-buffers the slots
        self._window = SlotWindow(self._comm, rows, stride, stride, own_comm=own_comm)
        self._ctrl, self._slots, self._result = self._window.ctrl, self._window.slots, self._window.result
        self._lo, self._hi = _slices(self._m, self._n)[self._rank]
        self._seq = 0
        self.last_wait_s = 0.0
        self.wait_slice_ns = WAIT_SLICE_NS  # tests shorten it to exercise the resume path
        self.resumed = 0  # times a wait slice expired and the step resumed from Python
        self._pre = (0, 0)  # range reduce_begin already put in the slot
        if nontemporal is None:  # streaming stores pay off only when the other core is far; measure it
            self.round_trip_ns = self._probe() if wait == "spin" and self._n > 1 and IS_X86 else 0
            nontemporal = self.round_trip_ns > FAR_ROUND_TRIP_NS
        self.nontemporal = bool(nontemporal) and IS_X86

    def _probe(self) -> int:
        """Cache-line round trip between node ranks 0 and 1 in ns (collective; ~0.1 ms). On the development VM
        it is ~70 ns when the two vCPUs share a die and ~450 ns when the host has put them on different dies,
        and the cost of handing a slot over follows it (copy-in 3-5 vs ~20 us)."""
        rt = _probe_round_trip(self._ctrl, self._rank, PROBE_ROUNDS) if self._rank < 2 else 0
        return int(self._comm.bcast(rt, root=0))

    # -- the step --
    def _run(self, grads, phase: int, stop: int) -> int:
        """Drive the resumable kernel from `phase` until it reports `stop`; returns the ns waited."""
        waited, resumed = drive(lambda at: _shm_step(self._ctrl, self._slots, self._result, grads, self._rank, self._n,
                                                     self._lo, self._hi, self._seq, at, self._spin_ns, self._yields,
                                                     self._protocol, self._node_only, self.wait_slice_ns,
                                                     self._pre[0], self._pre[1], self.nontemporal),
                                phase, stop)
        self.resumed += resumed
        return waited

    def reduce(self, grads: np.ndarray) -> float:
        self._seq += 1
        self.last_wait_s = self._run(grads, PH_START, PH_FINISHED) * 1e-9
        return self.last_wait_s

    # -- overlap: hand over a slice early, finish later --
    def reduce_begin(self, grads: np.ndarray, lo: int, hi: int) -> None:
        """Put grads[lo:hi] (e.g. the dense layer's gradient, ready before the conv backward ends) into this
        rank's slot now; reduce_end(grads) then copies only the rest. Nothing else can start early: the sum
        needs every rank's slot, and no other agent (NIC, idle core) exists to work on it meanwhile."""
        row = self._rank
        if self._protocol == P_ALL:
            row = ((self._seq + 1) & 1) * self._n + self._rank
        _copy_in(self._slots, row, grads, lo, hi)
        self._pre = (lo, hi)

    def reduce_end(self, grads: np.ndarray) -> float:
        try:
            return self.reduce(grads)
        finally:
            self._pre = (0, 0)

    def close(self) -> None:
        self._ctrl = self._slots = self._result = None
        self._window.close()


class HierAllreduce(Exchange):
    """Node-local shm reduction, MPI_Allreduce among one leader per node, node-local broadcast."""

    name = "hier"

    def __init__(self, dist, n_params: int, wait: str | None = None, spin_ns: int = SPIN_NS_DEFAULT):
        from mpi4py import MPI

        self._dist = dist
        self._node = ShmAllreduce(dist, n_params, comm=dist.node, wait=wait, protocol="slices",
                                  spin_ns=spin_ns, node_only=True)
        self._leaders = dist.leaders if dist.node_rank == 0 else None
        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM
        self._m = int(n_params)
        self.wait_policy = self._node.wait_policy

    def reduce(self, grads: np.ndarray) -> float:
        node = self._node
        node._seq += 1
        node._run(grads, PH_START, PH_WAIT_DONE)  # my slice of the node sum is in the result buffer
        if self._leaders is not None:
            target = node._n * node._seq
            _, resumed = drive(lambda _: wait_field(node._ctrl, F_DONE, target, node._spin_ns, node._yields,
                                                    node.wait_slice_ns), PH_START, PH_FINISHED)
            node.resumed += resumed
            result = node._result[: self._m]
            if self._dist.yield_when_waiting:
                self._dist.wait(self._leaders.Iallreduce(self._in_place, result, self._sum))
            else:
                self._leaders.Allreduce(self._in_place, result, self._sum)
            publish_result(node._ctrl)
        node._run(grads, PH_WAIT_RESULT, PH_FINISHED)
        return math.nan  # the node waits are measured, but the leaders' MPI wait is not: let the trainer estimate

    def close(self) -> None:
        self._node.close()


def warm_kernels() -> None:
    """Compile (or load from numba's cache) every kernel shm and hier run."""
    _warm_primitives()
    ctrl = np.zeros(N_FIELDS * LINE, np.int64)
    result = np.zeros(16, np.float32)
    grads = np.zeros(16, np.float32)
    slots = np.zeros((2, 16), np.float32)
    for protocol in PROTOCOLS.values():
        ctrl[:] = 0
        _shm_step(ctrl, slots, result, grads, 0, 1, 0, 16, 1, PH_START, 0, 0, protocol, False, WAIT_SLICE_NS, 0, 0, False)
    ctrl[:] = 0
    _shm_step(ctrl, slots, result, grads, 0, 1, 0, 16, 1, PH_START, 0, 0, P_SLICES, True, WAIT_SLICE_NS, 0, 0, False)
    wait_field(ctrl, F_DONE, 1, 0, 0, WAIT_SLICE_NS)
    publish_result(ctrl)
    _shm_step(ctrl, slots, result, grads, 0, 1, 0, 16, 1, PH_WAIT_RESULT, 0, 0, P_SLICES, True, WAIT_SLICE_NS, 0, 0, False)
    _copy_in(slots, 0, grads, 0, 16)
    probe = np.zeros(N_FIELDS * LINE, np.int64)
    probe[F_PROBE_B * LINE] = 2  # rank 0 (1 round + 1 line-up round) finds its answers already there
    _probe_round_trip(probe, 0, 1)
    if IS_X86:
        _copy_except(slots[0], grads, 16, 0, 0, True)
