"""Distributed set-up: ranks, nodes, oversubscription, collective decisions, aborts.

Everything here talks MPI; the numerics never do. Three rules shape it:
- All ranks decide together: a user error found on any rank makes every rank
  exit 2, and rank 0 alone prints the one line (`agree`).
- A bug aborts the whole job rather than hanging it (`abort_on_bug`): one
  rank's traceback, then MPI_Abort, which makes the launcher kill the others.
- Ranks that outnumber cores must not spin while they wait, or they steal the
  core that the rank they wait for needs (`wait_for` yields the core).
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


def wait_for(request, yield_core: bool) -> None:
    """Complete a non-blocking MPI request; when ranks outnumber cores, give the core away between polls."""
    if not yield_core:
        request.Wait()
        return
    test = request.Test
    while not test():
        os.sched_yield()


def setup(comm=None, pretend_nodes: int = 0, wait: str = "auto", folds: int = 1) -> Dist:
    """Build the rank/node picture of `comm` (default COMM_WORLD); collective."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if comm is None:
        comm = world
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
    """Compile the numba kernels on one rank per node while the others wait without spinning, then all
    load them from numba's on-disk cache: a cold start of 12 ranks compiles once, not 12 times at once."""
    if dist.node_rank == 0:
        warm()
    wait_for(dist.node.Ibarrier(), True)
    if dist.node_rank != 0:
        warm()


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
