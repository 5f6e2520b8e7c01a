"""Train the CNN data-parallel over MPI: `mpirun -n 12 python -m cnnpar.train`.

Each rank holds a replica of the model (same seed, same initial params) and
takes its slice of every step's global batch (ranks x samples-per-rank
samples). It runs the numba forward/backward on its samples, the exchange
turns the per-rank gradients into their sum, and every rank applies the same
SGD step, so the replicas stay identical (checked by checksum).

main() reads top to bottom: config -> ranks/seeds -> data -> model ->
exchange -> loop -> evaluate -> close. Rank 0 alone prints and writes the
HDF5 log; all ranks decide together on errors. What surrounds the run lives
with what it concerns: the log's and the checkpoint's paths in runpaths,
resuming and checkpointing in checkpoint, the lr schedule in optim, the
window of step statistics (and the divergence check) in window, the log's
record of the machine in environment.
"""

from __future__ import annotations

from . import progress as _progress  # first: under a start-up trace it times the imports that follow
from . import dist as _dist

_dist.pin_threads()  # before numpy and numba load their thread pools

import datetime  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402

from .config import Config, parse_config, build_parser  # noqa: E402
from .errors import EXIT_USER_ERROR, EXIT_WRITE_ERROR, UserError, WriteError  # noqa: E402
from .progress import Speaker, milestone, samples_per_s, span  # noqa: E402
from .window import Diverged, StepWindow, flush_window  # noqa: E402

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .data import Dataset
    from .dist import Dist
    from .exchange import Exchange
    from .model import Network
    from .noise import NoiseMeter
    from .optim import SGD
    from .runlog import RunLogWriter
    from .signals import StopRequest

milestone("imported")


def main(argv=None) -> int:
    """The command. Without `argv` (the console script, `python -m cnnpar.train`) it owns the process:
    it finalises MPI itself before putting the signal handlers back, so that a launcher's late copy of
    a stop signal cannot kill a rank inside MPI's finalise. With `argv` (in-process callers: the map's
    workers, test drivers) MPI stays up for the caller, and the handlers are put back on return."""
    from mpi4py import MPI

    from .signals import StopRequest

    world = MPI.COMM_WORLD
    owns_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    stop = StopRequest().install_for_startup(speaks=world.Get_rank() == 0).share_the_startup_line(world)
    status = 1
    try:
        status = train(argv, stop)
    except SystemExit:
        raise
    except UserError as err:  # found by one rank after the collective checks: nobody else can be asked
        _dist.user_error_midrun(world, err)
    except KeyboardInterrupt:
        world.Abort(130)
    except BaseException as exc:  # a bug: take every rank down rather than leave them hanging
        _dist.abort_on_bug(world, exc)
    finally:
        if owns_process and not MPI.Is_finalized():
            milestone("finalize")
            MPI.Finalize()
            milestone("finalized")
        stop.restore()
    return status


