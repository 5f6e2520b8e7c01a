"""What a run ran on: the software's versions and the machine (ranks, nodes, cores), for the run log."""

from __future__ import annotations

import platform

from . import __version__


def describe(dist, exchange) -> dict:
    """The software and machine of a run, and the exchange it uses, as the log's /env records them
    (docs/runlog.md)."""
    import h5py
    import mpi4py
    import numba
    import numpy as np
    from mpi4py import MPI

    return {
        "cnnpar": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "numba": numba.__version__, "mpi4py": mpi4py.__version__, "h5py": h5py.__version__,
        "mpi_library": MPI.Get_library_version().replace("\0", "").strip().splitlines()[0],
        "hostnames": list(dist.hostnames), "ranks": dist.world.Get_size(), "cores": dist.cores,
        "physical_cores": physical_cores(), "nodes": dist.n_nodes, "oversubscribed": dist.oversubscribed,
        "wait": "yield" if dist.yield_when_waiting else "spin",
        "threads_per_rank": int(numba.config.NUMBA_NUM_THREADS), "exchange": exchange.describe(),
    }


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; 0 when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return 0
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores)
