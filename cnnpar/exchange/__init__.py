"""Gradient exchanges: how one step's per-rank gradients become the step's summed gradient.

Every exchange has the same small interface (`Exchange`, in interface.py), so the training loop never
changes when the communication does (mpi4py-demo style: same compute, swappable communication):

    params = exchange.bind(params)   # once; an exchange may move params into shared memory (hogwild)
    exchange.reduce(grads)           # every step, in place: grads becomes the sum over all ranks
    exchange.split_wait(...)         # per logged window: each rank's reduce time as (exchange, wait)
    exchange.close()                 # every exit path; frees windows and communicators

`reduce` returns the seconds this rank spent waiting for the others when the exchange can tell
(shared-memory flags), or NaN when it cannot; then `split_wait` estimates the wait from the ranks' arrival
times.

The package, imports pointing down only (this factory -> one module per exchange -> primitives):
    __init__    choose: the one place that turns --mode and --allreduce (auto included) into an exchange's
                name (the warm-up asks it too); make_exchange builds it
    interface   Exchange
    local       LocalExchange (--mode local)
    mpi         MpiAllreduce (--allreduce mpi)
    shm         ShmAllreduce, HierAllreduce (--allreduce shm, hier)
    factored    FactoredShmAllreduce (--allreduce factored)
    race        OneSidedExchange, HogwildExchange (--mode race, atomic, hogwild)
    primitives  what shm, factored and race share: LLVM atomics, futex waits, the clock, wait policies, the
                control block's layout and the shared window
"""

from __future__ import annotations

from typing import Callable

from ..dist import Dist, collective_check, compile_once
from ..errors import UserError
from ..modes import FACTORED_DTYPE, FACTORED_SAMPLES_PER_RANK, is_race_mode
from .interface import Exchange

__all__ = ["Exchange", "KERNELS", "choose", "make_exchange", "reduces_nothing"]


# The kernels each exchange compiles before its first step (the warm-up compiles them ahead of the run).
KERNELS = {"local": "", "mpi": "", "shm": "shm", "hier": "shm", "factored": "factored", "race": "race"}


def choose(mode: str, allreduce: str, ranks: int, n_nodes: int, max_node_size: Callable[[], int],
           factored_fits: Callable[[], bool]) -> str:
    """The exchange a run gets, as a KERNELS key: 'local', 'race' (every race mode: race.py picks the window),
    or the sync allreduce that --allreduce names, with 'auto' resolved.

    Every choice is MPI_Allreduce for one rank (the sum over one rank is its own gradient). auto: on one node
    'factored' when factored_fits() (one sample per rank: each rank publishes its dense layers' inputs instead
    of their weight gradients, same bits, ~8x less to move) and shm otherwise; hier across nodes (real ones, or
    --pretend-nodes, which exist to run the multi-node path on one machine) when max_node_size() is two or
    more; mpi when every node holds a single rank (hier would only add a copy). The two questions are
    callables because the factory's answers are collectives: each is asked only on the path that needs it,
    which every rank takes alike."""
    if mode == "local":
        return "local"
    if is_race_mode(mode):
        return "race"
    if allreduce == "mpi" or ranks == 1:
        return "mpi"
    if allreduce != "auto":
        return allreduce
    if n_nodes == 1:
        return "factored" if factored_fits() else "shm"
    return "hier" if max_node_size() > 1 else "mpi"


def reduces_nothing(mode: str, ranks: int) -> bool:
    """Whether the exchange `choose` gives does nothing in reduce(): 'local', or MPI_Allreduce over one rank
    (every mode but a race at one rank). The warm-up's forecast of `Exchange.reduces_nothing`."""
    return mode == "local" or (ranks == 1 and not is_race_mode(mode))


def make_exchange(config, dist: Dist, n_params: int, network=None) -> Exchange:
    """The exchange a config asks for (`choose`); modes that need shared memory fall back or refuse clearly.
    Collective: every rank decides the same.

    network: the model being trained; with it, 'auto' (and 'factored') can exchange its dense layers'
    sufficient factors instead of their gradients (factored.py), at one sample per rank."""
    samples_per_rank = getattr(config, "samples_per_rank", 1)

    def max_node_size() -> int:
        from mpi4py import MPI

        return dist.comm.allreduce(dist.node_size, op=MPI.MAX)

    def factored_fits() -> bool:
        from . import factored

        return factored.applies_on_every_rank(dist, network, samples_per_rank)

    kind = choose(config.mode, config.allreduce, dist.size, dist.n_nodes, max_node_size, factored_fits)
    if kind == "local":
        from .local import LocalExchange

        return LocalExchange()
    if kind == "race":
        from . import race

        return race.make_race_exchange(config, dist, n_params)
    return _make_sync(kind, dist, n_params, network, samples_per_rank)


def _make_sync(choice: str, dist: Dist, n_params: int, network, samples_per_rank: int) -> Exchange:
    """--allreduce mpi|shm|factored|hier as `choose` resolved it. Explicit 'shm' and 'factored' work whenever
    all ranks share memory, pretend nodes included; across real nodes that is a user error, as is 'factored'
    where it does not apply."""
    from .mpi import MpiAllreduce

    if choice == "mpi":
        return MpiAllreduce(dist)
    from . import factored, primitives, shm

    if choice == "hier":
        compile_once(dist, shm.warm_kernels)
        return shm.HierAllreduce(dist, n_params)
    host = dist.node if dist.n_nodes == 1 else primitives.shared_memory_comm(dist)
    with collective_check(dist.comm):
        if host is None:
            raise UserError("--allreduce", f"'{choice}' needs all ranks on one node, but the {dist.size} ranks "
                                           f"span {dist.n_nodes} nodes; use 'hier' or 'auto'")
    if choice == "factored":
        with collective_check(dist.comm):
            if not factored.applies_on_every_rank(dist, network, samples_per_rank):
                raise UserError("--allreduce", f"'factored' needs --samples-per-rank {FACTORED_SAMPLES_PER_RANK}, "
                                               f"{FACTORED_DTYPE} and a dense layer after the first layer (its "
                                               f"gradient must be one outer product); use 'shm' or 'auto'")
        return factored.FactoredShmAllreduce(dist, network, comm=host, own_comm=host is not dist.node)
    # Compile on one rank per node, then the others load the kernels from numba's cache (a cold start of 12
    # ranks on 2 cores compiles once, not 12 times at once).
    compile_once(dist, shm.warm_kernels)
    return shm.ShmAllreduce(dist, n_params, comm=host, own_comm=host is not dist.node)