def train(argv, stop=None) -> int:
    """One run; `stop` (a cnnpar.signals.StopRequest) notes stop signals from the loop's start on."""
    from mpi4py import MPI

    from . import launcher
    from .exchange import make_exchange

    world = MPI.COMM_WORLD
    milestone("mpi_init")
    _progress.trace_rank(world.Get_rank())
    # --- config: parsed identically on every rank; rank 0 alone speaks ---
    if "-h" in argv or "--help" in argv:
        if world.Get_rank() == 0:
            from . import model as model_lib

            build_parser(model_lib.ARCH_HELP).print_help()
        return 0
    with _dist.collective_check(world):  # numba is imported later, after the first note: it takes a while
        launcher.check_world_size(world.Get_size(), MPI.Get_library_version())  # not N one-rank jobs
        config = parse_config(argv)
        _check_world(config, world.Get_size())
    started = world.bcast(datetime.datetime.now().astimezone(), root=0)  # names the log and stamps `created`

    # --- ranks, nodes, seeds: with --folds k, k groups of ranks train the k folds at once ---
    fold = world.Get_rank() * config.folds // world.Get_size()
    group = world.Split(fold, world.Get_rank()) if config.folds > 1 else world
    dist = _dist.setup(group, pretend_nodes=config.pretend_nodes, wait=config.wait)
    milestone("ranks")
    say = Speaker(world.Get_rank() == 0, config.quiet, config.progress)  # one log per job, by world rank 0
    if dist.oversubscribed:
        say.line(f"note: {world.Get_size()} ranks share {dist.cores} cores; waiting ranks yield their core "
                 f"(--wait {'yield' if dist.yield_when_waiting else 'spin'})")
    for warning in _warnings(config, dist):
        say.line(warning)

    # --- data and model, and every check that needs them: all before anything is written ---
    dataset, network, log_path, resume = _data_and_model(config, world, dist, fold, say, started)
    if resume is not None and resume.get("set_aside"):
        say.line(f"note: {log_path} has no checkpoint to resume from (its run stopped before the first one): "
                 f"kept as {resume['set_aside']}, starting over")
        resume = None
    if resume is not None and resume.get("complete"):
        say.summary(f"nothing to resume: {log_path} is already complete")
        return 0
    milestone("data")
    _compile_kernels(config, dist, network, dataset, say)
    milestone("kernels")

    # --- exchange, then the run's parts around it: params, optimizer, log, checkpoints ---
    exchange = make_exchange(config, dist, network.n_params, network=network)
    milestone("exchange")
    if stop is not None:
        stop.install()  # the log is created next: from here a stop waits for a step boundary
    try:
        run = _start(config, dist, dataset, network, exchange, log_path, resume, say, started, stop)
        say.line(_startup_line(run, log_path))
        result = _train_and_log(run, world, fold, resume)
    finally:
        exchange.close()
    if world.Get_rank() == 0:
        say.summary(_summary_line(config, result, log_path))
    milestone("done")
    return 0


def _check_world(config: Config, world_size: int) -> None:
    if config.folds > 1:
        if world_size % config.folds:
            raise UserError("--folds", f"{config.folds} folds do not divide {world_size} ranks evenly; "
                            f"use a rank count that is a multiple of {config.folds}")
        if config.checkpoint_every or config.resume:
            raise UserError("--folds", "cross-validation runs cannot be checkpointed or resumed yet")
    ranks_per_group = world_size // config.folds
    if config.pretend_nodes > ranks_per_group:
        raise UserError("--pretend-nodes", f"{config.pretend_nodes} pretend nodes need at least as many ranks, "
                        f"but {'each fold has' if config.folds > 1 else 'the job has'} {ranks_per_group}")


def _warnings(config: Config, dist) -> list:
    """Settings that are legitimate but probably not what the user meant: one line each, from rank 0."""
    lines = []
    if config.mode == "race" and config.race_window == "rma" and dist.size == 1:
        lines.append("warning: --race-window rma with one rank: nothing races, the run is plain SGD")
    return lines


def _data_and_model(config: Config, world, dist, fold: int, say, started):
    """Load the data and build the network on every rank; rank 0 checks the log path and any checkpoint.
    Collective: a user error anywhere ends every rank with one line before anything is written."""
    from . import checkpoint, data, model as model_lib, runpaths

    resume = None
    with _dist.collective_check(world):
        _, notice = data.resolve_dataset(config.dataset, config.data_dir or None)
        with span("data load"):
            dataset = data.load_dataset(config.dataset, config.data_dir or None, config.input_scale)
        if config.folds > 1:
            dataset = data.fold_split(dataset, config.folds, fold, config.seed)
        network = model_lib.build_network(config.arch, dataset.train_images.shape[1:], dataset.n_classes)
        n_train = len(dataset.train_labels)
        global_batch = dist.size * config.samples_per_rank
        if global_batch > n_train:
            raise UserError("--samples-per-rank", f"{dist.size} ranks x {config.samples_per_rank} samples = "
                            f"{global_batch} per step, more than the {n_train} training samples")
        if config.noise_scale and global_batch < 2:
            raise UserError("--noise-scale", "needs two batch sizes to compare: run 2 or more ranks, or give "
                            "one rank --samples-per-rank 2 or more")
        log_path = runpaths.log_path(config, world.Get_size(), started)
        if world.Get_rank() == 0:  # checked writable before training, and the checkpoint against this run
            runpaths.check_log_path(log_path, make_folder=not config.log, resuming=bool(config.resume))
            resume = checkpoint.resume_state(config, log_path, dist.size, network.n_params)
    if notice:
        say.line(notice)
    return dataset, network, log_path, world.bcast(resume, root=0)


