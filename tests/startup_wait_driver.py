"""Run by tests/test_startup.py under mpiexec: node rank 0 is busy for BURN_S seconds while the other ranks
wait, inside compile_once (standing in for numba compiling) or, with `agree` after BURN_S, inside a
collective check (standing in for rank 0 checking the log path or writing the log); every rank reports the
CPU seconds it used over that wait. Prints one JSON list on rank 0: [world rank, node rank, cpu_s, wall_s]
per rank."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnnpar import dist as dist_lib  # noqa: E402

dist_lib.pin_threads()

BURN_S = float(sys.argv[1])
WHERE = sys.argv[2] if len(sys.argv) > 2 else "compile"


def main() -> None:
    dist = dist_lib.setup()

    def compile_stand_in():
        if dist.node_rank == 0:  # busy, as a compiler is; the others must leave the cores to it
            end = time.perf_counter() + BURN_S
            while time.perf_counter() < end:
                pass

    dist.comm.Barrier()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if WHERE == "agree":
        with dist_lib.collective_check(dist.comm):
            compile_stand_in()
    else:
        dist_lib.compile_once(dist, compile_stand_in)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    rows = dist.comm.gather([dist.rank, dist.node_rank, cpu_s, wall_s], root=0)
    if dist.rank == 0:
        print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
