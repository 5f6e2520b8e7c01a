"""Shared-memory primitives of the exchanges that synchronise through a shared window (shm, hier, factored,
race's barrier): LLVM atomics, futex sleeping, the clock, the control block's layout, the wait policies and
the window itself. Nothing here knows a protocol; exchange/shm.py has the memory-ordering argument.

Atomics
    Every counter update is an LLVM `atomicrmw add seq_cst` (x86: `lock xadd`, a full barrier) and every flag
    read is an LLVM `load atomic acquire` (x86: a plain `mov` the compiler may not move or hoist out of the
    wait loop); on AArch64 they compile to ldaddal/ldar. The counters are never reset: at step s (1, 2, ...) a
    phase is complete when its counter reaches n*s.

Waiting (`wait_until`)
    A waiter spins on the flag with the `pause` hint for up to spin_ns (ranks <= cores: 50 us, enough for the
    usual skew, and a cap on the waste when other jobs load the machine), then calls sched_yield up to
    `yields` times, then blocks in the kernel with FUTEX_WAIT on the low 32 bits of the counter (a shared, not
    private, futex: the window is a shared mapping, so processes can wait on it). The rank that completes a
    count issues FUTEX_WAKE only when a sleepers count says someone may be asleep; the count is incremented with
    a full barrier before the sleeper's FUTEX_WAIT re-checks the counter, and the waker reads it after its own
    full-barrier increment, so (Dekker) either the waker sees the sleeper or the sleeper's FUTEX_WAIT sees the
    new counter value and returns at once: no lost wake-up. When ranks outnumber cores
    (dist.yield_when_waiting) a waiter does not spin: it yields the core 16 times (cheap hand-overs to the
    ranks that still compute on it, no wake-up of an idle vCPU needed) and then sleeps. A wait
    never lasts longer than one slice of ~0.2 s inside the kernel: then control returns to Python (Ctrl-C
    works) and the wait resumes (`drive`).

The time a rank spent in these waits is measured inside the kernel (clock_gettime, vDSO, ~20 ns).

The window is used purely as a shared allocation (MPI_WIN_UNIFIED model, checked); no RMA calls are made on it.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..kernels import now_ns  # noqa: F401 - the clock, beside the kernels' own use of it

# ----------------------------------------------------------------------------------------------------
# Numba intrinsics emitting LLVM atomics and libc/syscall calls
# ----------------------------------------------------------------------------------------------------

_MACHINE = platform.machine().lower()
IS_X86 = _MACHINE in ("x86_64", "amd64", "i686", "i386")
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(_MACHINE, -1)
HAVE_FUTEX = sys.platform.startswith("linux") and _SYS_FUTEX > 0 and sys.byteorder == "little"
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE_FLAG): the waiters are different processes
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _element_pointer(context, builder, aryty, ary, idx, idxty):
    array = context.make_array(aryty)(context, builder, ary)
    index = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, array, [index])


@intrinsic
def load_acquire(typingctx, arr, idx):
    """arr[idx] as an acquire load: never hoisted out of a loop, later accesses never move before it."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return arr.dtype(arr, idx), codegen


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomic arr[idx] += val (sequentially consistent; x86 `lock xadd`), returning the old value."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        value = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")

    return arr.dtype(arr, idx, val), codegen


