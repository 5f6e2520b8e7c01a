"""Distributed set-up: ranks, nodes, oversubscription, collective decisions, aborts.

Everything here talks MPI; the numerics never do. Three rules shape it:
- All ranks decide together: a user error found on any rank makes every rank
  exit 2, and rank 0 alone prints the one line (`agree`).
- A bug aborts the whole job rather than hanging it (`abort_on_bug`): one
  rank's traceback, then MPI_Abort, which makes the launcher kill the others.
- Ranks that outnumber cores must not spin while they wait, or they steal the
  core that the rank they wait for needs (`wait_for` yields the core between
  steps; `wait_idle` sleeps through start-up waits, which last seconds).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from .errors import EXIT_USER_ERROR, UserError, print_user_error

THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads() -> None:
    """One compute thread per rank unless the user set otherwise; must run before numpy/numba load."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")


def _affinity() -> set:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(_affinity())


@dataclass
class Dist:
    world: object          # MPI.COMM_WORLD
    comm: object           # the communicator this replica group trains on (world, or a fold's group)
    rank: int              # rank in comm
    size: int              # ranks in comm
    node: object           # ranks of comm that share memory (or a pretend node)
    node_rank: int
    node_size: int
    n_nodes: int
    leaders: object        # one rank per node (node_rank 0), MPI.COMM_NULL elsewhere
    hostnames: list        # hostname of every rank of comm
    cores: int             # cores usable by this host's ranks together
    oversubscribed: bool   # more ranks on this node than cores
    yield_when_waiting: bool
    pretend_nodes: bool = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def wait(self, request) -> None:
        wait_for(request, self.yield_when_waiting)

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier())

    def wait_on_rank0(self, request, writing: bool = False) -> None:
        """Complete a request that may wait on rank 0 writing the log: with more ranks than cores, yield
        for a moment (the usual wait is that short), then sleep, so that rank 0 gets the cores. `writing`:
        rank 0 is known to be writing (the closing write, milliseconds): sleep at once, since yielding
        ranks on oversubscribed cores would still take most of their time from rank 0."""
        if not self.yield_when_waiting:
            request.Wait()
            return
        test, spin_until = request.Test, time.perf_counter() + (0.0 if writing else YIELD_BEFORE_NAPS_S)
        while not test():
            if time.perf_counter() > spin_until:
                wait_idle(request, first_nap_s=2e-4, longest_nap_s=2e-3)
                return
            os.sched_yield()


# How long a waiting rank yields before it naps (wait_on_rank0): a window's agreement normally completes
# within it; a wait for rank 0's log write (tens of ms) then leaves the cores to rank 0.
YIELD_BEFORE_NAPS_S = 0.002


def wait_for(request, yield_core: bool) -> None:
    """Complete a non-blocking MPI request; when ranks outnumber cores, give the core away between polls."""
    if not yield_core:
        request.Wait()
        return
    test = request.Test
    while not test():
        os.sched_yield()


def wait_idle(request, poll=None, first_nap_s: float = 1e-4, longest_nap_s: float = 0.01) -> None:
    """Complete a request that may take seconds (another rank compiling or loading) using next to no CPU.

    MPI's own Wait polls at full speed in both MPICH and Open MPI, and Test + sched_yield still costs a
    system call per turn: eleven such ranks on two cores took the compiler's cores from it. So sleep
    between tests, in naps growing from first_nap_s to longest_nap_s (a wake-up costs ~20 us, so a 2 s
    wait costs ~5 ms of CPU, and the wait ends at most longest_nap_s after the request completes).
    poll, if given, runs between tests (rank 0 counts finished kernels there)."""
    nap = first_nap_s
    while not request.Test():
        if poll is not None:
            poll()
        time.sleep(nap)
        nap = min(nap * 1.5, longest_nap_s)


def arrive(comm) -> None:
    """Wait, asleep (wait_idle), until every rank of comm has come here. Before a blocking collective that
    ranks reach at different times during start-up: MPI's blocking calls poll at full speed, so the early
    ranks would take the cores from the late ones still importing, loading or writing."""
    wait_idle(comm.Ibarrier())


