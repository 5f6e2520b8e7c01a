"""Race modes: the paper's lock-free gradient accumulation, its lossless baseline, and Hogwild!.

The paper's OpenMP threads add their per-sample gradients into ONE shared accumulator without a lock
(`acc[i] += g[i]`, a non-atomic read-modify-write), then take one SGD step. Here every MPI rank plays a
thread. docs/race.md is the long version; this is the design in brief.

--mode race     every rank adds its gradient into one accumulator with a non-atomic read-modify-write;
                then all ranks synchronise, copy the (possibly lossy) sum into `grads` and take the same
                SGD step, so the replicas stay identical.
    window 'shared'  (one node) MPI.Win.Allocate_shared on the node communicator; the add is a numba loop
                     of plain loads and stores, `acc[i] = acc[i] + g[i]` (`racy_add`).
    window 'rma'     (any layout) MPI.Win.Allocate, memory on rank 0 only; the add is Get -> Flush ->
                     local add -> Put -> Flush inside a shared passive-target epoch. Concurrent Get/add/Put
                     sequences of different ranks interleave and the later Put overwrites the earlier.
    'auto'           shared when every rank is on one node (dist.n_nodes == 1), else rma.
--mode atomic   the same windows, but the add is MPI_Accumulate(SUM), atomic per element: no update is
                lost. It prices one-sided communication separately from the effect of the race.
--mode hogwild  Hogwild!: the parameters themselves live in a node-shared window (bind() returns its
                numpy view), reduce() does nothing, and every rank's optimizer.step writes its own update
                into the shared parameters without lock or barrier. One node only.

Accumulators and why one barrier per step suffices
    The window holds THREE accumulators A[0..2] (each 64-byte aligned). Call s of reduce() (s = 0, 1, ...):

        add own gradient into A[s % 3]          (racy, or Accumulate)
        [Win.Sync]  barrier_s  [Win.Sync]       (the step's one synchronisation: a shared-memory counter
                                                 with futex waits; 'rma': a core-yielding Ibarrier)
        grads[:] = A[s % 3]                     (every rank reads the same sum)
        owner (rank 0) resets A[(s + 2) % 3]    (to -0.0, see below)

    A[(s+2) % 3] = A[(s-1) % 3] was read by every rank in call s-1, and each rank's read precedes (program
    order) its entry into barrier_s; the owner resets it after leaving barrier_s, so nobody reads it any more.
    It is next added into in call s+2, which every rank starts only after leaving barrier_{s+1}; the owner
    enters barrier_{s+1} only after its reset (program order, + Win.Sync / Flush), so the reset is complete
    and visible before anyone adds. Two alternating accumulators cannot do this with one barrier: the buffer
    read in call s is re-used in call s+2, and the only barrier between the last read (before barrier_{s+1})
    and the first add (after barrier_{s+1}) is that one barrier, which leaves no moment for the reset; a rank
    resetting right after barrier_{s+1} can wipe the early adds of a faster rank (a lost update that is the
    exchange's bug, not the race). A third buffer gives the reset a whole step.

    The reset value is -0.0, the exact additive identity of IEEE floats (-0.0 + x == x bit for bit, also for
    x = +0.0 and -0.0), so with one rank the race and atomic modes return the gradient bit for bit.

Memory model
    One passive-target epoch per window, Lock_all(MPI.MODE_NOCHECK), opened where the window is created and
    closed (Unlock_all) where it is freed (`_Accumulators`). Shared window: stores, Win.Sync, barrier,
    Win.Sync, loads: the MPI-3 recipe for load/store communication in a shared window (unified model).
    RMA window: every access, the owner's resets included, is an RMA call completed by Win.Flush before the
    barrier. MPI leaves the outcome of concurrent conflicting accesses undefined (that is the race being
    studied); on x86 and MPICH it is per-element lost updates, which the audit measures.

Race audit (--race-audit, docs/race.md): alongside the racy exchange the ranks Gather their own gradients
(copies taken before the racy add) to rank 0, which computes the exact sum in float64 and the step's
relative L2 error, fraction of elements that differ beyond float32 rounding, and the number of lost
contributions (`audit_figures`). The time spent is `excluded_s`; drain_audit() hands the rows out on rank 0.

close() frees the windows; it is idempotent and, while an exception other than an agreed SystemExit is
propagating, skips the collective Win.Free (the job is about to be aborted and another rank may never
arrive), like the shm exchange.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from .. import dist as _dist
from ..errors import UserError
from ..modes import ONE_SIDED_MODES
from .interface import Exchange
from .primitives import F_ARRIVE, PH_FINISHED, PH_START, WAIT_SLICE_NS, SlotWindow, arrive, closing_collectively, drive
from .primitives import round_up, wait_field, wait_settings
from .primitives import warm_kernels as _warm_primitives

ALIGN = 16           # float32 elements per 64-byte cache line: each accumulator starts on a line
SLOTS = 3            # rotating accumulators (see the module docstring)
OWNER = 0            # rank (of the window's communicator) that holds the accumulators
UNIT_ROUNDOFF = 2.0 ** -24   # float32 unit roundoff u
TINY = 2.0 ** -149           # smallest float32 subnormal: bounds the absolute error of an underflowing add
MAX_EXACT_RANKS = 16         # up to this many ranks the lost-count estimator searches every subset


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def racy_add(acc, g):
    """acc[i] = acc[i] + g[i]: plain loads and stores, no atomics, no lock. Run by several processes on
    the same shared `acc` at once, interleaved read-modify-writes lose updates: that is the race."""
    for i in range(acc.shape[0]):
        acc[i] = acc[i] + g[i]


@njit(cache=True)
def _masks_by_popcount(n):
    """All non-empty subsets of n ranks as bit masks, fewest members first; and the popcount of each."""
    total = 1 << n
    pop = np.zeros(total, np.int64)
    for m in range(1, total):
        pop[m] = pop[m >> 1] + (m & 1)
    order = np.empty(total - 1, np.int64)
    k = 0
    for size in range(1, n + 1):
        for m in range(1, total):
            if pop[m] == size:
                order[k] = m
                k += 1
    return order, pop


@njit(cache=True)
def _lower_bound(c, d, tol):
    """Fewest contributions whose magnitudes can add up to |d| - tol: a lower bound on any explaining set."""
    mags = np.sort(np.abs(c))[::-1]
    need = abs(d) - tol
    acc = 0.0
    for k in range(mags.shape[0]):
        acc += mags[k]
        if acc >= need:
            return k + 1
    return mags.shape[0]


@njit(cache=True)
def _count_lost(contrib, deficit, tol, out):
    """For each element e (a row of contrib: the n ranks' contributions, float64) whose racy sum misses
    `deficit[e]` (beyond `tol[e]`), the size of the smallest set of contributions whose sum equals the
    deficit within tol: the fewest lost contributions that explain the racy value. Exhaustive over all
    2^n subsets for n <= MAX_EXACT_RANKS, else (or when no subset fits) the magnitude lower bound."""
    m, n = contrib.shape
    if m == 0:
        return
    exact = n <= MAX_EXACT_RANKS
    order, pop = _masks_by_popcount(n if exact else 1)
    sums = np.zeros(1 << (n if exact else 1))
    for e in range(m):
        d = deficit[e]
        t = tol[e]
        found = -1
        if exact:
            for mask in range(1, 1 << n):
                low = mask & (-mask)
                bit = 0
                while (1 << bit) != low:
                    bit += 1
                sums[mask] = sums[mask ^ low] + contrib[e, bit]
            for j in range(order.shape[0]):
                mask = order[j]
                if abs(sums[mask] - d) <= t:
                    found = pop[mask]
                    break
        if found < 0:
            found = _lower_bound(contrib[e], d, t)
        out[e] = found


def summation_tolerance(abs_sum: np.ndarray, n: int) -> np.ndarray:
    """Largest error of a float32 sum of n terms in any order, element-wise: gamma_n * sum|x| (Higham's
    bound for recursive summation, gamma_n = n u / (1 - n u)) plus n half-ulps of the smallest subnormal."""
    gamma = n * UNIT_ROUNDOFF / (1.0 - n * UNIT_ROUNDOFF)
    return gamma * abs_sum + n * TINY


def lost_per_element(contrib: np.ndarray, racy: np.ndarray, tol: np.ndarray | None = None) -> tuple:
    """Per element: the float64 deficit (exact - racy), the tolerance, whether it differs, and the estimated
    number of lost contributions (0 where it does not differ). contrib: (n, P) per-rank contributions;
    racy: (P,) the racy sum; tol: per-element tolerance (default `summation_tolerance`)."""
    c64 = np.asarray(contrib, dtype=np.float64)
    n = c64.shape[0]
    exact = c64.sum(axis=0)
    deficit = exact - np.asarray(racy, dtype=np.float64)
    if tol is None:
        tol = summation_tolerance(np.abs(c64).sum(axis=0), n)
    differ = np.abs(deficit) > tol
    lost = np.zeros(c64.shape[1], np.int64)
    idx = np.flatnonzero(differ)
    if idx.size:
        sub = np.ascontiguousarray(c64[:, idx].T)
        counts = np.zeros(idx.size, np.int64)
        _count_lost(sub, np.ascontiguousarray(deficit[idx]), np.ascontiguousarray(tol[idx]), counts)
        lost[idx] = counts
    return exact, deficit, tol, differ, lost


def _figures(exact, deficit, differ, lost) -> tuple:
    norm_exact = float(np.linalg.norm(exact))
    norm_deficit = float(np.linalg.norm(deficit))
    if norm_deficit == 0.0:
        rel = 0.0
    elif norm_exact == 0.0:
        rel = math.inf
    else:
        rel = norm_deficit / norm_exact
    frac = float(differ.mean()) if differ.size else 0.0
    return rel, frac, int(lost.sum())


def audit_figures(contrib: np.ndarray, racy: np.ndarray) -> tuple:
    """(rel_l2_error, frac_elements_differ, lost_contributions) of a racy sum against the exact one.

    rel_l2_error          ||exact - racy|| / ||exact||, exact = float64 sum of the contributions; includes
                          float32 rounding (<= gamma_n * || sum_r |g_r| || / ||exact||) even when nothing is lost
    frac_elements_differ  fraction of elements where |exact - racy| exceeds the float32 summation bound
                          gamma_n * sum_r |g_r,i|, i.e. cannot be explained by summation order
    lost_contributions    sum over differing elements of the fewest per-rank contributions whose loss
                          explains the deficit (see docs/race.md: a lower bound, exact for generic values)
    """
    exact, deficit, _, differ, lost = lost_per_element(contrib, racy)
    return _figures(exact, deficit, differ, lost)


def hogwild_scale(p_before: np.ndarray, p_after: np.ndarray, grads: np.ndarray, top: int = 4096) -> tuple:
    """Estimate the SGD scale s of one Hogwild step, p_after ~ p_before - s * sum_{surviving r} g_r, without
    knowing lr or the batch: every element i votes with the candidates -dp_i / sum_r g_r,i (nothing lost) and
    -dp_i / g_r,i (only rank r's update survived, the lock-step case); candidates from elements where the
    updates dominate float32 rounding (the `top` largest sum_r |g_r,i| / |p_i|) are clustered in log scale
    and the densest cluster's median is s. Returns (s, relative uncertainty), or (nan, nan) if nothing moved."""
    dp = p_after.astype(np.float64) - p_before.astype(np.float64)
    g = np.asarray(grads, dtype=np.float64)
    weight = np.abs(g).sum(axis=0) / (np.abs(p_before.astype(np.float64)) + 1e-30)
    weight[~np.isfinite(dp) | (dp == 0.0) | ~np.isfinite(weight)] = 0.0
    chosen = np.flatnonzero(weight > 0)
    if chosen.size == 0:
        return math.nan, math.nan
    if chosen.size > top:
        chosen = chosen[np.argsort(weight[chosen])[-top:]]
    denominators = np.concatenate([g[:, chosen].sum(axis=0)[None, :], g[:, chosen]], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = -dp[chosen][None, :] / denominators
    candidates = candidates[np.isfinite(candidates) & (candidates > 0)]
    if candidates.size == 0:
        return math.nan, math.nan
    logs = np.sort(np.log(candidates))
    width = 1e-5                                   # relative half-width of a cluster
    right = np.searchsorted(logs, logs + 2 * width, side="right")
    counts = right - np.arange(logs.size)
    best = int(np.argmax(counts))
    cluster = logs[best:right[best]]
    s = float(np.exp(np.median(cluster)))
    spread = float(np.exp(cluster[-1] - cluster[0]) - 1.0)
    return s, max(4 * UNIT_ROUNDOFF, spread)


def hogwild_audit_figures(p_before: np.ndarray, p_after: np.ndarray, grads: np.ndarray) -> tuple:
    """(rel_l2_error, frac_elements_differ, lost_contributions) of one Hogwild step (momentum 0).

    Every rank r applied u_r = -s * g_r to the shared params (s = lr, or lr / batch), racily. The expected
    change is sum_r u_r; the actual one p_after - p_before. s is estimated from the data (`hogwild_scale`),
    so the exchange needs neither the lr schedule nor the batch; the tolerance per element covers float32
    rounding of n updates of a parameter of size |p| and the uncertainty of s.
    Figures as in `audit_figures`, with parameter updates in place of gradients."""
    n = grads.shape[0]
    g64 = np.asarray(grads, dtype=np.float64)
    s, rel_s = hogwild_scale(p_before, p_after, g64)
    if not math.isfinite(s):
        return 0.0, 0.0, 0
    updates = -s * g64                       # u_r, float64
    pb = np.abs(p_before.astype(np.float64))
    pa = np.abs(p_after.astype(np.float64))
    abs_u = np.abs(updates).sum(axis=0)
    tol = (2 * (n + 2) * UNIT_ROUNDOFF * (pb + pa + abs_u) + rel_s * abs_u + (n + 2) * TINY)
    # the "racy sum" of the updates is the change the params actually saw
    racy = p_after.astype(np.float64) - p_before.astype(np.float64)
    exact, deficit, _, differ, lost = lost_per_element(updates, racy, tol)
    return _figures(exact, deficit, differ, lost)


def warm_kernels() -> None:
    """Compile (or load from numba's cache) every kernel once, before the first step."""
    _warm_primitives()
    acc = np.full(4, -0.0, np.float32)
    racy_add(acc, np.ones(4, np.float32))
    contrib = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]]).T.copy()  # (3 ranks, 2 elements)
    audit_figures(contrib.astype(np.float32), np.array([3.0, 7.0], np.float32))
    _count_lost(np.ones((1, 20)), np.ones(1), np.zeros(1), np.zeros(1, np.int64))


