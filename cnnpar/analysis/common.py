"""Shared by the analysis commands (table, plots, explain, the map report): finding logs, grouping runs, the paper's numbers.

A *group* is the set of complete runs that share every setting but the seed: the mode, the rank
count, and any other config field whose value differs between the logs given (lr, reduce, ...).
Fields that do not change what a run computes (seed, log path, checkpointing, printing, audit) are
never settings. Speedup compares a group with the 1-rank group of the same settings.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnpar.config import DEFAULTS, SETTING_FIELDS
from cnnpar.errors import UserError
from cnnpar.runlog import RunLog, open_log

# The paper (C++/OpenMP CNN on MNIST, Ryzen 5 2600X: 6 cores / 12 threads), Table I, by thread count.
PAPER_ACC_PCT = {1: 26.0, 2: 68.4, 3: 74.8, 4: 77.8, 5: 79.8, 6: 80.8, 7: 83.4, 8: 86.2, 9: 87.8, 10: 88.8,
                 11: 89.6, 12: 91.8}
PAPER_TIME_S = {1: 69.358, 2: 41.577, 3: 35.762, 4: 31.809, 5: 28.311, 6: 26.264, 7: 27.885, 8: 27.390,
                9: 26.356, 10: 24.282, 11: 24.298, 12: 24.729}
PAPER_SPEEDUP = {n: PAPER_TIME_S[1] / t for n, t in PAPER_TIME_S.items()}
PAPER_LABEL = "paper (C++/OpenMP, Ryzen 5 2600X)"

# Config fields that never make two runs different settings: config.py's fields that change neither the numbers
# nor the timings, and the seed (a setting's replicates). A field this cnnpar does not know counts as a setting.
NOT_SETTINGS = set(DEFAULTS) - set(SETTING_FIELDS)


def note(script: str, message: str) -> None:
    print(f"{script}: note: {message}", file=sys.stderr, flush=True)


def log_paths(arguments: list) -> list:
    """Files as given; a directory stands for the *.h5 files directly inside it (sorted)."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            paths.extend(sorted(str(p) for p in path.glob("*.h5") if p.is_file()))
        elif path.exists():
            paths.append(str(path))
        else:
            raise UserError(str(argument), "no such file or directory")
    return paths


SKIP_RULE = ("A file that is not a readable run log, or a log that is not complete, is skipped with a note on "
             "stderr naming it; the script stops with a one-line error (exit status 2) only when no complete "
             "log is left.")


def load_complete_logs(arguments: list, script: str) -> list:
    """Open every log; foreign or unreadable files and incomplete logs are skipped with a note (SKIP_RULE)."""
    paths = log_paths(arguments)
    logs = []
    for path in paths:
        try:
            log = open_log(path)
        except UserError as err:
            note(script, f"skipping {path} (not a readable run log: {err.message})")
            continue
        if not log.complete:
            reason = log.status + (f": {log.status_message}" if log.status_message else "")
            note(script, f"skipping {path} (not complete: {reason})")
            continue
        logs.append(log)
    if not logs:
        where = ", ".join(map(str, arguments))
        raise UserError(where if len(where) < 200 else where[:197] + "...",
                        "no complete run logs there" if paths else "no *.h5 run logs there")
    return logs


def final_accuracy(log: RunLog) -> float:
    """Final test accuracy (fraction): /final's attribute, else the last evaluated epoch."""
    acc = log.final["attrs"].get("test_acc") if log.final else None
    if acc is None or not math.isfinite(acc):
        acc = float(log.epochs["test_acc"][-1]) if len(log.epochs["test_acc"]) else math.nan
    return float(acc)


def train_time(log: RunLog) -> float:
    t = log.final["attrs"].get("train_time_s") if log.final else None
    if t is None or not math.isfinite(t):
        t = float(log.epochs["train_time_s"][-1]) if len(log.epochs["train_time_s"]) else math.nan
    return float(t)