def _compile_kernels(config: Config, dist, network, dataset, say) -> None:
    """The kernels this run calls, compiled across the node's ranks on a first run, loaded when warm."""
    from . import warmup

    from mpi4py import MPI

    max_node_size = dist.comm.allreduce(dist.node_size, op=MPI.MAX) if dist.n_nodes > 1 else dist.node_size
    exchange = warmup.exchange_kernels(config.mode, config.allreduce, dist.size, config.samples_per_rank,
                                       network.dtype, dist.n_nodes, max_node_size)
    plan = warmup.Plan(network, dataset.train_images, dataset.train_labels, exchange,
                       windowed=warmup.windowed(config.mode, dist.size, config.noise_scale))
    warmup.prepare(dist, plan, say)


@dataclass
class Run:
    """The parts of one run that the loop works with, built once before it starts."""
    config: Config
    dist: Dist               # this replica group's ranks and nodes
    dataset: Dataset
    network: Network
    params: np.ndarray       # the flat float32 parameter block (possibly living in the exchange's window)
    grads: np.ndarray        # the flat gradient block, same layout
    exchange: Exchange
    optimizer: SGD
    log: RunLogWriter | None  # on world rank 0, None elsewhere
    say: Speaker
    saver: Checkpointer
    steps_per_epoch: int
    total_steps: int
    stop: StopRequest        # signals and write errors, agreed at window flushes
    noise: NoiseMeter | None = None  # with --noise-scale (its epoch sums travel in checkpoints)


def _start(config, dist, dataset, network, exchange, log_path, resume, say, started, stop=None) -> Run:
    """Params (fresh or from the checkpoint), the optimizer, the log (new or continued) and the checkpointer."""
    from . import checkpoint, data, environment, model as model_lib, optim, runlog, signals

    params = network.init_params(config.seed)
    if resume is not None:
        params[:] = resume["params"]
    grads = model_lib.aligned_zeros(network.n_params, params.dtype)
    params = exchange.bind(params)
    exchange.first_step = 0 if resume is None else int(resume["step"])  # audits number steps from here
    optimizer = optim.SGD(network.n_params, config.lr, config.momentum, config.reduce)
    if resume is not None:
        optimizer.velocity[:] = resume["velocity"]
        say.line(f"resuming {log_path} at step {int(resume['step'])}")
    steps_per_epoch = data.steps_per_epoch(len(dataset.train_labels), dist.size, config.samples_per_rank)
    total_steps = config.steps or config.epochs * steps_per_epoch
    log = None
    with _dist.collective_check(dist.world):  # a full disk here ends every rank with one line
        if dist.world.Get_rank() == 0 and resume is None:
            log = runlog.RunLogWriter(log_path, config.to_json(), _config_fields(config),
                                      environment.describe(dist, exchange), _layout_rows(network), dist.size,
                                      dataset.n_classes, created=runlog.utc_stamp(started),
                                      world_ranks=dist.world.Get_size())
        elif dist.world.Get_rank() == 0:
            log = runlog.RunLogWriter.reopen(log_path, int(resume["log_steps"]), int(resume["log_epochs"]))
    noise = None
    if config.noise_scale:
        from .noise import NoiseMeter

        noise = NoiseMeter(network.n_params, dist.size, config.samples_per_rank, dist.rank == 0)
        if resume is not None and dist.rank == 0 and resume.get("noise_sums") is not None:
            noise.restore_epoch_sums(resume["noise_sums"])
    saver = checkpoint.Checkpointer(config, log_path, steps_per_epoch, dist.size, optimizer, noise)
    return Run(config=config, dist=dist, dataset=dataset, network=network, params=params, grads=grads,
               exchange=exchange, optimizer=optimizer, log=log, say=say, saver=saver,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               stop=stop if stop is not None else signals.StopRequest(), noise=noise)