# ----------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------

class _Accumulators:
    """`slots` buffers of n float32 in one MPI window on `comm`, memory on rank OWNER.

    kind 'shared': MPI.Win.Allocate_shared; every rank maps the owner's memory (`view`) and uses loads and
    stores. kind 'rma': MPI.Win.Allocate; only RMA calls touch it. The window's one passive-target epoch,
    Lock_all(MODE_NOCHECK) (every access is 'shared', nobody locks exclusively), opens here and closes in
    free(): the one place epochs are opened and closed."""

    def __init__(self, comm, n: int, kind: str, slots: int = SLOTS, wait=None, *, dist):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.is_owner = self.rank == OWNER
        self.kind = kind
        self.n = int(n)
        self.stride = round_up(max(self.n, 1), ALIGN)
        self.slots = slots
        self._wait = wait or (lambda req: req.Wait())
        nbytes = slots * self.stride * 4 if self.is_owner else 0
        self.view = None
        self._locked = False
        if kind == "shared":
            self.win = MPI.Win.Allocate_shared(nbytes, 4, comm=comm)
            buf, _ = self.win.Shared_query(OWNER)
            self.view = np.frombuffer(buf, dtype=np.float32, count=slots * self.stride).reshape(slots, self.stride)
        elif kind == "rma":
            self.win = MPI.Win.Allocate(nbytes, 4, comm=comm)
        else:
            raise ValueError(f"unknown window kind {kind!r}")
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._locked = True
        # The shared window's ranks are all on one node: they meet at the step's barrier through a counter
        # in shared memory (the primitives' futex waits) instead of MPI_Ibarrier polled with sched_yield,
        # which cost ~14 ms a step at 12 ranks on 2 cores (every rank must run to progress MPI's barrier).
        self._counter = None
        if kind == "shared":
            self._counter = SlotWindow(comm, 0, 0, 0)  # the control block alone
            _, self._spin_ns, self._yields = wait_settings(dist)
            self._size = comm.Get_size()
            self._barriers = 0
        self._neg_zero = np.full(self.n, -0.0, np.float32) if (self.is_owner and kind == "rma") else None
        if self.is_owner:
            for slot in range(slots):
                self.reset(slot)
        self.barrier()

    # -- the phases of a step --
    def _target(self, slot: int) -> tuple:
        return (slot * self.stride, self.n, self.MPI.FLOAT)

    def add_racy(self, slot: int, g: np.ndarray, tmp: np.ndarray) -> None:
        if self.kind == "shared":
            racy_add(self.view[slot, : self.n], g)
        else:  # Get -> local add -> Put: non-atomic, concurrent sequences overwrite each other
            self.win.Get(tmp, OWNER, target=self._target(slot))
            self.win.Flush(OWNER)
            racy_add(tmp, g)
            self.win.Put(tmp, OWNER, target=self._target(slot))
            self.win.Flush(OWNER)

    def add_atomic(self, slot: int, g: np.ndarray) -> None:
        self.win.Accumulate(g, OWNER, target=self._target(slot), op=self.MPI.SUM)
        self.win.Flush(OWNER)

    def barrier(self) -> float:
        """Make this rank's writes visible, wait for every rank, see theirs; returns the seconds waited."""
        if self.kind == "rma":
            t0 = time.perf_counter()
            self._wait(self.comm.Ibarrier())
            return time.perf_counter() - t0
        self.win.Sync()
        self._barriers += 1
        target = self._barriers * self._size  # the counter is never reset: barrier b completes at b x size
        ctrl = self._counter.ctrl
        arrive(ctrl, F_ARRIVE, target)
        waited_ns, _ = drive(lambda _: wait_field(ctrl, F_ARRIVE, target, self._spin_ns, self._yields, WAIT_SLICE_NS),
                             PH_START, PH_FINISHED)
        self.win.Sync()
        return waited_ns * 1e-9

    def read(self, slot: int, out: np.ndarray) -> None:
        if self.kind == "shared":
            out[:] = self.view[slot, : self.n]
        else:
            self.win.Get(out, OWNER, target=self._target(slot))
            self.win.Flush(OWNER)

    def reset(self, slot: int) -> None:
        """Owner only: the slot back to -0.0 (the additive identity)."""
        if self.kind == "shared":
            self.view[slot].fill(-0.0)
        else:
            self.win.Put(self._neg_zero, OWNER, target=self._target(slot))
            self.win.Flush(OWNER)

    def free(self) -> None:
        """Idempotent; the collective frees only when every rank closes (primitives.closing_collectively)."""
        self.view = None
        win, self.win = self.win, None
        if win is None:
            return
        if self._locked:
            self._locked = False
            win.Unlock_all()   # local: completes this rank's RMA calls, no communication with other ranks
        if closing_collectively():
            win.Free()
        if self._counter is not None:
            self._counter.close()