def lost_fraction(log: RunLog) -> float:
    """Mean over audited steps of the share of the step's R x n_params gradient contributions the race lost
    (`lost_contributions` counts them element by element, docs/race.md); NaN without audit data."""
    if log.audit is None or len(log.audit["lost_contributions"]) == 0:
        return math.nan
    n_params = sum(size for _, _, _, size in log.layout)
    return float(np.mean(log.audit["lost_contributions"]) / (log.ranks * n_params))


def setting_fields(logs: list) -> list:
    """Config fields (besides mode) whose values differ between the logs, sorted by name."""
    names = set()
    for log in logs:
        names.update(log.config)
    differing = []
    for name in sorted(names - NOT_SETTINGS - {"mode"}):
        values = {_hashable(log.config.get(name)) for log in logs}
        if len(values) > 1:
            differing.append(name)
    return differing


def _hashable(value):
    return repr(value) if isinstance(value, (list, dict)) else value


def _mean_sd(values: list) -> tuple:
    arr = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


@dataclass
class Group:
    mode: str
    settings: tuple            # ((field, value), ...) for the fields that differ between the logs
    ranks: int
    logs: list = field(default_factory=list)
    acc_mean: float = math.nan  # fraction
    acc_sd: float = math.nan    # sample sd over seeds (NaN for one run)
    time_mean: float = math.nan
    time_sd: float = math.nan
    speedup: float = math.nan
    efficiency: float = math.nan
    lost_mean: float = math.nan  # lost-update fraction, NaN without audit
    lost_sd: float = math.nan
    baseline: str = ""           # "" = same mode's 1-rank group; else which 1-rank group was used

    @property
    def runs(self) -> int:
        return len(self.logs)

    @property
    def series(self) -> tuple:
        """The key of the line this group is a point of: everything but the rank count."""
        return (self.mode, self.settings)

    def label(self) -> str:
        return series_label(self.series)


def series_label(series: tuple) -> str:
    mode, settings = series
    return ", ".join([mode] + [f"{k}={_short(v)}" for k, v in settings])


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def build_groups(logs: list) -> tuple:
    """(groups sorted by settings then ranks, the differing setting fields)."""
    fields = setting_fields(logs)
    by_key = {}
    for log in logs:
        settings = tuple((name, log.config.get(name)) for name in fields)
        key = (str(log.config.get("mode", "?")), settings, log.ranks)
        by_key.setdefault(key, Group(key[0], settings, log.ranks)).logs.append(log)
    groups = sorted(by_key.values(), key=lambda g: (g.mode, [_sort_key(v) for _, v in g.settings], g.ranks))
    for g in groups:
        g.acc_mean, g.acc_sd = _mean_sd([final_accuracy(log) for log in g.logs])
        g.time_mean, g.time_sd = _mean_sd([train_time(log) for log in g.logs])
        g.lost_mean, g.lost_sd = _mean_sd([lost_fraction(log) for log in g.logs])
    ones = {(g.mode, g.settings): g for g in groups if g.ranks == 1}
    for g in groups:
        base = ones.get((g.mode, g.settings))
        if base is None:  # at one rank every mode computes the same thing: borrow another mode's baseline
            others = [o for (mode, settings), o in sorted(ones.items(), key=lambda kv: kv[0][0] != "sync")
                      if settings == g.settings]
            if others:
                base = others[0]
                g.baseline = f"vs 1-rank {base.mode}"
        if base is not None and g.time_mean > 0 and math.isfinite(base.time_mean):
            g.speedup = base.time_mean / g.time_mean
            g.efficiency = g.speedup / g.ranks
    return groups, fields


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def series_of(groups: list) -> dict:
    """{series key: [groups by ranks]} in a stable order."""
    out = {}
    for g in groups:
        out.setdefault(g.series, []).append(g)
    return out


def physical_cores(logs: list) -> list:
    """Distinct known physical core counts of the machines the logs ran on."""
    found = set()
    for log in logs:
        value = log.env.get("physical_cores")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return sorted(found)


def logical_cores(logs: list) -> list:
    found = set()
    for log in logs:
        value = log.env.get("cores")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return sorted(found)


def fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else ""


def out_path(path: str) -> str:
    """An output file's path, its folder checked (UserError naming the path)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(path, f"the folder {folder} does not exist")
    return path