def _train_and_log(run: Run, world, fold: int, resume) -> dict:
    """The loop and the final evaluation, then the log's /final and its closing status."""
    log = run.log
    try:
        # From here a signal is only noted; the ranks act on it together at a window flush. A second
        # one kills at once until they agree to stop (or the loop ends): not during the shutdown.
        with run.stop:
            result = _loop(run, _Position.restored(resume, run.dist.rank))
        result.update(_gather_folds(run.config, world, run.dist, fold, result))
    except _Stopped as halt:
        _close_stopped(log, halt, world.Get_rank() == 0)
        raise SystemExit(halt.stop.exit_status)
    except Diverged as div:
        if log is not None:
            log.close("diverged", str(div))
        if world.Get_rank() == 0:
            print(f"cnnpar: error: --lr: {div}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
    except BaseException as exc:
        if log is not None:
            log.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      f"{type(exc).__name__}: {exc}")
        raise
    failure = None
    if log is not None:
        if run.config.folds > 1:
            log.write_folds(result["fold_acc"], result["fold_loss"])
        log.write_final(run.params, result["confusion"], test_acc=result["test_acc"],
                        test_loss=result["test_loss"], train_time_s=result["train_time_s"],
                        samples=result["samples"], samples_per_s=result["samples_per_s"], steps=run.total_steps)
        try:
            log.close("complete")
        except WriteError as err:
            failure = err.line()
    failed = np.array([failure is not None], np.int32)  # every rank exits with rank 0's outcome, and
    run.dist.wait_on_rank0(world.Ibcast(failed, root=0), writing=True)  # leaves the cores to rank 0
    milestone("log_closed")
    if failed[0]:
        if world.Get_rank() == 0:
            print(failure, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_WRITE_ERROR)
    return result


class _Stopped(Exception):
    """Every rank agreed to stop at a step boundary (a signal, or rank 0's failed write)."""

    def __init__(self, stop, steps_done: int, total_steps: int, checkpoint: str, checkpoint_error=None):
        super().__init__(stop.name)
        self.stop, self.steps_done, self.total_steps = stop, steps_done, total_steps
        self.checkpoint, self.checkpoint_error = checkpoint, checkpoint_error


def _close_stopped(log, halt: _Stopped, speaks: bool) -> None:
    """Rank 0 closes the log with the stop's status and says, in one line, what happened and what is kept."""
    stop = halt.stop
    if log is None and not speaks:
        return
    if stop.by_signal:
        kept = (f"checkpoint {halt.checkpoint} written: continue with --resume auto" if halt.checkpoint else
                f"checkpoint failed ({halt.checkpoint_error.message})" if halt.checkpoint_error else
                "no checkpoint (--checkpoint-every or --checkpoint-on-signal make one)")
        message = f"stopped by {stop.name} after step {halt.steps_done} of {halt.total_steps}; {kept}"
        line = f"cnnpar: {message}"
    else:
        message = f"write error: {halt.checkpoint_error.message}"
        line = halt.checkpoint_error.line()
    if log is not None:
        try:
            log.close(stop.status, message)
        except WriteError as err:
            line = err.line() if stop.by_signal else line
    if speaks:
        print(line, file=sys.stderr, flush=True)


