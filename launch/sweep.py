#!/usr/bin/env python3
"""Run a grid of cnnpar training runs, one HDF5 log per run, resumably.

    python launch/sweep.py                          # the `paper` preset into runs/paper/
    python launch/sweep.py --preset smoke --out /tmp/smoke
    python launch/sweep.py --preset explain --group reduce,budget
    python launch/sweep.py --ranks 1-4 --modes sync --seeds 1,2 --set lr=0.01,0.05 --set reduce=sum,mean \
        --out runs/lr -- --dataset mnist-5k --epochs 1
    python launch/sweep.py --preset paper --dry-run  # print the commands and the time estimate
    python launch/sweep.py --list-presets

Every grid point is one `mpiexec -n RANKS python -m cnnpar.train ... --log OUT/NAME.h5 --quiet` run. NAME
encodes the point: `n04-sync-seed1-reduce_mean.h5` = 4 ranks, --mode sync, --seed 1, and one `-FIELD_VALUE`
per flag given with --set (or set by the preset's group), sorted by field name. Flags after `--` apply to
every run and are not part of the names (they are still checked against existing logs, see below).

Resuming: a point whose log exists and is complete (`cnnpar.runlog.is_complete_log`) is skipped, so an
interrupted sweep continues where it stopped when the same command is run again. A complete log that was
made with other settings than the sweep now asks for is never reused: the sweep refuses to start and names
it. Incomplete or unreadable leftovers are moved to OUT/incomplete/ (with the run's output, when this sweep
ran it) and the point is run again: nothing half-done is ever mixed with the finished logs in OUT. A run
whose loss became NaN (status "diverged") is a result, not a failure: its log goes to OUT/diverged/, the
sweep says so, and a resumed sweep does not run it again.

Runs are sequential by default (--jobs 1): they compete for the same cores, and their timings are results.
A failed run is reported with the tail of its output, the sweep goes on, and it exits 1 at the end.

The launcher is the `mpiexec` next to this Python (the `mpich` wheel's) when there is one, else `mpiexec` /
`mpirun` from PATH, or `--launcher "srun --mpi=pmix"` (or any launcher; `{n}` in it is replaced by the rank
count, otherwise `-n N` is appended). Its flavour comes from `--version`: Open MPI gets `--oversubscribe`
when a run has more ranks than this machine has cores (MPICH needs nothing).

Presets (`--list-presets` prints them with their groups, run counts and estimated durations):
  smoke    CI check: ranks 1,2; --steps 200; seed 1; sync (+ race when cnnpar.race exists); mnist-5k.
  paper    Table I (the default): ranks 1..12; sync and race; seeds 1,2,3; mnist-5k; --reduce sum;
           the same --epochs for every rank count.
  explain  controlled tests of the paper's explanation (groups reduce, budget, lr-scaling, exchange, lr);
           ranks 1,2,4,8,12; seeds 1,2; analysed by analysis/explain.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cnnpar.errors import UserError, exit_on_user_error  # noqa: E402

# Flags the sweep sets itself for every run; they cannot be given with --set or after `--`.
OWN_FLAGS = ("log", "mode", "seed", "quiet", "resume")
# Config fields that do not change what a run computes; an existing log may differ in them.
IRRELEVANT_FIELDS = ("log", "quiet", "resume", "checkpoint_every", "log_window", "check_every", "eval_every")
# Training-set sizes, for the time estimate of epoch-budget runs before any run of that shape finished.
TRAIN_SIZES = {"mnist-5k": 4000, "mnist": 60000, "fashion-mnist": 60000}
TIMES_FILE = "sweep-times.json"
DIVERGED_DIR = "diverged"
TAIL_LINES = 15


# ----------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    ranks: int
    mode: str
    seed: int
    named: tuple = ()    # ((field, value), ...) sorted: flags encoded in the file name
    base: tuple = ()     # ((field, value), ...): flags common to the group, not in the name
    extra: tuple = ()    # raw train arguments given after `--`
    group: str = ""

    @property
    def name(self) -> str:
        return file_name(self.ranks, self.mode, self.seed, self.named)

    @property
    def shape(self) -> tuple:
        """Everything but the seed: runs of the same shape take about the same time."""
        return (self.ranks, self.mode, self.named, self.base, self.extra)

    def flags(self) -> dict:
        """All field -> value flags of the run (the sweep's own --mode/--seed included)."""
        out = dict(self.base)
        out.update(self.named)
        out["mode"] = self.mode
        out["seed"] = str(self.seed)
        return out

    def train_args(self, log_path: str | os.PathLike) -> list:
        """Arguments after `python -m cnnpar.train`."""
        args = ["--mode", self.mode, "--seed", str(self.seed)]
        for key, value in sorted(dict(self.base, **dict(self.named)).items()):
            args += flag_args(key, value)
        return args + list(self.extra) + ["--log", os.fspath(log_path), "--quiet"]


@dataclass
class Group:
    """A block of the grid: every setting x mode x rank count x seed."""

    name: str
    doc: str
    ranks: list
    modes: list
    seeds: list
    settings: list = field(default_factory=lambda: [{}])   # each: {field: value} encoded in the names
    base: dict = field(default_factory=dict)                # {field: value} common, not in the names
    mode_base: dict = field(default_factory=dict)           # {mode: {field: value}} for that mode only


@dataclass
class Preset:
    name: str
    doc: str
    groups: list
    out: str          # default output folder


def file_name(ranks: int, mode: str, seed: int, named=()) -> str:
    """`n04-sync-seed1-reduce_mean.h5`: ranks, mode, seed, then `-field_value` per named flag (sorted)."""
    parts = [f"n{ranks:02d}", slug(mode), f"seed{seed}"]
    parts += [f"{key}_{slug(value)}" for key, value in sorted(named)]
    return "-".join(parts) + ".h5"


def slug(value) -> str:
    """A flag value as a file-name piece: letters, digits, '.', '+' kept; anything else becomes '~'."""
    text = re.sub(r"[^A-Za-z0-9.+]", "~", str(value))
    return text or "~"


def config_fields() -> dict:
    """{field name: python type name} of cnnpar.config.Config."""
    from cnnpar.config import Config

    out = {}
    for f in dataclasses.fields(Config):
        out[f.name] = f.type if isinstance(f.type, str) else f.type.__name__
    return out


def flag_args(key: str, value: str) -> list:
    """One field's command-line arguments: ['--lr', '0.01'], ['--race-audit'] or [] for a false bool."""
    flag = "--" + key.replace("_", "-")
    if config_fields().get(key) == "bool":
        return [flag] if value == "true" else []
    return [flag, str(value)]


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def canonical_value(key: str, value: str, culprit: str) -> str:
    """A value in one spelling per meaning ('1e-2' -> '0.01', 'Yes' -> 'true'), so equal runs get one name."""
    kind = config_fields()[key]
    text = str(value).strip()
    try:
        if kind == "int":
            return str(int(text))
        if kind == "float":
            number = float(text)
            return str(int(number)) if number.is_integer() and "e" not in text.lower() and "." not in text \
                else repr(number)
    except ValueError:
        raise UserError(culprit, f"{key} takes {'an integer' if kind == 'int' else 'a number'}, "
                                 f"not {text!r}") from None
    if kind == "bool":
        if text.lower() in _TRUE:
            return "true"
        if text.lower() in _FALSE:
            return "false"
        raise UserError(culprit, f"{key} is on/off: give true or false, not {text!r}")
    if not text:
        raise UserError(culprit, f"empty value for {key}")
    return text


def normalize_key(key: str, culprit: str) -> str:
    """'lr-scaling' / 'lr_scaling' / '--lr-scaling' -> 'lr_scaling', checked against Config."""
    name = key.strip().lstrip("-").replace("-", "_")
    if name in ("ranks", "n", "np"):
        raise UserError(culprit, "give rank counts with --ranks, not --set")
    if name in ("mode", "seed"):
        raise UserError(culprit, f"give {name}s with --{name}s, not --set")
    if name in OWN_FLAGS:
        raise UserError(culprit, f"--{name} is set by the sweep itself")
    if name not in config_fields():
        known = ", ".join(sorted(n.replace("_", "-") for n in config_fields() if n not in OWN_FLAGS))
        raise UserError(culprit, f"no training flag --{name.replace('_', '-')}; the flags are: {known}")
    return name


def parse_set(spec: str) -> tuple:
    """'lr=0.01,0.05' -> ('lr', ['0.01', '0.05'])."""
    culprit = f"--set {spec}"
    key, sep, values = spec.partition("=")
    if not sep or not key.strip():
        raise UserError(culprit, "expected FIELD=VALUE[,VALUE...], e.g. --set lr=0.01,0.05")
    name = normalize_key(key, culprit)
    items = [canonical_value(name, v, culprit) for v in values.split(",")]
    return name, list(dict.fromkeys(items))


def parse_int_list(text: str, culprit: str, minimum: int = 0) -> list:
    """'1-4,8,12' -> [1, 2, 3, 4, 8, 12] (order kept, duplicates dropped)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if hi < lo:
                    raise ValueError
                out += range(lo, hi + 1)
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(culprit, f"expected numbers and ranges like 1-4,8,12, got {text!r}") from None
    if any(v < minimum for v in out):
        raise UserError(culprit, f"values must be at least {minimum}, got {text!r}")
    return list(dict.fromkeys(out))


def parse_modes(text: str) -> list:
    from cnnpar.config import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UserError("--modes", f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not modes:
        raise UserError("--modes", "no mode given")
    return list(dict.fromkeys(modes))


def expand(groups, extra=()) -> list:
    """Every point of the groups, in run order: seed outermost (a complete curve of seed 1 comes first),
    then group, mode, setting, ranks. Equal runs are kept once; two different runs that would share a
    file name are an error."""
    points, by_args, by_name = [], {}, {}
    seeds = list(dict.fromkeys(s for g in groups for s in g.seeds))
    for seed in seeds:
        for g in groups:
            if seed not in g.seeds:
                continue
            for mode, setting, ranks in itertools.product(g.modes, g.settings, g.ranks):
                base = dict(g.base)
                base.update(g.mode_base.get(mode, {}))
                for key in list(setting) + extra_fields(extra):
                    base.pop(key, None)  # --set and flags after `--` win over the preset's
                p = Point(ranks=ranks, mode=mode, seed=seed, named=tuple(sorted(setting.items())),
                          base=tuple(sorted(base.items())), extra=tuple(extra), group=g.name)
                identity = (p.ranks, tuple(sorted(p.flags().items())), p.extra)
                if identity in by_args:
                    continue
                if p.name in by_name:
                    raise UserError("grid", f"two different runs would both be logged as {p.name}: "
                                            f"{describe(by_name[p.name])} and {describe(p)}")
                by_args[identity] = p
                by_name[p.name] = p
                points.append(p)
    return points


def extra_fields(extra) -> list:
    """Config field names of the `--flag` arguments in `extra`."""
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in extra if a.startswith("--")]


def describe(p: Point) -> str:
    return " ".join([f"-n {p.ranks}"] + [a for a in p.train_args("X")[:-3]])


# ----------------------------------------------------------------------------------------------------
# presets


def race_available() -> bool:
    try:
        return importlib.util.find_spec("cnnpar.race") is not None
    except (ImportError, ValueError):
        return False


EXPLAIN_RANKS = [1, 2, 4, 8, 12]
EXPLAIN_SEEDS = [1, 2]
EXPLAIN_EPOCHS = "1"
EXPLAIN_STEPS = "4000"      # the step budget at every rank count = one epoch of mnist-5k at 1 rank
EXPLAIN_WARMUP = "20"       # warm-up steps of the linear lr scaling: 6% of the 12-rank run's 334 steps
EXPLAIN_SMALL_LR = "0.001"  # the low and high base learning rates of the `lr` group (default 0.01)
EXPLAIN_LARGE_LR = "0.05"
PAPER_EPOCHS = "10"         # sized to ~20 min quiet / ~40 min shared on 2 cores (launch/README.md)


def presets() -> dict:
    smoke_modes = ["sync", "race"] if race_available() else ["sync"]
    paper_base = {"dataset": "mnist-5k", "reduce": "sum", "epochs": PAPER_EPOCHS}
    explain_base = {"dataset": "mnist-5k", "epochs": EXPLAIN_EPOCHS}
    sum_, mean_ = {"reduce": "sum"}, {"reduce": "mean"}

    def explain_group(name, doc, settings, modes=("sync",), mode_base=None):
        return Group(name, doc, list(EXPLAIN_RANKS), list(modes), list(EXPLAIN_SEEDS), settings,
                     dict(explain_base), mode_base or {})

    return {p.name: p for p in [
        Preset("smoke", "CI check that the whole chain works: ranks 1,2; --steps 200; seed 1; "
                        f"{' and '.join(smoke_modes)}; mnist-5k. Under a minute on 2 cores.",
               [Group("smoke", "", [1, 2], smoke_modes, [1], [{}],
                      {"dataset": "mnist-5k", "steps": "200", "check_every": "100"})],
               "runs/smoke"),
        Preset("paper", "the paper's Table I: ranks 1..12; sync and race; seeds 1,2,3; mnist-5k; "
                        f"--reduce sum (the paper's unprotected sum); --epochs {PAPER_EPOCHS} for every "
                        "rank count, so bigger rank counts take fewer, bigger steps.",
               [Group("paper", "", list(range(1, 13)), ["sync", "race"], [1, 2, 3], [{}], paper_base)],
               "runs/paper"),
        Preset("explain", "controlled experiments that test the paper's explanation (analyse with "
                          "analysis/explain.py): ranks 1,2,4,8,12; seeds 1,2; mnist-5k; "
                          f"--epochs {EXPLAIN_EPOCHS} unless said otherwise. Groups (--group):",
               [explain_group("reduce", "gradient sum vs mean, same epochs", [sum_, mean_]),
                explain_group("budget", f"same epochs vs same SGD steps (--steps {EXPLAIN_STEPS} at every "
                                        "rank count), each with sum and mean",
                              [sum_, mean_, dict(sum_, steps=EXPLAIN_STEPS), dict(mean_, steps=EXPLAIN_STEPS)]),
                explain_group("lr-scaling", "mean with --lr-scaling linear (lr x global batch, "
                                            f"--warmup-steps {EXPLAIN_WARMUP}) vs sum vs plain mean",
                              [sum_, mean_, dict(mean_, lr_scaling="linear", warmup_steps=EXPLAIN_WARMUP)]),
                explain_group("exchange", "sync vs race (with --race-audit: lost updates measured) vs "
                                          "atomic, sum", [sum_], modes=("sync", "race", "atomic"),
                              mode_base={"race": {"race_audit": "true"}}),
                explain_group("lr", f"base learning rate {EXPLAIN_SMALL_LR} vs 0.01 (default) vs "
                                    f"{EXPLAIN_LARGE_LR}, sum",
                              [dict(sum_, lr=EXPLAIN_SMALL_LR), sum_, dict(sum_, lr=EXPLAIN_LARGE_LR)])],
               "runs/explain"),
    ]}


# ----------------------------------------------------------------------------------------------------
# MPI launcher


@dataclass
class Launcher:
    argv: list            # e.g. ['/venv/bin/mpiexec'] or ['srun', '--mpi=pmix']
    flavour: str          # 'mpich', 'openmpi', 'intel', 'slurm' or 'unknown'
    version: str = ""
    cores: int = 1

    def command(self, ranks: int, python: str, train_args: list) -> list:
        if any("{n}" in a for a in self.argv):
            cmd = [a.replace("{n}", str(ranks)) for a in self.argv]
        else:
            cmd = list(self.argv) + ["-n", str(ranks)]
        if self.flavour == "openmpi":
            if ranks > self.cores:
                cmd.append("--oversubscribe")
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd.append("--allow-run-as-root")
        return cmd + [python, "-m", "cnnpar.train"] + list(train_args)


def detect_flavour(version_text: str) -> tuple:
    """(flavour, version) from a launcher's `--version` output."""
    text = version_text or ""
    patterns = [
        ("openmpi", r"\(Open(?:RTE| MPI)\)\s*([\d.]+\w*)"),
        ("openmpi", r"Open MPI[^\d\n]*([\d.]+\w*)"),
        ("openmpi", r"\bprte(?:run)? \(PRRTE\)\s*([\d.]+)"),
        ("intel", r"Intel\(R\) MPI Library[^\n]*?Version\s*([\d.]+\w*)"),
        ("intel", r"Intel\(R\) MPI Library()"),
        ("mpich", r"HYDRA build details:\s*\n\s*Version:\s*([\d.]+\w*)"),
        ("mpich", r"MPICH Version:\s*([\d.]+\w*)"),
        ("slurm", r"^slurm[- ]+([\d.]+)"),
        ("mpich", r"\b(?:HYDRA|MPICH)\b()"),
    ]
    for flavour, pattern in patterns:
        match = re.search(pattern, text, re.M | re.I if flavour != "intel" else re.M)
        if match:
            return flavour, match.group(1)
    return "unknown", ""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_mpiexec() -> str:
    beside = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if (beside / name).exists():
            return str(beside / name)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    raise UserError("mpiexec", "not found next to this Python nor on PATH; install the project (its mpich "
                               "wheel brings one), load your site's MPI module, or give --launcher")


def make_launcher(spec: str | None, run=subprocess.run) -> Launcher:
    """The launcher from --launcher (or the default mpiexec) with its flavour detected."""
    argv = shlex.split(spec) if spec else [default_mpiexec()]
    if not argv:
        raise UserError("--launcher", "empty launcher")
    program = os.path.basename(argv[0])
    if program == "srun":
        return Launcher(argv, "slurm", "", usable_cores())
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if not exe or not os.path.exists(exe):
        raise UserError("--launcher", f"{argv[0]} not found")
    try:
        done = run([exe, "--version"], capture_output=True, text=True, timeout=30)
        text = (done.stdout or "") + (done.stderr or "")
    except (OSError, subprocess.TimeoutExpired) as err:
        text = ""
        print(f"sweep: note: `{argv[0]} --version` failed ({err}); launching it without flavour-specific flags",
              file=sys.stderr)
    flavour, version = detect_flavour(text)
    return Launcher(argv, flavour, version, usable_cores())


# ----------------------------------------------------------------------------------------------------
# existing logs


def expected_config(point: Point) -> dict:
    """The Config fields (as a dict) that `point` would run with; validates the flags."""
    from cnnpar.config import parse_config

    config = parse_config(point.train_args("sweep-check.h5"))
    return dataclasses.asdict(config)


def config_differences(log_config: dict, log_ranks: int, point: Point) -> list:
    """'field: log value vs sweep value' for every field that changes what the run computes."""
    want = expected_config(point)
    diffs = []
    if log_ranks != point.ranks:
        diffs.append(f"ranks: {log_ranks} (log) vs {point.ranks} (sweep)")
    for key, value in want.items():
        if key in IRRELEVANT_FIELDS:
            continue
        if key not in log_config:
            continue  # a field newer than the log: its default is assumed
        have = log_config[key]
        if isinstance(value, float) and isinstance(have, (int, float)):
            same = math.isclose(float(have), value, rel_tol=1e-12, abs_tol=0.0)
        else:
            same = have == value
        if not same:
            diffs.append(f"{key}: {have!r} (log) vs {value!r} (sweep)")
    return diffs


def classify(path: Path, point: Point) -> tuple:
    """('todo' | 'done' | 'diverged' | 'stale' | 'conflict', detail) for the point's log path.

    A run whose loss became NaN is a result, not a failure: its log lives in OUT/diverged/ and the point
    counts as done (rerunning it would diverge again)."""
    from cnnpar import runlog

    if not path.exists():
        kept = path.parent / DIVERGED_DIR / path.name
        if kept.exists():
            try:
                log = runlog.open_log(kept)
            except UserError:
                return "todo", ""
            if log.status == "diverged":
                diffs = config_differences(log.config, log.ranks, point)
                return ("conflict", "; ".join(diffs)) if diffs else ("diverged", log.status_message)
        return "todo", ""
    if not runlog.is_complete_log(path):
        try:
            log = runlog.open_log(path)
            return "stale", f"status {log.status}"
        except UserError as err:
            return "stale", err.message
    log = runlog.open_log(path)
    diffs = config_differences(log.config, log.ranks, point)
    if diffs:
        return "conflict", "; ".join(diffs)
    return "done", ""


def move_aside(path: Path, out: Path, output: str = "", reason: str = "") -> Path:
    """Move a leftover log to OUT/incomplete/NAME.STAMP.h5 (and the run's output beside it)."""
    folder = out / "incomplete"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder / f"{path.stem}.{stamp}{path.suffix}"
    n = 1
    while target.exists():
        target = folder / f"{path.stem}.{stamp}-{n}{path.suffix}"
        n += 1
    if path.exists():
        os.replace(path, target)
    if output or reason:
        target.with_suffix(".txt").write_text((f"# {reason}\n" if reason else "") + output)
    return target


# ----------------------------------------------------------------------------------------------------
# time estimates


def expected_samples(point: Point) -> float:
    """Samples the run will process (for comparing runs of different shapes)."""
    flags = point.flags()
    per_rank = int(flags.get("samples_per_rank", 1))
    steps = int(flags.get("steps", 0))
    if steps:
        return float(steps * point.ranks * per_rank)
    epochs = int(flags.get("epochs", 3))
    return float(epochs * TRAIN_SIZES.get(flags.get("dataset", "auto"), 4000))


class Estimator:
    """Predicts a run's wall time from the runs done so far.

    Model: seconds = k(shape) x samples x u(ranks). u(ranks), the wall time per sample at a rank count, is
    learned from all runs and interpolated linearly between rank counts (extrapolated from the nearest
    two beyond them): bigger rank counts take longer per sample once ranks outnumber cores, and the start-up
    of more processes costs more. k(shape) corrects it for runs of the same shape (mode, flags) once one
    has finished; runs of the same shape and rank count are simply averaged.
    """

    def __init__(self, seconds: dict | None = None):
        self.done = []   # (point, seconds)
        self.known = dict(seconds or {})   # name -> seconds (from earlier sweeps into the same folder)

    def add(self, point: Point, seconds: float) -> None:
        self.done.append((point, float(seconds)))
        self.known[point.name] = float(seconds)

    def adopt(self, point: Point) -> None:
        """Use a time recorded by an earlier sweep for a point already complete."""
        if point.name in self.known and all(p.name != point.name for p, _ in self.done):
            self.done.append((point, self.known[point.name]))

    @staticmethod
    def _interpolate(table: dict, x: float) -> float:
        xs = sorted(table)
        if len(xs) == 1:
            return table[xs[0]]
        if x <= xs[0]:
            lo, hi = xs[0], xs[1]
        elif x >= xs[-1]:
            lo, hi = xs[-2], xs[-1]
        else:
            hi = next(v for v in xs if v >= x)
            lo = max(v for v in xs if v <= x)
            if hi == lo:
                return table[lo]
        y = table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)
        return max(y, 0.5 * min(table[lo], table[hi]))

    def predict(self, point: Point) -> float | None:
        if not self.done:
            return None
        same = [s for p, s in self.done if p.shape == point.shape]
        if same:
            return sum(same) / len(same)
        per_ranks = {}
        for p, s in self.done:
            per_ranks.setdefault(p.ranks, []).append(s / expected_samples(p))
        u = self._interpolate({r: sum(v) / len(v) for r, v in per_ranks.items()}, point.ranks)
        ratios = [s / (expected_samples(p) * self._interpolate(
            {r: sum(v) / len(v) for r, v in per_ranks.items()}, p.ranks))
            for p, s in self.done if p.shape[1:] == point.shape[1:]]
        k = sum(ratios) / len(ratios) if ratios else 1.0
        return k * expected_samples(point) * u

    def remaining(self, points) -> tuple:
        """(seconds, how many of the points have no estimate)."""
        total, unknown = 0.0, 0
        for p in points:
            t = self.predict(p)
            if t is None:
                unknown += 1
            else:
                total += t
        return total, unknown