# ----------------------------------------------------------------------------------------------------
# Exchanges
# ----------------------------------------------------------------------------------------------------

class _AuditLog:
    """Rank 0's per-step audit rows until drain_audit() hands them out."""

    def __init__(self):
        self.rows = []

    def add(self, step, rel, frac, lost) -> None:
        self.rows.append((step, rel, frac, lost))

    def drain(self) -> dict | None:
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        step, rel, frac, lost = zip(*rows)
        return {"step": np.asarray(step, np.int64), "rel_l2_error": np.asarray(rel, np.float64),
                "frac_elements_differ": np.asarray(frac, np.float64),
                "lost_contributions": np.asarray(lost, np.float64)}


class _AccumulatorExchange(Exchange):
    """What race, atomic and hogwild share: float32 params, an _Accumulators window, rank 0's audit rows,
    an idempotent close."""

    lossless = False
    deterministic = False

    def __init__(self, dist, n_params: int, audit: bool):
        self._dist = dist
        self._n = int(n_params)
        self._audit = bool(audit)
        self._audit_log = _AuditLog()
        self._calls = 0
        self.first_step = 0     # step number of the first reduce() (a resumed run may set it)
        self._closed = False
        self.excluded_s = 0.0

    def _check_params(self, params: np.ndarray) -> None:
        if params.dtype != np.float32 or params.shape != (self._n,):
            raise TypeError(f"{self.name} exchange expects float32 params of shape ({self._n},), "
                            f"got {params.dtype} {params.shape}")

    def drain_audit(self) -> dict | None:
        return self._audit_log.drain() if self._dist.is_root else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._acc.free()