def _startup_line(run: "Run", log_path: str) -> str:
    """What this run is, in one line before its first step: ranks and nodes, data, network, exchange (as the
    exchange says it is), learning rate, budget and log."""
    config, dist, dataset = run.config, run.dist, run.dataset
    world_ranks = dist.world.Get_size()
    nodes = f"{dist.n_nodes} {'pretend ' if config.pretend_nodes else ''}node{'s' if dist.n_nodes > 1 else ''}"
    ranks = f"{world_ranks} rank{'s' if world_ranks > 1 else ''} on {nodes}"
    if config.folds > 1:
        ranks = f"{world_ranks} ranks in {config.folds} folds of {dist.size}, each on {nodes}"
    image = "x".join(str(v) for v in dataset.train_images.shape[1:])
    data = (f"{dataset.name}: {len(dataset.train_labels):,} train / {len(dataset.test_labels):,} test images "
            f"{image}, {dataset.n_classes} classes")
    chooser = config.allreduce if config.mode == "sync" else config.race_window if config.mode != "local" else ""
    exchange = f"mode {config.mode}, exchange {run.exchange.describe()}" + (" (auto)" if chooser == "auto" else "")
    global_batch = dist.size * config.samples_per_rank
    lr = f"lr {config.lr:g}, reduce {config.reduce}"
    if config.lr_scaling != "none":
        lr += f", scaled {config.lr_scaling} to {config.lr * global_batch:g}" + (
            f" over {config.warmup_steps:,} warm-up steps" if config.warmup_steps else "")
    if config.momentum:
        lr += f", momentum {config.momentum:g}"
    budget = f"{run.total_steps:,} steps"
    if not config.steps:
        budget = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''} = {budget}"
    budget += f" of {global_batch:,} samples ({dist.size} x {config.samples_per_rank})"
    return (f"run: {ranks} | {data} | {config.arch}, {run.network.n_params:,} params | {exchange} | {lr} | "
            f"{budget} | log {log_path}")


def _summary_line(config: Config, result: dict, log_path: str) -> str:
    accuracy = f"test accuracy {100 * result['test_acc']:.1f}%"
    if config.folds > 1:
        accuracy = (f"cross-validation accuracy {100 * np.mean(result['fold_acc']):.1f}% +- "
                    f"{100 * np.std(result['fold_acc'], ddof=1):.1f}% over {config.folds} folds")
    return (f"{accuracy} | {result['samples']} samples in {result['train_time_s']:.2f} s "
            f"({result['samples_per_s']:.0f} samples/s, training only) | log {log_path}")


def _gather_folds(config, world, dist, fold, result) -> dict:
    """With --folds k, world rank 0 collects every fold's held-out accuracy (sent by each group's root)."""
    if config.folds == 1:
        return {}
    mine = (fold, result["test_acc"], result["test_loss"]) if dist.is_root else None
    everyone = world.gather(mine, root=0)
    if world.Get_rank() != 0:
        return {}
    rows = sorted(row for row in everyone if row is not None)
    return {"fold_acc": np.array([r[1] for r in rows]), "fold_loss": np.array([r[2] for r in rows])}


@dataclass
class _Position:
    """Where the loop starts: step 0, or the checkpoint's step with its clock and this epoch's running sums."""
    step: int = 0
    train_time_s: float = 0.0
    samples_done: int = 0
    epoch_sums: tuple = (0.0, 0, 0)  # this rank's loss sum, correct and samples over the epoch so far

    @classmethod
    def restored(cls, resume, rank: int) -> "_Position":
        if resume is None:
            return cls()
        # the saved sums are over all ranks already: rank 0 carries them, the others restart theirs from zero
        loss, correct, count = (float(v) for v in resume["epoch_sums"])
        return cls(step=int(resume["step"]), train_time_s=float(resume["train_time_s"]),
                   samples_done=int(resume["samples_done"]),
                   epoch_sums=(loss, int(correct), int(count)) if rank == 0 else (0.0, 0, 0))


