"""Compile the numba kernels a run calls, fast and once, before it starts.

    python -m cnnpar.warmup                     # the default job's kernels (small, sync, 12 ranks)
    python -m cnnpar.warmup --arch lenet --mode race
    python -m cnnpar.warmup --clear             # remove every kernel cache cnnpar made

The trainer compiles only what the run calls (its architecture's step and evaluation, the SGD step and
the exchange it will use) as a Plan: two phases whose independent tasks run on different ranks of a
node at once (dist.compile_in_parallel), the later phase loading what the earlier compiled. A stamp
file per plan in the cache folder says the plan was compiled here, so a warm start says nothing and
skips the waits. Where the cache lives and why it cannot go stale: cnnpar.kernel_cache.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time

from . import kernel_cache
from .kernel_cache import cache_root, clear_caches, kernel_cache_dir
from .progress import span

# Seconds each task took to compile on the 2-core development VM (one rank, others idle); only used to
# announce the first compile on a machine, which then records its own figures.
# ("steps", the window driver of one-rank runs, scaled from a busy machine's 9.6 s beside layer_backward's 9.1)
DEFAULT_TASK_S = {"layer_backward": 4.2, "layer_forward": 2.2, "step": 3.2, "steps": 4.4, "evaluate": 0.6,
                  "sgd": 0.15, "exchange:factored": 2.5, "exchange:shm": 4.0, "exchange:race": 1.5}
# The announced range runs from the expected time on an idle machine to this many times it, or to the
# machine's present load times it when that is more: a compile shares its core with everything else running
# (a first run announced as "about 8 s" took 34 s on a loaded machine).
ESTIMATE_SPREAD = 2.0


def _niceness() -> int:
    try:
        return os.nice(0)
    except (OSError, AttributeError):
        return 0


def busy_factor(cores: int | None = None) -> float:
    """Runnable processes per core over the last minute, at least 1 (1 where unknown): how many times
    longer than on an idle machine a compile may take now."""
    try:
        load = os.getloadavg()[0]
        cores = cores or len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return 1.0
    return max(1.0, load / max(1, cores))


# ------------------------------------------------------------------------------------------ the plan

class Plan:
    """The kernels one run calls, as tasks in phases (see dist.compile_in_parallel), with an identity
    (what the stamp file is named after) and an estimate of its compile time. The first phase compiles
    the layer dispatchers, which the second phase's entry points (the step, the evaluation, SGD, the
    exchange) then load instead of compiling them again; only the entry points need loading to run."""

    def __init__(self, network, images, labels, exchange: str, windowed: bool = False):
        import numpy as np

        from . import kernels as K

        self.exchange = exchange
        self.windowed = windowed  # the run trains in compiled windows of steps (one rank, no exchange)
        self.identity = (f"{network.grammar}|{network.input_shape}|{network.n_classes}|{network.dtype}|{exchange}"
                         + ("|windowed" if windowed else ""))
        params = network.init_params(0)
        grads = np.zeros_like(params)
        image = images[0]
        work, iwork, row = network._work, network._iwork, network.table[0]

        def layer_forward():
            _compile(K._layer_forward, params, work, iwork, row, image)

        def layer_backward():
            _compile(K._layer_backward, params, grads, work, iwork, row, image)

        def step():
            order = np.arange(min(2, len(labels)), dtype=np.int64)
            network.sampled_forward_backward(images, labels)(params, grads, order, 0, 1)

        def evaluate():
            network.evaluate(params, images[:2], labels[:2], np.empty(min(2, len(labels)), np.int32))

        def sgd():
            from .optim import SGD

            SGD(network.n_params, lr=0.01).step(params.copy(), grads, 1)

        def steps():  # the trainer's call with its argument types, running no step
            from .optim import SGD

            optimizer = SGD(network.n_params, lr=0.01)
            momentum = optimizer.momentum_typed(params.dtype)
            slices = [np.zeros(1, np.int64) for _ in range(3)]
            network.sampled_train_steps(images, labels)(
                np.zeros((1, K.R_LR + 1)), params, grads, optimizer.velocity, np.zeros(1, np.int64), *slices,
                0, 0, 0, 0, 0.01, False, momentum, (0.0, 0, 0, 0))

        self._tasks = {"layer_backward": layer_backward, "layer_forward": layer_forward, "step": step,
                       "evaluate": evaluate, "sgd": sgd, "steps": steps}
        # A windowed run calls the window driver (which holds the step and SGD) where the others call both
        names = [["layer_backward", "layer_forward"], ["steps", "evaluate"] if windowed else ["step", "evaluate", "sgd"]]
        if exchange:
            self._tasks[f"exchange:{exchange}"] = _exchange_warmer(exchange)
            names[1].insert(1, f"exchange:{exchange}")  # beside the step: the two longest of phase 2
        self.names = names
        self.phases = [[functools.partial(self.run, name) for name in phase] for phase in names]
        self.count = sum(len(phase) for phase in names)
        self.measured_s = {}  # seconds of the tasks this process compiled
        self.finished = 0     # tasks of the plan finished on the node, counted by prepare: after all of
                              # them a task's run only loads machine code, which must not pass for a compile
        self.spec = {"arch": network.grammar, "input_shape": list(network.input_shape),
                     "n_classes": network.n_classes, "dtype": str(network.dtype), "exchange": exchange,
                     "windowed": windowed}

    @classmethod
    def from_spec(cls, spec: dict) -> "Plan":
        """The same plan in another process (a compile helper), on zero images of the same types."""
        import numpy as np

        from .model import build_network

        network = build_network(spec["arch"], tuple(spec["input_shape"]), spec["n_classes"], spec["dtype"])
        images = np.zeros((2,) + network.input_shape, network.dtype)
        return cls(network, images, np.zeros(2, np.int32), spec["exchange"], spec.get("windowed", False))

    def run(self, name: str) -> None:
        from numba.core import event

        started = time.perf_counter()
        # numba announces a compile, not a load from its cache: a task whose kernels were all in the cache
        # (a plan not yet stamped warm, whose kernels an earlier run of other settings compiled) took a load's
        # fraction of a second, which must not become the next cold run's announced compile time
        with span(f"kernel {name}"), event.install_recorder("numba:compile") as compiles:
            self._tasks[name]()
        if self.finished < self.count and compiles.buffer:  # still compiling, and this task did
            self.measured_s.setdefault(name, time.perf_counter() - started)

    def estimate_s(self, workers: int) -> float:
        """Seconds the plan should take on an idle machine with `workers` compiling at once (from the figures
        measured here where there are some)."""
        per_task = dict(DEFAULT_TASK_S)
        per_task.update(kernel_cache.recorded_seconds())
        total = 0.0
        for phase in self.names:
            loads = [0.0] * max(1, workers)
            for index, name in enumerate(phase):
                loads[index % len(loads)] += per_task.get(name, 1.0)
            total += max(loads)
        return total

    def estimate_range_s(self, workers: int, busy: float, niceness: int = 0) -> tuple:
        """(fewest, most) seconds to announce: the idle machine's estimate, and that times the spread or
        times `busy` (busy_factor) when the machine is loaded more. A niced process on a busy machine gets
        far less than its share of a core (at nice 19, 139 s where 100 s was the most announced), so
        there the range is open: most is infinite."""
        idle_s = self.estimate_s(workers)
        if niceness > 0 and busy > 1:
            return idle_s, math.inf
        return idle_s, idle_s * max(ESTIMATE_SPREAD, busy)

    @property
    def stamp_path(self) -> str:
        name = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        return os.path.join(os.environ.get("NUMBA_CACHE_DIR") or kernel_cache_dir(), "cnnpar-warm", name)

    def is_warm(self) -> bool:
        return os.path.exists(self.stamp_path)

    def mark_warm(self, seconds: float) -> None:
        """Written by node rank 0 once the plan compiled; a failure to write only costs the notice."""
        try:
            os.makedirs(os.path.dirname(self.stamp_path), exist_ok=True)
            with open(f"{self.stamp_path}.{os.getpid()}.tmp", "w") as f:  # whole or absent, whatever kills us
                f.write(json.dumps({"identity": self.identity, "compile_s": round(seconds, 3)}) + "\n")
            os.replace(f.name, self.stamp_path)
        except OSError:
            pass


def initialise_numba_target() -> None:
    """Set up numba's CPU target (its lowering and typing registries), which the first compile or cache
    load of a process does anyway (a cache load refreshes the target first): here so that a start-up
    trace times it on its own."""
    from numba.core.registry import cpu_target

    cpu_target.target_context.refresh()


def _compile(dispatcher, *args) -> None:
    """Compile (or load from the cache) dispatcher for these arguments' types without running it."""
    from numba import typeof

    dispatcher.compile(tuple(typeof(arg) for arg in args))