def setup(comm=None, pretend_nodes: int = 0, wait: str = "auto", folds: int = 1) -> Dist:
    """Build the rank/node picture of `comm` (default COMM_WORLD); collective."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if comm is None:
        comm = world
    arrive(comm)  # the ranks come out of their imports and MPI's init at different times
    rank, size = comm.Get_rank(), comm.Get_size()
    if pretend_nodes > 0:
        # Contiguous blocks of ranks play separate nodes, so the multi-node paths run on one machine.
        per_node = -(-size // pretend_nodes)
        node = comm.Split(rank // per_node, rank)
    else:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    node_rank, node_size = node.Get_rank(), node.Get_size()
    leaders = comm.Split(0 if node_rank == 0 else MPI.UNDEFINED, rank)
    n_nodes = comm.allreduce(1 if node_rank == 0 else 0)
    # Pretend nodes still share the real machine's cores: count every rank on this host, and the cores
    # of all of them together (a launcher that binds each rank to one core leaves each seeing only its own).
    host_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    ranks_on_host = host_comm.Get_size()
    cores = len(set().union(*host_comm.allgather(_affinity())))
    host_comm.Free()
    oversubscribed = comm.allreduce(int(ranks_on_host > cores), op=MPI.MAX) == 1
    yield_core = {"spin": False, "yield": True, "auto": oversubscribed}[wait]
    hostnames = comm.allgather(socket.gethostname())
    return Dist(world=world, comm=comm, rank=rank, size=size, node=node, node_rank=node_rank,
                node_size=node_size, n_nodes=n_nodes, leaders=leaders, hostnames=hostnames, cores=cores,
                oversubscribed=oversubscribed, yield_when_waiting=yield_core, pretend_nodes=pretend_nodes > 0)


def agree(comm, error: UserError | None) -> None:
    """Collective: if any rank holds a user error, rank 0 prints the first one and every rank exits 2."""
    line = error.line() if error is not None else None
    arrive(comm)  # rank 0 checks more (the log path, a checkpoint) than the others: they sleep meanwhile
    lines = comm.allgather(line)
    failed = [text for text in lines if text is not None]
    if not failed:
        return
    if comm.Get_rank() == 0:
        print(failed[0], file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


@contextlib.contextmanager
def collective_check(comm):
    """Run a block on every rank; a UserError on any of them ends all ranks together with exit 2."""
    error = None
    try:
        yield
    except UserError as err:
        error = err
    agree(comm, error)


def compile_once(dist: Dist, warm) -> None:
    """Compile numba kernels on one rank per node while the others wait without using CPU, then all
    load them from numba's on-disk cache: a cold start of 12 ranks compiles once, not 12 times at once."""
    compile_in_parallel(dist, [[warm]])


_TASK_DONE_TAG = 7317
# A compile phase lasts seconds: a waiting rank that naps up to 50 ms (not wait_idle's 10) ends its wait at
# most 50 ms late and wakes a fifth as often; ten waiting ranks' wake-ups took ~8 of a cold 12-rank job's
# ~50 CPU s on this 2-core machine under load.
_COMPILE_NAP_S = 0.05


def compile_in_parallel(dist: Dist, phases, on_task_done=None, load_phases=None) -> None:
    """Compile a plan of kernels across the node's ranks, then have every rank load all of it.

    phases: a list of phases, each a list of callables (tasks) that compile independent sets of kernels
    into numba's on-disk cache; a phase starts when every task of the one before has finished (later
    tasks load what earlier ones compiled). Within a phase, task i runs on node rank i mod w, w = the
    node's ranks or its cores, whichever is fewer, so w compilers share the cores and the other ranks
    sleep (wait_idle). numba's cache index is rewritten whole by each save, so two tasks of one phase
    must never compile the same function for different argument types (the same types are harmless: the
    same entry). on_task_done(), on node rank 0, is called once per finished task of its node as it
    finishes (the live count). load_phases: the indices of the phases whose tasks every rank then runs to
    load their machine code (default: all; the run needs only its entry points, whose cached code holds
    everything they call). Collective over dist.node."""
    from mpi4py import MPI

    node, me = dist.node, dist.node_rank
    workers = max(1, min(dist.node_size, dist.cores))
    for phase in phases:
        for index, task in enumerate(phase):
            if index % workers != me:
                continue
            task()
            if me == 0:
                if on_task_done is not None:
                    on_task_done()
            else:
                node.send(None, dest=0, tag=_TASK_DONE_TAG)
        if me == 0:
            expected = sum(1 for index in range(len(phase)) if index % workers != 0)
            received = [0]

            def count_finished():
                while received[0] < expected and node.iprobe(source=MPI.ANY_SOURCE, tag=_TASK_DONE_TAG):
                    node.recv(source=MPI.ANY_SOURCE, tag=_TASK_DONE_TAG)
                    received[0] += 1
                    if on_task_done is not None:
                        on_task_done()

            request = node.Ibarrier()
            wait_idle(request, poll=count_finished, longest_nap_s=_COMPILE_NAP_S)
            while received[0] < expected:  # sent before their barrier, so these are due
                node.recv(source=MPI.ANY_SOURCE, tag=_TASK_DONE_TAG)
                received[0] += 1
                if on_task_done is not None:
                    on_task_done()
        else:
            wait_idle(node.Ibarrier(), longest_nap_s=_COMPILE_NAP_S)
    for number in range(len(phases)) if load_phases is None else load_phases:  # a task run here is loaded
        for index, task in enumerate(phases[number]):
            if index % workers != me:
                task()


def abort_on_bug(world, exc: BaseException) -> None:
    """A bug on one rank: print its traceback once and take the whole job down instead of hanging."""
    rank = world.Get_rank()
    sys.stderr.write(f"cnnpar: rank {rank} failed with an unexpected error; aborting all ranks\n")
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()
    time.sleep(0.05)  # let stderr drain before the launcher kills everyone
    world.Abort(1)


def user_error_midrun(world, err: UserError) -> None:
    """A user error found after training started, on one rank only: the others cannot be asked, so abort."""
    print_user_error(err)
    world.Abort(EXIT_USER_ERROR)