def _loop(run: Run, start: _Position) -> dict:
    """The training loop: sample + forward + backward (one numba call), exchange, SGD step; a rank whose
    exchange does nothing runs all of that for a window of steps in one numba call instead.

    At one sample per rank a step is a few tens of microseconds, so the loop body is kept to a handful
    of calls on local names: the per-step arithmetic that does not change between epochs (each rank's
    slice of every step) is computed once, statistics go to plain Python accumulators, and everything
    else (logging, checks, progress) happens once per window of steps."""
    from .data import epoch_permutation, rank_slices
    from .optim import learning_rate, learning_rate_constant_from

    config, dist, dataset, network = run.config, run.dist, run.dataset, run.network
    params, grads, exchange, optimizer, log, saver = (run.params, run.grads, run.exchange, run.optimizer,
                                                      run.log, run.saver)
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    comm, rank, ranks = dist.comm, dist.rank, dist.size
    k = config.samples_per_rank
    n_train = len(dataset.train_labels)
    forward_backward_at = network.sampled_forward_backward(dataset.train_images, dataset.train_labels)
    starts, stops, step_counts = (a.tolist() for a in rank_slices(n_train, ranks, k, rank))
    global_batch = ranks * k
    lr_constant_from = learning_rate_constant_from(config)
    lr = learning_rate(config, lr_constant_from, global_batch)
    window = StepWindow(config.log_window)
    window.noise = noise = run.noise
    check_every = config.check_every
    first_step, train_time_s, samples_done = start.step, start.train_time_s, start.samples_done
    epoch_loss, epoch_correct, epoch_count = start.epoch_sums
    result = {}
    progress = run.say.progress(total_steps, first_step)
    epoch, step_in_epoch = divmod(first_step, steps_per_epoch)
    order = epoch_permutation(config.seed, epoch, n_train)
    milestone("first_step")
    loop_start = time.perf_counter()

    # A rank whose exchange does nothing runs its steps in compiled windows, each up to the next step after
    # which the loop has something to do (the same calls and bits as the three calls per step below).
    from . import kernels as K

    train_steps = None
    if exchange.reduces_nothing and noise is None and K.HAS_STEP_CLOCK:
        train_steps = network.sampled_train_steps(dataset.train_images, dataset.train_labels)
        slices = [np.asarray(a, np.int64) for a in (starts, stops, step_counts)]
        block = np.empty((window.size, len(StepWindow.FIELDS)), np.float64)
        mean = config.reduce == "mean"
        momentum = optimizer.momentum_typed(params.dtype)  # first: it may retype the velocity
        velocity = optimizer.velocity
        # plain Python numbers (a resumed epoch's sums come back as float64s): one compiled signature
        epoch_loss, epoch_correct, epoch_count = float(epoch_loss), int(epoch_correct), int(epoch_count)
        samples_done = int(samples_done)
    step = first_step
    while step < total_steps:
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            order = epoch_permutation(config.seed, epoch, n_train)
        if step < lr_constant_from:
            lr = learning_rate(config, step, global_batch)
        if train_steps is not None:
            n = 1 if step < lr_constant_from else min(
                steps_per_epoch - step_in_epoch, total_steps - step, window.size - len(window),
                _steps_to_multiple(step, saver.every_steps), _steps_to_multiple(step, check_every))
            used = len(window)
            rows = block[used:used + n]
            epoch_loss, epoch_correct, epoch_count, samples_done = train_steps(
                rows, params, grads, velocity, order, *slices, step, step_in_epoch, n, epoch, lr, mean, momentum,
                (epoch_loss, epoch_correct, epoch_count, samples_done))
            window.add_block(rows)
            step += n
            step_in_epoch += n
        else:
            start_at, stop, step_count = starts[step_in_epoch], stops[step_in_epoch], step_counts[step_in_epoch]
            t0 = time.perf_counter()
            if noise is None:
                loss_sum, correct = forward_backward_at(params, grads, order, start_at, stop)
            else:
                loss_sum, correct = noise.forward_backward(forward_backward_at, params, grads, order, start_at,
                                                           stop)
            t1 = time.perf_counter()
            measured_wait_s = exchange.reduce(grads)
            t2 = time.perf_counter()
            if noise is not None:
                noise.after_exchange(grads)
            optimizer.step(params, grads, step_count, lr, zero_grads=True)  # zeroing rides in the update's pass

            excluded_s = exchange.excluded_s  # the race audit is diagnostics: not counted as training time
            window.rows.append((step, epoch, loss_sum, stop - start_at, step_count, t1 - t0,
                                t2 - t1 - excluded_s, measured_wait_s, lr))
            loop_start += excluded_s
            epoch_loss += loss_sum
            epoch_correct += correct
            epoch_count += stop - start_at
            samples_done += step_count
            step += 1
            step_in_epoch += 1
        steps_done = step
        last = step - 1  # the last step run
        last_of_epoch = step_in_epoch == steps_per_epoch or steps_done == total_steps
        checkpoint_due = saver.due(steps_done) and steps_done < total_steps
        flushed = len(window) == window.size or last_of_epoch or checkpoint_due
        if flushed:
            shown_rows = window.table().copy() if progress is not None else None  # the flush empties it
            flush_window(window, comm, log, exchange)
        if check_every and steps_done % check_every == 0:
            _check_replicas(comm, params, last, log, exchange)
        if flushed and progress is not None:  # timed as the summary's figure is, flush and check included
            progress.update(last, samples_done, train_time_s + time.perf_counter() - loop_start, shown_rows)

        if last_of_epoch:
            train_time_s += time.perf_counter() - loop_start
            sums = comm.allreduce(np.array([epoch_loss, epoch_correct, epoch_count], np.float64))
            train_loss, train_acc = sums[0] / max(sums[2], 1), sums[1] / max(sums[2], 1)
            epoch_loss, epoch_correct, epoch_count = 0.0, 0, 0
            if noise is not None and log is not None:  # every epoch, evaluated or not
                log.append_noise_epoch(epoch, steps_done, **noise.epoch_summary())
            if steps_done == total_steps or (config.eval_every and (epoch + 1) % config.eval_every == 0):
                test_loss, test_acc, confusion = _evaluate(network, params, dataset, dist)
                if log is not None:
                    log.append_epoch(epoch, steps_done, train_loss, train_acc, test_loss, test_acc,
                                     train_time_s, samples_done)
                    if steps_done < total_steps:  # at the last step the closing write follows at once
                        _noting_write_errors(run.stop, log.flush_due)
                if progress is not None:
                    progress.epoch(epoch, train_loss, train_acc, test_loss, test_acc)
                result.update(test_loss=test_loss, test_acc=test_acc, confusion=confusion)
            result["train_loss"] = train_loss
            loop_start = time.perf_counter()
        if checkpoint_due:
            train_time_s += time.perf_counter() - loop_start
            # Rank 0 saves the epoch's running sums over all ranks, so a resumed epoch reports the same figures.
            summed = comm.reduce(np.array([epoch_loss, epoch_correct, epoch_count], np.float64), root=0)
            _noting_write_errors(run.stop, saver.save, log, params, steps_done, summed, train_time_s, samples_done)
            loop_start = time.perf_counter()
        if flushed and (halt := run.stop.agreed(comm, dist.wait_on_rank0)) is not None and (steps_done < total_steps
                                                                        or not halt.by_signal):
            train_time_s += time.perf_counter() - loop_start
            summed = np.array([epoch_loss, epoch_correct, epoch_count], np.float64)
            raise _stop_here(run, halt, steps_done, checkpoint_due, summed, train_time_s, samples_done)

    milestone("trained")
    _check_replicas(comm, params, total_steps - 1, log, exchange)
    if progress is not None:
        progress.close()
    if "test_acc" not in result:  # a --steps budget that ended mid-epoch still gets a final evaluation
        result["test_loss"], result["test_acc"], result["confusion"] = _evaluate(network, params, dataset, dist)
    _warn_if_not_learning(run, result)
    result.update(train_time_s=train_time_s, samples=samples_done,
                  samples_per_s=samples_per_s(samples_done, train_time_s))
    return result


