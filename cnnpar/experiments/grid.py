"""The sweep's grid: points, groups, presets turned into groups, file names, and checked flag values."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field

from cnnpar.errors import UserError

# Flags the sweep sets itself for every run; they cannot be given with --set or after `--`.
OWN_FLAGS = ("log", "mode", "seed", "quiet", "resume")
GROUP_KEYS = {"name", "doc", "ranks", "modes", "seeds", "settings", "base", "mode_base"}


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
    timed: bool = False   # its runs' timings are results: they run one at a time, never as an array


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


def load_presets(data: dict | None = None) -> dict:
    """{name: Preset} from the plain data of cnnpar/experiments/presets.py (a copy: callers may change the groups)."""
    if data is None:
        from cnnpar.experiments.presets import PRESETS as data
    out = {}
    for name, preset in data.items():
        groups = []
        for spec in preset["groups"]:
            unknown = set(spec) - GROUP_KEYS
            if unknown:
                raise UserError(f"preset {name}", f"group {spec.get('name')!r} has unknown keys "
                                                  f"{', '.join(sorted(unknown))}; a group has {', '.join(sorted(GROUP_KEYS))}")
            groups.append(Group(spec["name"], spec.get("doc", ""), list(spec["ranks"]), list(spec["modes"]),
                                list(spec["seeds"]), [dict(s) for s in spec.get("settings", [{}])],
                                dict(spec.get("base", {})),
                                {m: dict(b) for m, b in spec.get("mode_base", {}).items()}))
        out[name] = Preset(name, preset["doc"], groups, preset["out"], bool(preset.get("timed", False)))
    return out