@intrinsic
def sched_yield(typingctx):
    """Give the core to another runnable task (no-op when none)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, []), "sched_yield")
        return builder.call(fn, [])

    return types.int32(), codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (`pause` on x86); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if IS_X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def futex(typingctx, arr, idx, op, val, timeout_ns):
    """syscall(SYS_futex, &low32(arr[idx]), op, val, {timeout}, 0, 0); returns -1 on error (errno unread).

    FUTEX_WAIT sleeps only if the 32-bit word still equals `val` (checked atomically by the kernel), for at
    most timeout_ns; FUTEX_WAKE wakes up to `val` waiters. Little-endian: the low half of an int64 is at its
    address."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        ts = cgutils.alloca_once(builder, ir.ArrayType(_I64, 2))
        timeout = context.cast(builder, args[4], sig.args[4], types.int64)
        billion = ir.Constant(_I64, 1_000_000_000)
        zero = ir.Constant(_I32, 0)
        builder.store(builder.sdiv(timeout, billion), builder.gep(ts, [zero, ir.Constant(_I32, 0)]))
        builder.store(builder.srem(timeout, billion), builder.gep(ts, [zero, ir.Constant(_I32, 1)]))
        fnty = ir.FunctionType(_I64, [_I64], var_arg=True)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "syscall")
        word = context.cast(builder, args[3], sig.args[3], types.int64)
        word = builder.and_(word, ir.Constant(_I64, 0xFFFFFFFF))
        operation = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.call(fn, [ir.Constant(_I64, _SYS_FUTEX), builder.ptrtoint(ptr, _I64), operation, word,
                                 builder.ptrtoint(ts, _I64), ir.Constant(_I64, 0), ir.Constant(_I64, 0)])

    return types.int64(arr, idx, op, val, timeout_ns), codegen



# ----------------------------------------------------------------------------------------------------
# Control block: int64 fields, one 64-byte cache line each (CTRL[field * 8])
# ----------------------------------------------------------------------------------------------------

LINE = 8  # int64 per cache line
F_ARRIVE, F_DONE, F_RESULT, F_SLEEP_ARRIVE, F_SLEEP_DONE, F_SLEEP_RESULT, F_REDUCE_NS, F_EARLY = range(8)
F_PROBE_A, F_PROBE_B = 8, 9
N_FIELDS = 10

# wait policy -> sched_yield calls before sleeping on the futex (-1: yield forever, never sleep)
WAIT_POLICIES = {"spin": 0, "block": 0, "yield": -1, "yield-block": 16}
WAIT_SLICE_NS = 200_000_000   # a wait returns to Python this often (signals, Ctrl-C), then resumes
FUTEX_TIMEOUT_NS = 20_000_000  # safety net only: a sleeper re-checks its counter at least this often
SPIN_NS_DEFAULT = 50_000       # ranks <= cores: spin this long, then sleep (covers normal skew; caps the waste under load)

# The step kernels' protocols, and what they return: the phase reached in the low 3 bits, wait ns above them
P_SLICES, P_SINGLE, P_ALL = 0, 1, 2
PHASE_BITS = 3
PHASE_MASK = (1 << PHASE_BITS) - 1
PH_START, PH_WAIT_ARRIVE, PH_WAIT_DONE, PH_WAIT_RESULT, PH_FINISHED = 0, 1, 2, 3, 4


@njit(cache=True, nogil=True)
def arrive(ctrl, field, target):
    """Atomically count this rank in; the one that completes the count wakes any sleepers. True if last."""
    old = fetch_add(ctrl, field * LINE, 1)
    if old + 1 == target:
        sleepers = (field + 3) * LINE  # F_SLEEP_* = field + 3
        if load_acquire(ctrl, sleepers) > 0:
            futex(ctrl, field * LINE, FUTEX_WAKE, 0x7FFFFFFF, 0)
        return True
    return False