def _steps_to_multiple(step: int, every: int) -> int:
    """How many steps from `step` on until the steps done are a multiple of `every` (0: never)."""
    return every - step % every if every > 0 else 1 << 62


def _noting_write_errors(stop, write, *args) -> None:
    """Rank 0's log or checkpoint write; a failure stops every rank at the next agreement, not this one."""
    try:
        write(*args)
    except WriteError as err:
        stop.note_write_error(err)


def _stop_here(run: Run, halt, steps_done, checkpointed, epoch_sums, train_time_s, samples_done) -> "_Stopped":
    """Collective: the stop every rank agreed on, after a checkpoint when one is wanted and possible."""
    saver, config = run.saver, run.config
    # by_signal is agreed: no rank had noted a write error, so every rank takes the same branch
    if halt.by_signal and (saver.every_steps or config.checkpoint_on_signal) and not checkpointed:
        summed = run.dist.comm.reduce(epoch_sums, root=0)
        _noting_write_errors(run.stop, saver.save, run.log, run.params, steps_done, summed, train_time_s,
                             samples_done)
    error = run.stop.write_error
    wanted = halt.by_signal and (saver.every_steps or config.checkpoint_on_signal)
    return _Stopped(halt, steps_done, run.total_steps, saver.path if wanted and error is None else "", error)