def _exchange_warmer(exchange: str):
    if exchange == "factored":
        from .exchange import factored

        return factored.warm_kernels
    if exchange == "shm":
        from .exchange import shm

        return shm.warm_kernels
    if exchange == "race":
        from .exchange import race

        return race.warm_kernels
    raise ValueError(f"no kernels known for exchange {exchange!r}")


def windowed(mode: str, ranks: int, noise_scale: bool = False) -> bool:
    """Whether such a run trains in compiled windows of steps (the trainer's own test: its exchange does
    nothing, no noise meter runs between the kernels, and the compiled code can read the clock)."""
    from . import kernels as K
    from .exchange import reduces_nothing

    return K.HAS_STEP_CLOCK and not noise_scale and reduces_nothing(mode, ranks)


def exchange_kernels(mode: str, allreduce: str, ranks: int, samples_per_rank: int, dtype="float32",
                     nodes: int = 1, max_node_size: int | None = None) -> str:
    """Which exchange's kernels a run will compile: '' (none), 'factored', 'shm' or 'race', as the exchange
    factory's own rule (exchange.choose) decides for this layout: `nodes` real or pretend nodes, the largest
    holding `max_node_size` ranks (default: the ranks spread evenly). dtype None: no network to factor.

    A forecast for start-up only: the factory also asks the network (a dense layer, the payload, the
    kernel's rounding) before it picks 'factored', and a wrong forecast costs a compile there, never a
    wrong result."""
    from .exchange import KERNELS, choose
    from .modes import factored_fits

    kind = choose(mode, allreduce, ranks, nodes,
                  lambda: max_node_size if max_node_size is not None else -(-ranks // nodes),
                  lambda: factored_fits(samples_per_rank, dtype))
    return KERNELS[kind]


def prepare(dist, plan: Plan, say=None) -> float:
    """Compile the plan across the node (cold) or just load it (warm); returns the seconds taken.

    Cold, rank 0 announces it at once with the range of time it may take and a live count (say.compiling). A rank
    alone on its node with a spare core compiles half of each phase in a helper process (no MPI in it)."""
    from . import dist as dist_lib

    start = time.perf_counter()
    kernel_cache.serialize_cache_saves()  # a stamp whose cache was deleted by hand: every rank compiles
    with span("numba target"):
        initialise_numba_target()
    is_warm = int(plan.is_warm())
    dist_lib.arrive(dist.comm)
    warm = dist.comm.allreduce(is_warm, op=_min_op()) == 1
    if warm:  # nothing to wait for: each rank loads the entry points' machine code from the cache itself
        for task in plan.phases[-1]:
            task()
        return time.perf_counter() - start
    helped = dist.node_size == 1 and dist.cores >= 2 and max(len(phase) for phase in plan.phases) > 1
    workers = 2 if helped else max(1, min(dist.node_size, dist.cores))
    busy = busy_factor(dist.cores)
    notice = (say.compiling(plan.count, *plan.estimate_range_s(workers, busy, _niceness())) if say is not None
              else None)

    def on_done():
        plan.finished += 1
        if notice is not None:
            notice.task_done()

    if helped:
        compile_with_helper(plan, on_done)
    else:
        dist_lib.compile_in_parallel(dist, plan.phases, on_task_done=on_done, load_phases=[len(plan.phases) - 1])
    seconds = time.perf_counter() - start
    if notice is not None:
        notice.close(seconds)
    if dist.node_rank == 0:
        plan.mark_warm(seconds)
        kernel_cache.record_seconds(plan.measured_s, busy)
    return seconds


def compile_with_helper(plan: Plan, on_task_done=None) -> None:
    """Compile the plan with one helper process beside this one: phase by phase, the helper takes the
    odd-numbered tasks, this process the even ones, then this process loads the lot. If the helper cannot
    start or dies, this process compiles what it left (slower, same result)."""
    import subprocess

    from .signals import end_with_me

    command = [sys.executable, "-m", "cnnpar.warmup", "--serve-plan", json.dumps(plan.spec)]
    try:
        helper = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        end_with_me(helper)
    except OSError:
        helper = None
    for number, phase in enumerate(plan.phases):
        theirs = [index for index in range(len(phase)) if index % 2 == 1]
        if helper is not None:
            try:
                helper.stdin.write(f"{number}\n")
                helper.stdin.flush()
            except OSError:
                helper = None
        for index, task in enumerate(phase):
            if index % 2 == 0:
                task()
                if on_task_done is not None:
                    on_task_done()
        for index in theirs:
            reply = helper.stdout.readline().split() if helper is not None else []  # blocks: no CPU
            if len(reply) == 3 and reply[0] == "done":
                if math.isfinite(float(reply[2])):  # the helper compiled it (nan: it only loaded it)
                    plan.measured_s[plan.names[number][int(reply[1])]] = float(reply[2])
            else:
                helper = None
                phase[index]()
            if on_task_done is not None:
                on_task_done()
    if helper is not None:
        helper.stdin.close()
        helper.wait()
    for index, task in enumerate(plan.phases[-1]):  # load the entry points the helper compiled
        if index % 2 == 1:
            task()


def serve_plan(spec: dict) -> int:
    """The helper's side of compile_with_helper: for each phase number read on stdin, compile that phase's
    odd-numbered tasks and answer `done INDEX SECONDS` for each. A stop signal (a terminal's ^C reaches
    it too) ends it at once and quietly, after any cache save in progress."""
    from .signals import exit_at_once_on_stop_signals

    exit_at_once_on_stop_signals()
    kernel_cache.serialize_cache_saves()
    plan = Plan.from_spec(spec)
    for line in sys.stdin:
        number = int(line)
        for index, name in enumerate(plan.names[number]):
            if index % 2 == 1:
                plan.run(name)
                print(f"done {index} {plan.measured_s.get(name, math.nan):.3f}", flush=True)  # nan: loaded
    return 0


def _min_op():
    from mpi4py import MPI

    return MPI.MIN


# ------------------------------------------------------------------------------------------ the CLI

def build_parser() -> argparse.ArgumentParser:
    from .config import MODES, ALLREDUCES

    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m cnnpar.warmup",
        description="Compile the numba kernels a training run will call into the on-disk cache (so the "
                    "run itself starts at once), or remove cnnpar's kernel caches. Runs on one process; "
                    "no MPI launcher needed.",
        epilog=f"cache: {cache_root()}/numba-<hash of the kernel sources, versions and CPU>, or NUMBA_CACHE_DIR "
               f"when set")
    parser.add_argument("--arch", action="append", default=None, metavar="ARCH",
                        help="architecture to compile for: 'small', 'lenet' or a layer stack as in "
                             "`python -m cnnpar.train --help`; repeat for several (default: small)")
    parser.add_argument("--mode", default="sync", choices=MODES,
                        help="the run's --mode, which decides the exchange kernels (default: sync)")
    parser.add_argument("--allreduce", default="auto", choices=ALLREDUCES,
                        help="the run's --allreduce (default: auto)")
    parser.add_argument("--ranks", type=int, default=12, metavar="N",
                        help="the run's rank count; 1 needs no exchange kernels (default: 12)")
    parser.add_argument("--samples-per-rank", type=int, default=1, metavar="K",
                        help="the run's --samples-per-rank (default: 1)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="the nodes the run's ranks span, real or --pretend-nodes: across nodes 'auto' "
                             "exchanges node by node, with other kernels (default: 1)")
    parser.add_argument("--clear", action="store_true",
                        help="remove every kernel cache cnnpar made (they rebuild on the next run) and exit")
    parser.add_argument("--where", action="store_true", help="print the cache folder in use and exit")
    parser.add_argument("--serve-plan", metavar="JSON", default="",
                        help="internal: be the trainer's compile helper for this plan (phase numbers on stdin)")
    parser.add_argument("archs", nargs="*", metavar="ARCH", help=argparse.SUPPRESS)  # the old positional form
    return parser