class OneSidedExchange(_AccumulatorExchange):
    """--mode race (op='race') and --mode atomic (op='atomic') over a 'shared' or 'rma' window."""

    replicas_agree = True

    def __init__(self, dist, n_params: int, op: str = "race", window: str = "shared", audit: bool = False,
                 dtype=np.float32):
        if op not in ONE_SIDED_MODES:
            raise ValueError(f"unknown one-sided op {op!r}")
        if np.dtype(dtype) != np.float32:
            raise ValueError("the race windows hold float32 gradients")
        super().__init__(dist, n_params, audit)
        self.name = op
        self.op = op
        self.window = window
        self.lossless = op == "atomic"
        self._comm = dist.node if window == "shared" else dist.comm
        self._acc = _Accumulators(self._comm, self._n, window, wait=dist.wait, dist=dist)
        self._tmp = np.empty(self._n, np.float32) if (window == "rma" and op == "race") else None
        self._own = np.empty(self._n, np.float32) if self._audit else None
        self._gathered = (np.empty((dist.size, self._n), np.float32)
                          if (self._audit and dist.is_root) else None)

    def bind(self, params: np.ndarray) -> np.ndarray:
        self._check_params(params)
        return params

    def reduce(self, grads: np.ndarray) -> float:
        acc = self._acc
        slot = self._calls % SLOTS
        audit_s = 0.0
        if self._audit:
            t = time.perf_counter()
            self._own[:] = grads
            audit_s += time.perf_counter() - t
        if self.op == "race":
            acc.add_racy(slot, grads, self._tmp)
        else:
            acc.add_atomic(slot, grads)
        waited = acc.barrier()
        acc.read(slot, grads)
        if acc.is_owner:
            acc.reset((slot + 2) % SLOTS)  # read by everyone in the previous call, before this barrier
        step = self.first_step + self._calls
        self._calls += 1
        if self._audit:
            audit_s += self._run_audit(step, grads)
        self.excluded_s = audit_s
        return waited

    def _run_audit(self, step: int, racy: np.ndarray) -> float:
        """Gather every rank's own gradient to rank 0, compare with the racy sum, align all ranks again."""
        t = time.perf_counter()
        comm = self._dist.comm
        comm.Gather(self._own, self._gathered, root=0)
        if self._dist.is_root:
            self._audit_log.add(step, *audit_figures(self._gathered, racy))
        self._dist.wait(comm.Ibarrier())  # everyone leaves together: rank 0's analysis is not a wait later
        return time.perf_counter() - t