def _warn_if_not_learning(run: Run, result: dict) -> None:
    """A finite run whose loss ended far above an untrained network's (ln of the class count) has blown up
    without reaching NaN: the log is still complete, but the user hears it (typically --lr far too large).
    Twice the chance loss keeps short runs that merely have not learned yet quiet."""
    chance_loss = math.log(run.dataset.n_classes)
    final_loss = result.get("train_loss", result["test_loss"])
    if final_loss > 2 * chance_loss:
        run.say.line(f"warning: the training loss ended at {final_loss:.4g}, far above an untrained network's "
                     f"{chance_loss:.2f} (ln {run.dataset.n_classes}): the run did not learn; try a smaller "
                     f"--lr (now {run.config.lr:g}) or --reduce mean")


def _check_replicas(comm, params, step, log, exchange) -> None:
    """Every replica must hold the same params; a mismatch is a bug in an exchange, so stop."""
    if not exchange.replicas_agree:
        return
    checksum = zlib.crc32(params.view(np.uint8))
    checksums = comm.allgather(checksum)
    ok = len(set(checksums)) == 1
    if log is not None:
        log.append_consistency(step, checksum, ok)
    if not ok:
        bad = [r for r, c in enumerate(checksums) if c != checksums[0]]
        raise RuntimeError(f"replica params differ at step {step}: ranks {bad} disagree with rank 0")


def _evaluate(network, params, dataset, dist):
    """Each rank scores a contiguous shard of the test set; sums and the confusion matrix are reduced."""
    with span("evaluate"):
        return _evaluate_shards(network, params, dataset, dist)


def _evaluate_shards(network, params, dataset, dist):
    n_test = len(dataset.test_labels)
    bounds = np.linspace(0, n_test, dist.size + 1).astype(np.int64)
    lo, hi = bounds[dist.rank], bounds[dist.rank + 1]
    labels = dataset.test_labels[lo:hi]
    predictions = np.empty(hi - lo, np.int32)
    loss_sum, correct = network.evaluate(params, dataset.test_images[lo:hi], labels, predictions)
    n = dataset.n_classes
    confusion = np.bincount(labels.astype(np.int64) * n + predictions, minlength=n * n).reshape(n, n)
    totals = dist.comm.allreduce(np.array([loss_sum, correct], np.float64))
    confusion = dist.comm.allreduce(confusion)
    return totals[0] / n_test, totals[1] / n_test, confusion


def _config_fields(config: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def _layout_rows(network) -> list:
    return [(p.name, tuple(p.shape), p.offset, p.size) for p in network.layout]


if __name__ == "__main__":
    raise SystemExit(main())