def load_times(out: Path) -> dict:
    try:
        data = json.loads((out / TIMES_FILE).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def save_times(out: Path, times: dict) -> None:
    tmp = out / (TIMES_FILE + ".tmp")
    tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
    os.replace(tmp, out / TIMES_FILE)


def hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ----------------------------------------------------------------------------------------------------
# running


@dataclass
class Outcome:
    point: Point
    ok: bool
    seconds: float
    returncode: int
    output: str
    message: str = ""
    diverged: bool = False


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = [line for line in text.rstrip().splitlines()][-lines:]
    return "\n".join("    | " + line for line in kept)


class Runner:
    def __init__(self, launcher: Launcher, python: str, out: Path, timeout: float | None):
        self.launcher = launcher
        self.python = python
        self.out = out
        self.timeout = timeout
        self.procs = set()
        self.lock = threading.Lock()
        self.stopping = False

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def command(self, point: Point) -> list:
        return self.launcher.command(point.ranks, self.python, point.train_args(self.out / point.name))

    def run(self, point: Point) -> Outcome:
        from cnnpar import runlog

        path = self.out / point.name
        cmd = self.command(point)
        start = time.monotonic()
        with self.lock:
            if self.stopping:
                return Outcome(point, False, 0.0, -1, "", "interrupted")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=self.env(), start_new_session=True)
            self.procs.add(proc)
        try:
            output, _ = proc.communicate(timeout=self.timeout)
            message = ""
        except subprocess.TimeoutExpired:
            self.kill(proc)
            output, _ = proc.communicate()
            message = f"killed after the --timeout of {self.timeout:g} s"
        except BaseException:  # Ctrl-C: the run is in its own session, so it must be stopped here
            self.kill(proc)
            raise
        finally:
            with self.lock:
                self.procs.discard(proc)
        seconds = time.monotonic() - start
        rc = proc.returncode
        if self.stopping:
            return Outcome(point, False, seconds, rc, output or "", "interrupted")
        ok = rc == 0 and not message and runlog.is_complete_log(path)
        if not ok and not message and path.exists():
            try:
                log = runlog.open_log(path)
            except UserError:
                log = None
            if log is not None and log.status == "diverged":
                (self.out / DIVERGED_DIR).mkdir(exist_ok=True)
                os.replace(path, self.out / DIVERGED_DIR / point.name)
                return Outcome(point, False, seconds, rc, output or "", f"diverged ({log.status_message}); "
                               f"log kept in {DIVERGED_DIR}/", diverged=True)
        if rc == 0 and not message and not ok:
            message = "exited 0 but its log is missing or not complete"
        elif rc != 0 and not message:
            message = f"exit status {rc}"
        if not ok and path.exists():
            moved = move_aside(path, self.out, output or "", f"{shlex.join(cmd)}\n# {message}")
            message += f"; partial log moved to {moved}"
        return Outcome(point, ok, seconds, rc, output or "", message)

    @staticmethod
    def kill(proc) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            self.kill(proc)


