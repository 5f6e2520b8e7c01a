"""The accuracy map's points: what each one runs (its flags and log name) and how (one process, real
ranks, or a noise rerun), from the `map` / `map-tiny` presets. The runner (cnnpar.experiments.map) runs them;
the report (cnnpar.analysis.map_report) reads their logs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cnnpar.errors import UserError
from cnnpar.experiments.resumable import resume_args
from cnnpar.experiments.runner import TRAIN_SIZES

# A point checkpoints every this many samples (about 1 s of sync training here, minutes of a race), so a
# stopped one continues from there; shorter points are cheaper to rerun than to checkpoint.
CHECKPOINT_SAMPLES = 20000

# the train flags a map group may set (cnnpar/experiments/presets.py); anything else would go unrecorded in the names
MAP_FLAGS = {"dataset", "epochs", "steps", "reduce", "lr", "race_window", "race_audit", "noise_scale",
             "log_window", "allreduce"}


@dataclass(frozen=True)
class MapPoint:
    dataset: str
    budget: str        # 'epochs': one epoch at every rank count; 'steps': the 1-rank epoch's step count
    ranks: int
    reduce: str
    lr: str
    seed: int
    mode: str = "sync"
    race_window: str = ""
    how: str = "one-process"   # or 'real-ranks', or 'noise' (one process, with --noise-scale)
    part: str = ""
    steps: int = 0             # the step budget ('steps'); the 'epochs' budget is one epoch
    log_window: str = ""       # noise runs: one estimate per this many steps
    race_audit: bool = False   # race runs: also measure what the race lost (--race-audit)

    def flags(self) -> list:
        """cnnpar.train flags other than -n/--seed/--log that reproduce the point."""
        out = ["--dataset", self.dataset, "--reduce", self.reduce, "--lr", self.lr]
        out += ["--epochs", "1"] if self.budget == "epochs" else ["--steps", str(self.steps)]
        if self.mode != "sync":
            out += ["--mode", self.mode, "--race-window", self.race_window]
        if self.race_audit:
            out += ["--race-audit"]
        return out

    @property
    def name(self) -> str:
        mode = (self.mode + (f"~{self.race_window}" if self.race_window else "")
                + ("~audit" if self.race_audit else ""))
        return (f"d{self.dataset}-{self.budget}-n{self.ranks:02d}-{mode}-seed{self.seed}-lr{self.lr}-"
                f"{self.reduce}.h5")

    def samples(self) -> int:
        return self.steps * self.ranks if self.budget == "steps" else TRAIN_SIZES.get(self.dataset, 60000)

    def checkpoint_every(self) -> str:
        """Steps between checkpoints ('' = none): one step is `ranks` samples, whichever way the point runs."""
        return str(max(1, CHECKPOINT_SAMPLES // self.ranks)) if self.samples() > CHECKPOINT_SAMPLES else ""

    def run_args(self, log_path) -> list:
        """Arguments of the run that computes this point: one process with N samples per rank, or N ranks;
        resumable from its checkpoint where it writes them."""
        args = self.flags() + ["--seed", str(self.seed), "--log", os.fspath(log_path), "--quiet"]
        args += resume_args(self.checkpoint_every())
        if self.how in ("one-process", "noise"):
            args += ["--samples-per-rank", str(self.ranks)]
        if self.how == "noise":
            args += ["--noise-scale"] + (["--log-window", self.log_window] if self.log_window else [])
        return args


@dataclass(frozen=True)
class Part:
    name: str
    doc: str
    points: tuple


def points_of(group) -> tuple:
    """A preset group's points (cnnpar/experiments/presets.py), seed outermost. How each runs: --noise-scale -> 'noise';
    race modes, and groups that name an --allreduce (they exist to test the exchange) -> 'real-ranks';
    other sync points -> 'one-process'."""
    points = []
    for seed in group.seeds:
        for mode in group.modes:
            for setting in group.settings:
                flags = dict(group.base, **group.mode_base.get(mode, {}), **setting)
                unknown = sorted(set(flags) - MAP_FLAGS)
                if unknown:
                    raise UserError(f"preset group {group.name}", f"cnnpar map does not run --{unknown[0]}")
                how = ("noise" if flags.get("noise_scale") == "true" else
                       "real-ranks" if mode != "sync" or "allreduce" in flags else "one-process")
                if flags.get("epochs", "1") != "1":
                    raise UserError(f"preset group {group.name}", "the map's epoch budget is one epoch")
                for n in group.ranks:
                    points.append(MapPoint(flags["dataset"], "steps" if "steps" in flags else "epochs", n,
                                           flags["reduce"], flags["lr"], seed, mode, flags.get("race_window", ""),
                                           how, group.name, int(flags.get("steps", 0)),
                                           flags.get("log_window", ""), flags.get("race_audit") == "true"))
    return tuple(points)


def parts(tiny: bool = False) -> list:
    """The map's groups (presets `map` / `map-tiny`), in the order they run: the most important first."""
    from cnnpar.experiments.grid import load_presets

    preset = load_presets()["map-tiny" if tiny else "map"]
    return [Part(g.name, g.doc or g.name, points_of(g)) for g in preset.groups]


def fit_completion(points_needed) -> Part:
    """Points that complete a Table I fit at rank counts the map skipped (see cnnpar report)."""
    return Part("fit-completion", "the best settings of each hypothesis at the rank counts the map skipped",
                tuple(points_needed))