@njit(cache=True, nogil=True)
def wait_until(ctrl, field, target, spin_ns, yields, start_ns, slice_ns):
    """Wait until ctrl[field] >= target: spin up to spin_ns, then sched_yield up to `yields` times, then sleep
    on the futex (yields < 0: keep yielding, never sleep).

    Returns (done, ns waited). Gives up after slice_ns since start_ns (done False) so the caller can
    return to Python and come back."""
    word = field * LINE
    value = load_acquire(ctrl, word)
    if value >= target:
        return True, 0
    t0 = now_ns()
    if spin_ns > 0:
        spins = 0
        while True:
            cpu_relax()
            value = load_acquire(ctrl, word)
            if value >= target:
                return True, now_ns() - t0
            spins += 1
            if (spins & 63) == 0 and now_ns() - t0 >= spin_ns:
                break
    sleepers = (field + 3) * LINE
    yielded = 0
    while True:
        if yields < 0 or yielded < yields:
            sched_yield()
            yielded += 1
        else:
            fetch_add(ctrl, sleepers, 1)  # full barrier before FUTEX_WAIT re-checks the counter
            futex(ctrl, word, FUTEX_WAIT, value, min(FUTEX_TIMEOUT_NS, max(1000, slice_ns - (now_ns() - start_ns))))
            fetch_add(ctrl, sleepers, -1)
        value = load_acquire(ctrl, word)
        t1 = now_ns()
        if value >= target:
            return True, t1 - t0
        if t1 - start_ns >= slice_ns:
            return False, t1 - t0


@njit(cache=True, nogil=True)
def copy_prefix(dst, src, m):
    for i in range(m):
        dst[i] = src[i]


@njit(cache=True, nogil=True)
def wait_field(ctrl, field, target, spin_ns, yields, slice_ns):
    """Standalone wait (hier's leader on D, race's barrier). Returns phase-style code: PH_FINISHED or 0, plus ns << 3."""
    done, ns = wait_until(ctrl, field, target, spin_ns, yields, now_ns(), slice_ns)
    return (PH_FINISHED if done else 0) | (ns << PHASE_BITS)


@njit(cache=True, nogil=True)
def publish_result(ctrl):
    """The result buffer holds this step's sum (single's reducer, hier's leader): bump R, wake the sleepers."""
    fetch_add(ctrl, F_RESULT * LINE, 1)
    if load_acquire(ctrl, F_SLEEP_RESULT * LINE) > 0:
        futex(ctrl, F_RESULT * LINE, FUTEX_WAKE, 0x7FFFFFFF, 0)


def drive(step, phase: int, stop: int) -> tuple:
    """Call the resumable kernel `step(phase)` until it reports `stop`; returns (ns waited, times resumed).

    A kernel gives up its wait after a slice (WAIT_SLICE_NS) and returns the phase it reached: back in
    Python, where signals (Ctrl-C) are handled, before the wait goes on."""
    waited = resumed = 0
    while True:
        code = step(phase)
        phase = code & PHASE_MASK
        waited += code >> PHASE_BITS
        if phase == stop:
            return waited, resumed
        resumed += 1


# ----------------------------------------------------------------------------------------------------
# Settings and the window
# ----------------------------------------------------------------------------------------------------

def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def closing_collectively() -> bool:
    """close() runs on every exit path. Freeing a window is collective, so it is only safe when every rank
    closes: a normal exit, or a SystemExit the ranks agreed on. On any other exception in flight the job is
    about to be aborted (dist.abort_on_bug) while the other ranks may wait in a reduce: do not block."""
    exc = sys.exc_info()[1]
    return exc is None or isinstance(exc, SystemExit)


def wait_settings(dist, wait: str | None = None, spin_ns: int = SPIN_NS_DEFAULT) -> tuple:
    """(policy, spin_ns, yields) for `wait_until`. wait None: $CNNPAR_SHM_WAIT if set (experiments),
    else 'yield-block' when ranks outnumber cores (dist.yield_when_waiting), else 'spin'."""
    if wait is None:
        wait = os.environ.get("CNNPAR_SHM_WAIT") or ("yield-block" if dist.yield_when_waiting else "spin")
    if wait not in WAIT_POLICIES:
        raise ValueError(f"unknown wait policy {wait!r}")
    return wait, (int(spin_ns) if wait == "spin" else 0), (WAIT_POLICIES[wait] if HAVE_FUTEX else -1)


