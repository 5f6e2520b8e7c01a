"""The one frozen run configuration, its command line, and its validation.

Every setting lives in `Config` below with its default and a comment; the
command line is generated from it, so `--help` and the defaults cannot drift
apart. `Config.to_json()` is what the HDF5 log stores verbatim. Validation
that needs nothing but the values happens in `Config.validate()`; checks that
need the file system or the rank count happen in `validate_environment`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

from .errors import OneLineParser, UserError
from .modes import FACTORED_SAMPLES_PER_RANK, MODES, RACE_MODES, factored_fits, is_race_mode
from .progress import PROGRESS_MODES
from .runpaths import DEFAULT_LOG_SHOWN

REDUCES = ("sum", "mean")
ALLREDUCES = ("auto", "mpi", "shm", "factored", "hier")
RACE_WINDOWS = ("auto", "shared", "rma")
LR_SCALINGS = ("none", "linear")
WAITS = ("auto", "spin", "yield")


# What a setting changes, in its field's metadata: `affects` is a subset of
NUMBERS = "numbers"  # the params and losses the run computes (and so also its timings)
TABLES = "tables"    # which tables its log holds
TIMING = "timing"    # how long its steps take, where the numbers stay the same
# `why` says why (the choice is deliberate for every field); `pooled` marks a field whose values the reports
# pool: "replicate" (the seed: one setting's repeats), "implementation" (how the exchange is carried out, which
# the accuracy report does not tell apart).


def _opt(default, help, *, affects, why, pooled="", **kw):
    return field(default=default, metadata={"help": help, "affects": frozenset(affects), "why": why,
                                            "pooled": pooled, **kw})


@dataclass(frozen=True)
class Config:
    # --- data ---
    dataset: str = _opt("auto", "dataset name (mnist, fashion-mnist, mnist-5k) or a directory holding the four IDX "
                        "files; 'auto' = full mnist when fetched, else the bundled mnist-5k",
                        affects=(NUMBERS,), why="the samples trained and tested on")
    data_dir: str = _opt("", "where datasets are looked for first (then $CNNPAR_DATA, then the project's data/)",
                         affects=(), why="only where a dataset's files are looked for: the dataset's name says which "
                                         "they are")
    input_scale: float = _opt(1.0, "pixels are read as bytes / 255 x this: 1 = [0, 1], 255 = the raw 0-255 "
                              "bytes (the paper does not say whether its code scales them)",
                              affects=(NUMBERS,), why="every input the network sees")
    # --- model ---
    arch: str = _opt("small", "network: 'small', 'lenet', or a layer stack in the grammar below",
                     affects=(NUMBERS,), why="the network trained")
    # --- optimisation ---
    epochs: int = _opt(3, "passes over the training set (ignored when --steps is given)",
                       affects=(NUMBERS,), why="the budget: how many steps the result is")
    steps: int = _opt(0, "budget in global steps instead of epochs; 0 = use --epochs",
                      affects=(NUMBERS,), why="the budget: how many steps the result is")
    lr: float = _opt(0.01, "SGD learning rate, applied to the step's summed (or mean) gradient",
                     affects=(NUMBERS,), why="every update's size")
    reduce: str = _opt("sum", "'sum': lr times the sum of the step's per-sample gradients, as the paper's "
                       "unprotected accumulation does; 'mean': lr times their mean", choices=REDUCES,
                       affects=(NUMBERS,), why="every update's size")
    momentum: float = _opt(0.0, "SGD momentum (0 = plain SGD)",
                           affects=(NUMBERS,), why="every update")
    lr_scaling: str = _opt("none", "'linear': multiply lr by the global batch (ranks x samples-per-rank), "
                           "reached by a linear warm-up over --warmup-steps", choices=LR_SCALINGS,
                           affects=(NUMBERS,), why="every update's size")
    warmup_steps: int = _opt(0, "steps of linear learning-rate warm-up (0 = none)",
                             affects=(NUMBERS,), why="the first updates' size")
    samples_per_rank: int = _opt(1, "samples each rank processes per step; global batch = ranks x this",
                                 affects=(NUMBERS,), why="the global batch, so every step")
    seed: int = _opt(0, "seed for initialisation and the per-epoch sample order (same on every rank)",
                     affects=(NUMBERS,), pooled="replicate",
                     why="the initial params and the sample order; runs that differ only in it are replicates of "
                         "one setting, which the reports pool")
    # --- parallelism ---
    mode: str = _opt("sync", "gradient exchange: 'sync' allreduce; 'local' no exchange (compute-only bound, "
                     "replicas diverge); 'race' lock-free one-sided accumulation (the paper's race); 'atomic' "
                     "one-sided Accumulate (lossless); 'hogwild' lock-free updates of shared parameters",
                     choices=MODES,
                     affects=(NUMBERS,), why="how the gradients are combined, and so every update")
    allreduce: str = _opt("auto", "sync exchange implementation: 'mpi' MPI_Allreduce, 'shm' node shared-memory "
                          "window, 'factored' the same sending the dense layers' inputs instead of their gradients "
                          "(1 sample per rank), 'hier' node-local then leaders, 'auto' the fastest that applies",
                          choices=ALLREDUCES,
                          affects=(NUMBERS,), pooled="implementation",
                          why="every choice sums the same gradients, but in its own order (the last bits of a "
                              "sum) and at its own speed; the accuracy report pools them")
    race_window: str = _opt("auto", "race mode window: 'shared' node shared memory, 'rma' Get/add/Put on an "
                            "owner rank, 'auto' shared when all ranks share a node", choices=RACE_WINDOWS,
                            affects=(NUMBERS,), pooled="implementation",
                            why="where the race happens, so what it loses; the accuracy report pools the windows "
                                "of a race mode")
    race_audit: bool = _opt(False, "race modes: also compute the exact sum and log how much the race lost "
                            "(its cost is excluded from step timings)",
                            affects=(TABLES,), why="adds /audit; its cost is excluded from the step timings and it "
                                                   "changes no update")
    noise_scale: bool = _opt(False, "sync mode: estimate the gradient noise scale B_simple (McCandlish et al. "
                             "2018) from each rank's gradient and the step's sum (one rank: from each sample's), "
                             "logged per window and per epoch",
                             affects=(TABLES, TIMING), why="adds /noise and /noise_epochs, and its extra sums are "
                                                           "counted in the step times; it changes no update")
    wait: str = _opt("auto", "how ranks wait for each other: 'spin', 'yield' the core (for ranks > cores), "
                     "'auto' yield when oversubscribed", choices=WAITS,
                     affects=(TIMING,), why="how a waiting rank spends its core: the same sums, sooner or later")
    pretend_nodes: int = _opt(0, "split one machine's ranks into this many pretend nodes (tests the multi-node "
                              "paths on one machine); 0 = real node layout",
                              affects=(TIMING,),
                              why="stands for the node layout, as real nodes do: it may change what 'auto' picks "
                                  "(and so the last bits of a sum), but a resumed job cannot keep its real nodes "
                                  "either, so only the timings hold it to a layout")
    folds: int = _opt(1, "k-fold cross-validation: split the ranks into k groups that train the k folds at once",
                      affects=(NUMBERS,), why="which samples train and which test")
    # --- evaluation, logging, checkpoints ---
    eval_every: int = _opt(1, "evaluate on the test set every N epochs; 0 = only after the last epoch (which "
                           "is always evaluated)",
                           affects=(), why="when the test set is scored: rows of /epochs, never an update (evaluation "
                                           "time is outside the training time)")
    check_every: int = _opt(200, "compare a checksum of every replica's params every N steps (0 = only at the end)",
                            affects=(), why="when the replicas are compared: rows of /consistency, never an update")
    log: str = _opt("", "HDF5 run log path", shown_default=DEFAULT_LOG_SHOWN,
                    affects=(), why="where the log goes")
    log_window: int = _opt(512, "steps of per-rank statistics gathered to rank 0 at once",
                           affects=(), why="how often the statistics travel to rank 0, never what they are")
    checkpoint_every: str = _opt("", "write a checkpoint every N steps ('500') or epochs ('1e'); '' = never",
                                 affects=(), why="when a checkpoint is written; a resumed run is the uninterrupted one "
                                                 "bit for bit")
    resume: str = _opt("", "continue from a checkpoint: its path, or 'auto' = the latest one for --log",
                       affects=(), why="where a run continues from, not what it computes")
    checkpoint_on_signal: bool = _opt(False, "on SIGINT, SIGTERM or SIGUSR1 write a checkpoint before stopping "
                                      "even without --checkpoint-every (with it, one is always written)",
                                      affects=(), why="whether a stopped run can continue, not what it computes")
    quiet: bool = _opt(False, "print nothing but the final summary line",
                       affects=(), why="what is printed")
    progress: str = _opt("auto", "rank 0's progress display: 'bar' (redrawn in place), 'lines' (one every 5 s), "
                         "'none', or 'auto' = a bar when stderr ends on a terminal, also through mpirun/srun's "
                         "forwarding, else lines", choices=PROGRESS_MODES,
                         affects=(), why="what is printed")

    # ------------------------------------------------------------------
    def validate(self) -> "Config":
        """Checks that need only the values; raises UserError naming the flag."""
        positive = {"--epochs": self.epochs, "--samples-per-rank": self.samples_per_rank,
                    "--folds": self.folds, "--log-window": self.log_window}
        for flag, value in positive.items():
            if value < 1:
                raise UserError(flag, f"must be at least 1, got {value}")
        non_negative = {"--steps": self.steps, "--warmup-steps": self.warmup_steps,
                        "--eval-every": self.eval_every, "--check-every": self.check_every,
                        "--pretend-nodes": self.pretend_nodes, "--seed": self.seed}
        for flag, value in non_negative.items():
            if value < 0:
                raise UserError(flag, f"must not be negative, got {value}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise UserError("--lr", f"must be a positive finite number, got {self.lr}")
        if not (self.input_scale > 0 and self.input_scale < float("inf")):
            raise UserError("--input-scale", f"must be a positive finite number, got {self.input_scale}")
        if not (0 <= self.momentum < 1):
            raise UserError("--momentum", f"must be in [0, 1), got {self.momentum}")
        for flag, value, allowed in (("--mode", self.mode, MODES), ("--reduce", self.reduce, REDUCES),
                                     ("--allreduce", self.allreduce, ALLREDUCES),
                                     ("--race-window", self.race_window, RACE_WINDOWS),
                                     ("--lr-scaling", self.lr_scaling, LR_SCALINGS), ("--wait", self.wait, WAITS)):
            if value not in allowed:
                raise UserError(flag, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
        if self.race_audit and not is_race_mode(self.mode):
            raise UserError("--race-audit", f"only applies to --mode {', '.join(RACE_MODES[:-1])} or "
                                            f"{RACE_MODES[-1]}, not {self.mode!r}")
        if self.warmup_steps and self.lr_scaling == "none":
            raise UserError("--warmup-steps", "warms up to the scaled learning rate: it needs --lr-scaling linear")
        if self.allreduce == "factored" and not factored_fits(self.samples_per_rank):
            raise UserError("--allreduce", f"'factored' sends one sample's dense-layer inputs per rank: it needs "
                            f"--samples-per-rank {FACTORED_SAMPLES_PER_RANK}, not {self.samples_per_rank}; "
                            f"use 'shm' or 'auto'")
        if self.noise_scale and self.mode != "sync":
            raise UserError("--noise-scale", f"needs every rank's own gradient and their exact sum: --mode sync, "
                                             f"not {self.mode!r}")
        checkpoint_interval(self.checkpoint_every)
        if self.resume and self.resume != "auto" and not os.path.isfile(self.resume):
            raise UserError("--resume", f"no checkpoint file at {self.resume!r}")
        if self.resume == "auto" and not self.log:
            raise UserError("--resume", "'auto' finds the latest checkpoint of a log: give --log PATH too")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def fields_that_change(*effects: str, pooled: tuple = ()) -> tuple:
    """The Config fields (in declaration order) that change any of `effects` (NUMBERS, TABLES, TIMING),
    leaving out those whose values are pooled as one of `pooled` ("replicate", "implementation")."""
    return tuple(f.name for f in fields(Config)
                 if f.metadata["affects"] & set(effects) and f.metadata["pooled"] not in pooled)


# A resumed run continues the checkpoint's trajectory and its log's tables: it must use these settings of the
# checkpointed run (the node layout may change, as a requeued job's does).
RESUME_FIELDS = fields_that_change(NUMBERS, TABLES)
# An existing log stands for a planned run (a sweep's point) only where it agrees in these: what it computed,
# what it logged and, since a sweep reports timings, what its timings stand for.
SAME_RUN_FIELDS = fields_that_change(NUMBERS, TABLES, TIMING)
# Two runs are of different settings when they differ in these; the seed's replicates are pooled.
SETTING_FIELDS = fields_that_change(NUMBERS, TIMING, pooled=("replicate",))
# The same for accuracy alone: how the exchange was carried out is pooled too.
ACCURACY_FIELDS = fields_that_change(NUMBERS, pooled=("replicate", "implementation"))
DEFAULTS = {f.name: f.default for f in fields(Config)}


def checkpoint_interval(spec: str) -> tuple[int, str] | None:
    """'500' -> (500, 'steps'); '2e' -> (2, 'epochs'); '' -> None."""
    if not spec:
        return None
    text = spec.strip().lower()
    unit = "steps"
    for suffix in ("epochs", "epoch", "e"):
        if text.endswith(suffix):
            text, unit = text[: -len(suffix)], "epochs"
            break
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError("--checkpoint-every", f"expected a positive step count ('500') or epoch count ('1e'), "
                        f"got {spec!r}")
    return count, unit


def shown_default(f) -> str:
    """What --help gives as a field's default: its metadata's `shown_default` where the empty default stands
    for something (the log path made at start-up), 'none' for other empty strings, else the value."""
    return f.metadata.get("shown_default") or (str(f.default) if f.default != "" else "none")


def build_parser(epilog: str = "") -> argparse.ArgumentParser:
    from .cli import invoked_as

    prog = invoked_as("cnnpar.train")
    parser = OneLineParser(
        allow_abbrev=False, prog=prog,
        description="Data-parallel CNN training: each MPI rank runs its samples of every step's global batch "
                    "with numba kernels, then the gradients are exchanged and all ranks take the same SGD step. "
                    f"Run under MPI: mpirun -n 12 {prog}",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        py_type = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        kwargs = {"type": py_type, "default": f.default,
                  "help": f"{help_text} (default: {shown_default(f)})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(argv=None, epilog: str = "") -> Config:
    """Command line -> validated Config. Raises UserError on any mistake."""
    args = build_parser(epilog).parse_args(argv)
    return Config(**vars(args)).validate()