def final_accuracy(path: Path) -> float | None:
    from cnnpar import runlog

    try:
        log = runlog.open_log(path)
        return float(log.final["attrs"]["test_acc"]) if log.final else None
    except (UserError, KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError("command line", message)

    parser = Parser(prog="python launch/sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Run a grid of cnnpar training runs (one HDF5 log each) through mpiexec, "
                                "skipping runs whose complete log exists, so an interrupted sweep resumes.",
                    epilog="Arguments after `--` go to every training run unchanged and override the preset's value of the same "
                           "flag (they are not in the file names).\n"
                           "Example: python launch/sweep.py --ranks 1-4 --set reduce=sum,mean --out runs/r "
                           "-- --epochs 1\n\n" + preset_help())
    parser.add_argument("--preset", help="a named grid: " + ", ".join(presets()) + " (default: paper, unless "
                        "--ranks/--modes/--seeds/--set define a grid)")
    parser.add_argument("--group", help="only these groups of the preset (comma-separated; the explain preset "
                        "has reduce, budget, lr-scaling, exchange, lr)")
    parser.add_argument("--ranks", help="rank counts, e.g. 1-12 or 1,2,4,8,12 (overrides the preset's)")
    parser.add_argument("--modes", help="exchange modes, e.g. sync,race (overrides the preset's)")
    parser.add_argument("--seeds", help="seeds, e.g. 1-3 (overrides the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1[,V2...]",
                        help="a training flag and its values: one grid dimension, encoded in the file names "
                             "(repeatable): --set lr=0.01,0.05 --set reduce=sum,mean")
    parser.add_argument("--out", help="folder for the logs (default: runs/<preset>, or runs/sweep)")
    parser.add_argument("--launcher", help="MPI launcher command, e.g. \"srun --mpi=pmix\" or \"mpirun "
                        "--bind-to none\"; {n} is replaced by the rank count, else -n N is appended "
                        "(default: the mpiexec next to this Python, else on PATH)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs cnnpar.train "
                        "(default: this one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1: runs compete "
                        "for cores and their timings are results)")
    parser.add_argument("--timeout", type=float, default=0, help="kill a run after this many seconds "
                        "(default 0: never)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return parser


def preset_help() -> str:
    lines = ["Presets:"]
    for p in presets().values():
        points = expand(p.groups)
        lines.append(f"  {p.name} ({len(points)} runs, about {hms(prior_seconds(points))} on a shared 2-core machine): "
                     f"{p.doc}")
        for g in p.groups:
            if g.doc:
                n = len(expand([g]))
                lines.append(f"      {g.name} ({n} runs): {g.doc}")
    return "\n".join(lines)


# Wall seconds of one run on the 2-core reference machine, shared with other work (load ~10; measured, see
# launch/README.md): start-up + samples x per-sample time (sync), race/atomic slower by a factor that grows
# with the ranks (their per-step synchronisation when ranks outnumber cores).
PRIOR_STARTUP_S = {1: 5.0, 2: 6.0, 4: 8.0, 8: 8.0, 12: 10.0}
PRIOR_PER_SAMPLE_S = {1: 1.5e-4, 2: 2.0e-4, 4: 2.5e-4, 8: 1.5e-4, 12: 1.5e-4}
PRIOR_ONE_SIDED_FACTOR = {1: 1.0, 2: 2.0, 4: 3.0, 8: 7.0, 12: 7.0}


def prior_seconds(points) -> float:
    """A rough duration from timings on the 2-core reference machine, before any run of this sweep."""
    total = 0.0
    for p in points:
        startup = Estimator._interpolate(PRIOR_STARTUP_S, p.ranks)
        per_sample = Estimator._interpolate(PRIOR_PER_SAMPLE_S, p.ranks)
        factor = Estimator._interpolate(PRIOR_ONE_SIDED_FACTOR, p.ranks) \
            if p.mode in ("race", "atomic", "hogwild") else 1.0
        audit = 1.5 if dict(p.base).get("race_audit") == "true" else 1.0
        total += startup + expected_samples(p) * per_sample * factor * audit
    return total


def build_groups(args, extra) -> tuple:
    """(groups, out folder, preset name or None) from the command line."""
    custom = bool(args.ranks or args.modes or args.seeds or args.set)
    name = args.preset or (None if custom else "paper")
    if name:
        all_presets = presets()
        if name not in all_presets:
            raise UserError("--preset", f"unknown preset {name!r}; choose from {', '.join(all_presets)}")
        preset = all_presets[name]
        groups = [dataclasses.replace(g, settings=[dict(s) for s in g.settings], base=dict(g.base))
                  for g in preset.groups]
        out = args.out or preset.out
        if args.group:
            wanted = [w.strip() for w in args.group.split(",") if w.strip()]
            unknown = [w for w in wanted if w not in [g.name for g in groups]]
            if unknown:
                raise UserError("--group", f"{', '.join(unknown)} not in preset {name}; its groups: "
                                           f"{', '.join(g.name for g in groups)}")
            groups = [g for g in groups if g.name in wanted]
    else:
        if args.group:
            raise UserError("--group", "only applies to a --preset")
        groups = [Group("sweep", "", list(range(1, 13)), ["sync"], [1])]
        out = args.out or "runs/sweep"
    for g in groups:
        if args.ranks:
            g.ranks = parse_int_list(args.ranks, "--ranks", minimum=1)
        if args.modes:
            g.modes = parse_modes(args.modes)
        if args.seeds:
            g.seeds = parse_int_list(args.seeds, "--seeds")
    dims = [parse_set(spec) for spec in args.set]
    seen = set()
    for key, _ in dims:
        if key in seen:
            raise UserError(f"--set {key}", "given twice; list all its values in one --set")
        seen.add(key)
    for g in groups:
        for key, values in dims:
            g.settings = [dict(s, **{key: v}) for s in g.settings for v in values]
            g.base.pop(key, None)
    check_extra(extra, dims)
    return groups, Path(out), name


def check_extra(extra, dims) -> None:
    names = {key for key, _ in dims}
    for arg in extra:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in OWN_FLAGS:
            raise UserError(arg, f"--{key.replace('_', '-')} is set by the sweep itself")
        if key in names:
            raise UserError(arg, "also given with --set; give it one way")


def split_argv(argv) -> tuple:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    if args.list_presets:
        print(preset_help())
        return 0
    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1, got {args.jobs}")
    if args.timeout < 0:
        raise UserError("--timeout", f"must not be negative, got {args.timeout}")
    groups, out, preset = build_groups(args, extra)
    points = expand(groups, extra)
    if not points:
        raise UserError("grid", "no runs: the ranks, modes or seeds list is empty")
    for config in {tuple(sorted(p.flags().items())) + p.extra: p for p in points}.values():
        expected_config(config)  # every distinct flag set is valid before anything runs
    launcher = make_launcher(args.launcher)
    out = out.resolve() if not args.dry_run else out
    return sweep(points, out, launcher, args.python, args.jobs, args.timeout or None, args.dry_run, preset)


def sweep(points, out: Path, launcher: Launcher, python: str, jobs: int = 1, timeout: float | None = None,
          dry_run: bool = False, preset: str | None = None, stream=None) -> int:
    stream = stream or sys.stdout

    def say(text=""):
        print(text, file=stream, flush=True)

    states = {}
    for p in points:
        states[p.name] = classify(out / p.name, p) if out.is_dir() else ("todo", "")
    conflicts = [(p, states[p.name][1]) for p in points if states[p.name][0] == "conflict"]
    if conflicts:
        listing = "; ".join(f"{p.name} ({detail})" for p, detail in conflicts[:3])
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise UserError(str(out), f"{len(conflicts)} complete log(s) there were made with other settings than "
                                  f"this sweep asks for: {listing}{more}. Use another --out, or move them away")
    done = [p for p in points if states[p.name][0] in ("done", "diverged")]
    stale = [p for p in points if states[p.name][0] == "stale"]
    todo = [p for p in points if states[p.name][0] not in ("done", "diverged")]
    estimator = Estimator(load_times(out) if out.is_dir() else {})
    for p in done:
        estimator.adopt(p)
    left, unknown = estimator.remaining(todo)
    if unknown:
        left = prior_seconds(todo) if not estimator.done else left + prior_seconds(
            [p for p in todo if estimator.predict(p) is None])
    left /= min(jobs, max(len(todo), 1))
    flavour = launcher.flavour + (f" {launcher.version}" if launcher.version else "")
    say(f"sweep{' ' + preset if preset else ''}: {len(points)} runs into {out}: {len(done)} already complete, "
        f"{len(todo)} to run{f' ({len(stale)} over incomplete leftovers)' if stale else ''}; "
        f"estimated {hms(left) if todo else '0s'}{' (prior from the reference machine)' if unknown and todo else ''}")
    say(f"launcher: {shlex.join(launcher.argv)} ({flavour}); {launcher.cores} usable cores here")
    if dry_run:
        runner = Runner(launcher, python, out, timeout)
        for i, p in enumerate(points, 1):
            state, detail = states[p.name]
            note = {"done": "# skip: complete log exists", "diverged": f"# skip: diverged earlier "
                    f"({DIVERGED_DIR}/)", "stale": f"# rerun: leftover log ({detail}) "
                    "would be moved to incomplete/", "todo": ""}[state]
            say(f"[{i}/{len(points)}] {shlex.join(runner.command(p))}{'  ' + note if note else ''}")
        return 0
    if not todo:
        say("nothing to run.")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    for p in stale:
        moved = move_aside(out / p.name, out, reason=f"leftover found by the sweep: {states[p.name][1]}")
        say(f"moved incomplete {p.name} ({states[p.name][1]}) to {moved.relative_to(out)}")

    runner = Runner(launcher, python, out, timeout)
    times = dict(estimator.known)
    failures, diverged = [], []
    started = time.monotonic()
    lock = threading.Lock()
    counter = itertools.count(len(done) + 1)
    pending = list(todo)

    def report(outcome: Outcome) -> None:
        with lock:
            i = next(counter)
            p = outcome.point
            pending.remove(p)
            if outcome.ok:
                estimator.add(p, outcome.seconds)
                times[p.name] = outcome.seconds
                save_times(out, times)
                acc = final_accuracy(out / p.name)
                acc_text = f", test acc {100 * acc:.1f}%" if acc is not None else ""
                result = f"ok in {hms(outcome.seconds)}{acc_text}"
            elif outcome.diverged:
                diverged.append(outcome)
                estimator.add(p, outcome.seconds)
                times[p.name] = outcome.seconds
                save_times(out, times)
                result = f"{outcome.message} after {hms(outcome.seconds)}"
            else:
                failures.append(outcome)
                result = f"FAILED after {hms(outcome.seconds)}: {outcome.message}"
            left, unknown = estimator.remaining(pending)
            if unknown:
                left += prior_seconds([q for q in pending if estimator.predict(q) is None])
            left /= min(jobs, max(len(pending), 1))
            say(f"[{i}/{len(points)}] {p.name}: {result} | elapsed {hms(time.monotonic() - started)}, "
                f"left ~{hms(left) if pending else '0s'}")
            if not outcome.ok and not outcome.diverged and outcome.message != "interrupted":
                say(f"    command: {shlex.join(runner.command(p))}")
                if outcome.output.strip():
                    say(tail(outcome.output))

    pool = None
    try:
        if jobs == 1:
            for p in todo:
                report(runner.run(p))
        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
            futures = [pool.submit(runner.run, p) for p in todo]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
            pool.shutdown()
    except KeyboardInterrupt:
        runner.stop_all()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        say(f"sweep: interrupted; {len(todo) - len(pending)} of {len(todo)} runs finished. Run the same "
            "command again to resume (complete logs are kept, the interrupted one is rerun).")
        return 130

    ok = len(todo) - len(failures) - len(diverged)
    say(f"sweep: {ok} run(s) done now, {len(done)} earlier, {len(failures)} failed"
        f"{f', {len(diverged)} diverged (logs in {DIVERGED_DIR}/)' if diverged else ''}; "
        f"{hms(time.monotonic() - started)}; logs in {out}")
    if failures:
        say("failed: " + ", ".join(f.point.name for f in failures))
        return 1
    say(f"next: python analysis/table.py {out}/*.h5 --paper   |   python analysis/plots.py {out}/*.h5 "
        f"--out {out}/figures" + (f"   |   python analysis/explain.py {out} --out {out}/report"
                                  if preset == "explain" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