def shared_memory_comm(dist):
    """A communicator of all ranks of dist.comm if they can share memory (same host), else None. Collective."""
    from mpi4py import MPI

    host = dist.comm.Split_type(MPI.COMM_TYPE_SHARED, key=dist.rank)
    everyone = dist.comm.allreduce(int(host.Get_size() == dist.size), op=MPI.MIN) == 1
    if everyone:
        return host
    host.Free()
    return None


def allocate_shared(comm, total: int) -> tuple:
    """(window, bytes): `total` bytes of one MPI-3 shared-memory window allocated by rank 0 of `comm` (all on
    one node), 64-byte aligned, the same memory on every rank. Collective; frees the window on failure."""
    from mpi4py import MPI

    # +64: a one-rank "node" may get plain (not page-aligned) memory; align by hand
    win = MPI.Win.Allocate_shared(total + 64 if comm.Get_rank() == 0 else 0, 1, comm=comm)
    try:
        try:
            model = win.model
        except (AttributeError, NotImplementedError):
            model = MPI.WIN_UNIFIED
        if model != MPI.WIN_UNIFIED:
            raise RuntimeError("the shared-memory window is not in the unified memory model")
        buf, _ = win.Shared_query(0)
        raw = np.frombuffer(buf, dtype=np.uint8, count=total + 64)
        offset = -raw.ctypes.data % 64
        if comm.allreduce(offset, op=MPI.MAX) != comm.allreduce(offset, op=MPI.MIN):
            raise RuntimeError("the shared window is mapped at differently aligned addresses on the ranks")
    except BaseException:
        win.Free()
        raise
    return win, raw[offset:offset + total]



class SlotWindow:
    """One shared window on `comm` (all ranks on one node) laid out as [control block][`rows` slots of
    `stride` float32, whole 4 KiB pages each][result of `result_floats` float32]: `ctrl` (int64), `slots`
    (rows, stride) and `result` are numpy views of it on every rank. Collective.

    First touch: each rank zeroes its own slots (rows rank, rank + n, ...: their pages land on its NUMA node),
    rank 0 the control block and the result. own_comm: free `comm` too on close (one made for this window)."""

    CTRL_PAD_BYTES = 4096

    def __init__(self, comm, rows: int, stride: int, result_floats: int, own_comm: bool = False):
        self.comm = comm
        self.own_comm = own_comm
        rank, n = comm.Get_rank(), comm.Get_size()
        ctrl_bytes, ctrl_pad = N_FIELDS * LINE * 8, self.CTRL_PAD_BYTES
        total = ctrl_pad + (rows * stride + result_floats) * 4
        self._win, raw = allocate_shared(comm, total)
        self.ctrl = raw[:ctrl_bytes].view(np.int64)
        self.slots = raw[ctrl_pad:ctrl_pad + rows * stride * 4].view(np.float32).reshape(rows, stride)
        self.result = raw[ctrl_pad + rows * stride * 4:].view(np.float32)
        self.slots[rank::n].fill(0.0)
        if rank == 0:
            self.ctrl.fill(0)
            self.result.fill(0.0)
        comm.Barrier()

    def close(self) -> None:
        """Idempotent. Drops the views first (nothing may touch the memory after Win.Free); frees the window
        (and an own communicator) only when every rank closes (closing_collectively)."""
        self.ctrl = self.slots = self.result = None
        win, self._win = self._win, None
        if win is None or not closing_collectively():
            return
        win.Free()
        if self.own_comm:
            self.comm.Free()


def warm_kernels() -> None:
    """Compile (or load from numba's cache) the wait and arrival kernels on a private control block."""
    ctrl = np.zeros(N_FIELDS * LINE, np.int64)
    arrive(ctrl, F_ARRIVE, 1)
    wait_field(ctrl, F_ARRIVE, 1, 0, 0, WAIT_SLICE_NS)
    publish_result(ctrl)
    copy_prefix(np.zeros(4, np.float32), np.ones(4, np.float32), 4)