def warm_up(archs=("small",), mode="sync", allreduce="auto", ranks=12, samples_per_rank=1, nodes=1) -> float:
    """Compile (or load) every kernel runs of these settings call, on this process; returns the seconds."""
    import numpy as np

    from .model import build_network

    start = time.perf_counter()
    busy = busy_factor()
    kernel_cache.serialize_cache_saves()
    exchange = exchange_kernels(mode, allreduce, ranks, samples_per_rank, nodes=nodes)
    for arch in archs:
        network = build_network(arch)
        images = np.zeros((2,) + network.input_shape, np.float32)
        labels = np.zeros(2, np.int32)
        plan = Plan(network, images, labels, exchange, windowed(mode, ranks))
        if plan.is_warm():
            continue
        from .dist import usable_cores

        if usable_cores() >= 2:
            compile_with_helper(plan)
        else:
            for phase in plan.phases:
                for task in phase:
                    task()
        plan.mark_warm(time.perf_counter() - start)
        kernel_cache.record_seconds(plan.measured_s, busy)
    return time.perf_counter() - start


def main(argv=None) -> int:
    from .errors import UserError, exit_on_user_error

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.clear:
        removed = clear_caches()
        print(f"cnnpar: removed {len(removed)} kernel cache entr{'y' if len(removed) == 1 else 'ies'}"
              + (f" under {cache_root()}" if removed else ""))
        return 0
    if args.serve_plan:
        return serve_plan(json.loads(args.serve_plan))
    if args.where:
        print(os.environ.get("NUMBA_CACHE_DIR") or kernel_cache_dir())
        return 0
    archs = tuple((args.arch or []) + args.archs) or ("small",)

    def run():
        for flag, value in (("--ranks", args.ranks), ("--samples-per-rank", args.samples_per_rank),
                            ("--nodes", args.nodes)):
            if value < 1:
                raise UserError(flag, f"must be >= 1, got {value}")
        if args.nodes > args.ranks:
            raise UserError("--nodes", f"{args.nodes} nodes need at least as many ranks, not {args.ranks}")
        return warm_up(archs, args.mode, args.allreduce, args.ranks, args.samples_per_rank, args.nodes)

    seconds = exit_on_user_error(run)()
    print(f"cnnpar: kernels ready for {', '.join(archs)} in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