class HogwildExchange(_AccumulatorExchange):
    """--mode hogwild: params in a node-shared window, updated by every rank without lock or barrier."""

    name = "hogwild"
    window = "shared"
    # There is one copy of the params, so replicas cannot disagree; but ranks reach the trainer's checksum
    # at different moments while others are still writing their update, so a checksum comparison would
    # fail spuriously. False tells the trainer to skip it.
    replicas_agree = False

    def __init__(self, dist, n_params: int, audit: bool = False):
        if dist.n_nodes != 1:
            raise ValueError("hogwild needs every rank on one node")
        super().__init__(dist, n_params, audit)
        self._acc = _Accumulators(dist.node, self._n, "shared", slots=1, wait=dist.wait, dist=dist)
        self._params = None
        self._prev = None            # rank 0, audit: (step, params at the previous reduce, gathered grads)
        self._gathered = None

    def bind(self, params: np.ndarray) -> np.ndarray:
        self._check_params(params)
        acc = self._acc
        if acc.is_owner:
            acc.view[0, : self._n] = params
        acc.barrier()
        self._params = acc.view[0, : self._n]
        return self._params

    def reduce(self, grads: np.ndarray) -> float:
        step = self.first_step + self._calls
        self._calls += 1
        if not self._audit:
            self.excluded_s = 0.0
            return 0.0
        t = time.perf_counter()
        dist = self._dist
        self._acc.barrier()           # every rank's update of the previous step is in the params
        if dist.is_root and self._gathered is None:
            self._gathered = np.empty((dist.size, self._n), np.float32)
        if dist.is_root:
            now = self._params.copy()
            if self._prev is not None:
                prev_step, prev_params, prev_grads = self._prev
                self._audit_log.add(prev_step, *hogwild_audit_figures(prev_params, now, prev_grads))
        dist.comm.Gather(np.ascontiguousarray(grads), self._gathered, root=0)
        if dist.is_root:
            self._prev = (step, now, self._gathered.copy())
        self._acc.barrier()           # nobody writes this step's update before rank 0's snapshot
        self.excluded_s = time.perf_counter() - t
        return 0.0

    def close(self) -> None:
        self._params = None
        super().close()


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------

def choose_window(mode: str, race_window: str, n_nodes: int) -> str:
    """The window a mode runs on; UserError naming the flag when the choice cannot work."""
    if mode == "hogwild":
        if race_window == "rma":
            raise UserError("--race-window", "'rma' does not apply to --mode hogwild, whose params live in "
                            "node shared memory; use 'auto' or 'shared'")
        if n_nodes > 1:
            raise UserError("--mode", f"hogwild keeps the params in one node's shared memory, but the ranks "
                            f"span {n_nodes} nodes; run it on one node (or use --mode race)")
        return "shared"
    if race_window == "auto":
        return "shared" if n_nodes == 1 else "rma"
    if race_window == "shared" and n_nodes > 1:
        raise UserError("--race-window", f"'shared' needs every rank on one node, but the ranks span "
                        f"{n_nodes} nodes; use 'rma' or 'auto'")
    return race_window


def make_race_exchange(config, dist, n_params: int) -> Exchange:
    """The exchange for --mode race / atomic / hogwild. Collective: a mistake ends every rank with one line."""
    window = None
    with _dist.collective_check(dist.comm):
        window = choose_window(config.mode, config.race_window, dist.n_nodes)
        if config.mode == "hogwild" and config.race_audit and config.momentum != 0:
            raise UserError("--race-audit", "the Hogwild audit compares each step's parameter change with "
                            "lr x the gathered gradients, which needs --momentum 0")
    _dist.compile_once(dist, warm_kernels)
    if config.mode == "hogwild":
        return HogwildExchange(dist, n_params, audit=config.race_audit)
    if config.mode in ONE_SIDED_MODES:
        return OneSidedExchange(dist, n_params, op=config.mode, window=window, audit=config.race_audit)
    raise ValueError(f"not a race mode: {config.mode!r}")
