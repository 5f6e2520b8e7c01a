#!/usr/bin/env python3
"""Test the paper's explanation of its rising accuracy with controlled experiments.

    cnnpar explain runs/explain --out runs/explain/report

writes OUT/explain.md (a short Markdown report) and one PNG figure per experiment. A folder stands for its
*.h5 and diverged/*.h5 (where cnnpar sweep keeps runs whose loss became NaN). Made for the logs of
`cnnpar sweep --preset explain`, but it works on any set of run logs: every log is sorted into
a *setting* by what it computed (mode, sum or mean, epoch or step budget, learning rate and its scaling,
...), seeds are pooled, and each experiment compares the settings that differ from the reference
(sync, --reduce sum, the epoch budget, the base lr) only in the experiment's own dimension:

  reduce      gradient sum vs mean at the same epochs
  budget      the same epochs vs the same number of SGD steps at every rank count, sum and mean
  lr-scaling  mean with --lr-scaling linear (and warm-up) vs sum vs plain mean
  exchange    sync vs race vs atomic (race: lost updates from --race-audit when logged)
  lr          base learning rates, with sum

For each setting: test accuracy against ranks (mean and sd over seeds), the gain from the fewest to the
most ranks, the slope per doubling of ranks (least squares over all runs, with its standard error), and a
verdict: `rises` / `falls` when the slope is more than two standard errors from zero and the gain is
more than 1 percentage point, else `flat` (with one seed per rank count: the gain alone, more than 2 pp).
Experiments whose logs are missing are named as missing; the conclusion uses only what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnpar.analysis.common import PAPER_ACC_PCT as PAPER_ACC
from cnnpar.config import ACCURACY_FIELDS, DEFAULTS
from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.modes import RACE_MODES

# A change of accuracy smaller than this (percentage points, fewest to most ranks) is called flat.
MIN_GAIN_PP = 1.0

# The fields that change what a run computes, the seed and the exchange's implementation pooled
# (config.ACCURACY_FIELDS): a run's "setting", with --epochs and --steps as one budget.
SETTING_FIELDS = tuple(dict.fromkeys("budget" if k in ("epochs", "steps") else k for k in ACCURACY_FIELDS))


@dataclass
class Run:
    path: str
    ranks: int
    seed: int
    acc: float            # final test accuracy, %
    steps: int            # SGD updates
    samples: int
    train_time_s: float
    setting: tuple        # ((field, value), ...) in SETTING_FIELDS order
    audit: dict | None = None
    diverged: bool = False  # the loss became NaN: no accuracy, counted apart

    def get(self, key):
        return dict(self.setting)[key]


@dataclass
class Experiment:
    key: str
    title: str
    question: str
    vary: tuple                       # fields allowed to differ from the reference
    expected: list                    # labels of the settings the explain preset runs
    fixed: dict = field(default_factory=dict)   # field -> predicate(value) on top of the reference
    needs: tuple = ()                           # (description, predicate(curves)) the comparison cannot do without


EXPERIMENTS = [
    Experiment("reduce", "Gradient sum vs mean, same epochs",
               "Is the rise tied to summing the gradients (the step on the mean gradient grows with the batch) "
               "or to averaging more samples per update?",
               ("reduce",), ["sum", "mean"], {"budget": lambda b: b[0] == "epochs"}),
    Experiment("budget", "Same epochs vs same number of SGD steps",
               "With the same number of updates at every rank count, does a bigger batch still help? (The "
               "epoch budget gives N ranks N times fewer updates.)",
               ("budget", "reduce"), ["sum, epochs", "mean, epochs", "sum, steps", "mean, steps"],
               needs=("a step-budget run", lambda cs: any(dict(c.setting)["budget"][0] == "steps" for c in cs))),
    Experiment("lr-scaling", "Learning-rate scaling with the global batch",
               "Does averaging the gradient and scaling the learning rate linearly with the global batch "
               "(with warm-up) behave like the paper's sum?",
               ("reduce", "lr_scaling", "warmup_steps"), ["sum", "mean", "mean + linear lr scaling"],
               {"budget": lambda b: b[0] == "epochs"},
               needs=("a --lr-scaling linear run", lambda cs: any(dict(c.setting)["lr_scaling"] != "none"
                                                                   for c in cs))),
    Experiment("exchange", "Exchange: sync vs race vs atomic",
               "Do the updates that the lock-free race loses change the accuracy?",
               ("mode",), ["sync", "race", "atomic"], {"budget": lambda b: b[0] == "epochs"}),
    Experiment("lr", "Base learning rate",
               "Does the rise depend on how well one rank trains in the budget (its learning rate)?",
               ("lr",), ["two or more learning rates"], {"budget": lambda b: b[0] == "epochs"}),
]


# ----------------------------------------------------------------------------------------------------
# loading


def setting_of(config: dict) -> tuple:
    """A log's config (a field missing from an older log: its default) as its setting."""
    values = {}
    for name in ACCURACY_FIELDS:
        given = config.get(name)
        values[name] = type(DEFAULTS[name])(DEFAULTS[name] if given is None else given)
    values["budget"] = ("steps", values["steps"]) if values["steps"] else ("epochs", values["epochs"])
    if values["lr_scaling"] == "none":
        values["warmup_steps"] = 0  # warms up to the scaled rate: without scaling it is no setting
    return tuple((k, values[k]) for k in SETTING_FIELDS)


def load_runs(paths) -> tuple:
    """(runs, skipped) where skipped lists (path, reason) of logs that are unreadable or not complete."""
    from cnnpar import runlog

    runs, skipped = [], []
    for path in paths:
        try:
            log = runlog.open_log(path)
        except UserError as err:
            skipped.append((str(path), err.message))
            continue
        if log.status == "diverged":
            runs.append(Run(str(path), int(log.ranks), int(log.config.get("seed", 0)), float("nan"),
                            len(log.steps["step"]), 0, float("nan"), setting_of(log.config), diverged=True))
            continue
        if not log.complete or not log.final:
            skipped.append((str(path), f"status {log.status}, not complete"))
            continue
        attrs = log.final["attrs"]
        acc = float(attrs.get("test_acc", float("nan")))
        if not math.isfinite(acc):
            skipped.append((str(path), "no final test accuracy"))
            continue
        audit = None
        if log.audit is not None and len(log.audit["step"]):
            audit = {k: float(np.nanmean(v)) for k, v in log.audit.items() if k != "step"}
        steps = attrs.get("steps", -1)
        runs.append(Run(str(path), int(log.ranks), int(log.config.get("seed", 0)), 100.0 * acc,
                        int(steps) if steps is not None and steps >= 0 else len(log.steps["step"]),
                        int(attrs.get("samples", 0) or 0), float(attrs.get("train_time_s", float("nan"))),
                        setting_of(log.config), audit))
    return runs, skipped


# ----------------------------------------------------------------------------------------------------
# statistics


@dataclass
class Curve:
    label: str
    setting: tuple
    all_runs: list

    @property
    def runs(self) -> list:
        """The runs with an accuracy (diverged ones excluded)."""
        return [r for r in self.all_runs if not r.diverged]

    @property
    def diverged(self) -> list:
        return [r for r in self.all_runs if r.diverged]

    @property
    def ranks(self) -> list:
        return sorted({r.ranks for r in self.runs})

    def at(self, n) -> list:
        return [r.acc for r in self.runs if r.ranks == n]

    def mean(self, n) -> float:
        return float(np.mean(self.at(n)))

    def sd(self, n) -> float:
        v = self.at(n)
        return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")

    def seeds(self) -> list:
        return sorted({r.seed for r in self.runs})

    def gain(self) -> tuple:
        """(mean acc at most ranks - at fewest ranks, its standard error or NaN)."""
        lo, hi = self.ranks[0], self.ranks[-1]
        a, b = self.at(lo), self.at(hi)
        se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 \
            else float("nan")
        return float(np.mean(b) - np.mean(a)), se

    def slope(self) -> tuple:
        """(accuracy change per doubling of ranks, its standard error) by least squares over all runs."""
        x = np.log2([r.ranks for r in self.runs])
        y = np.array([r.acc for r in self.runs])
        if len(set(x)) < 2:
            return float("nan"), float("nan")
        A = np.vstack([np.ones_like(x), x]).T
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        dof = len(y) - 2
        if dof < 1:
            return float(coef[1]), float("nan")
        resid = y - A @ coef
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.inv(A.T @ A)
        return float(coef[1]), math.sqrt(max(cov[1, 1], 0.0))

    def verdict(self) -> str:
        """'rises' / 'falls': the slope is more than two standard errors from 0 AND the accuracy moves by
        more than MIN_GAIN_PP from the fewest to the most ranks; else 'flat'. With one seed per rank count
        there is no seed spread: the verdict then rests on the gain alone (more than 2 x MIN_GAIN_PP)."""
        s, se = self.slope()
        g, _ = self.gain()
        if not math.isfinite(s):
            return "n/a"
        if max(len(self.at(n)) for n in self.ranks) < 2 or not math.isfinite(se):
            word = "rises" if g > 2 * MIN_GAIN_PP else "falls" if g < -2 * MIN_GAIN_PP else "flat"
            return word + " (1 seed)"
        if s - 2 * se > 0 and g > MIN_GAIN_PP:
            return "rises"
        if s + 2 * se < 0 and g < -MIN_GAIN_PP:
            return "falls"
        return "flat"

    def value(self, key):
        return dict(self.setting)[key]

    def steps_at(self, n) -> int:
        return int(np.median([r.steps for r in self.runs if r.ranks == n]))

    def step_size(self, n) -> float:
        """The learning rate applied to the MEAN gradient of the step (after warm-up)."""
        s = dict(self.setting)
        batch = n * s["samples_per_rank"]
        lr = s["lr"] * (batch if s["lr_scaling"] == "linear" else 1)
        return lr * (batch if s["reduce"] == "sum" else 1)


def paper_gain(lo: int, hi: int) -> float | None:
    if lo in PAPER_ACC and hi in PAPER_ACC:
        return PAPER_ACC[hi] - PAPER_ACC[lo]
    return None


def paper_correlation(curve: Curve) -> float:
    common = [n for n in curve.ranks if n in PAPER_ACC]
    if len(common) < 3:
        return float("nan")
    a = np.array([curve.mean(n) for n in common])
    b = np.array([PAPER_ACC[n] for n in common])
    if a.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def differ(c1: Curve, c2: Curve, n) -> tuple:
    """(difference of means at n, whether it exceeds two standard errors; None when not measurable)."""
    a, b = c1.at(n), c2.at(n)
    if not a or not b:
        return None, None
    d = float(np.mean(a) - np.mean(b))
    if len(a) > 1 and len(b) > 1:
        se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
        return d, abs(d) > 2 * se if se > 0 else d != 0
    return d, None


# ----------------------------------------------------------------------------------------------------
# experiments


def reference(runs) -> dict:
    """The reference setting: sync, sum, the epoch budget, no lr scaling, else the most common values."""
    from cnnpar.config import Config

    defaults = dict(setting_of(dataclasses.asdict(Config())))

    def common(key, pool):
        """The most common value; a tie goes to cnnpar's default, then to the first seen."""
        values = Counter(dict(r.setting)[key] for r in pool)
        if not values:
            return None
        top = max(values.values())
        tied = [v for v, c in values.items() if c == top]
        return defaults[key] if defaults[key] in tied else tied[0]

    ref = {"mode": "sync", "reduce": "sum", "lr_scaling": "none", "warmup_steps": 0}
    pool = [r for r in runs if all(r.get(k) == v for k, v in ref.items())] or runs
    epoch_pool = [r for r in pool if r.get("budget")[0] == "epochs"]
    ref["budget"] = common("budget", epoch_pool or pool)
    for key in SETTING_FIELDS:
        if key not in ref:
            ref[key] = common(key, pool)
    return ref


def budget_text(budget) -> str:
    kind, count = budget
    return f"{count} {kind if count != 1 else kind.rstrip('s')}"


def plural(n: int, word: str = "rank") -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def trend(c: Curve) -> str:
    v = c.verdict()
    return "is flat" + v[4:] if v.startswith("flat") else v


def label(setting: dict, exp: Experiment) -> str:
    parts = []
    for key in exp.vary:
        v = setting[key]
        if key == "budget":
            parts.append(budget_text(v))
        elif key == "lr_scaling":
            if v != "none":
                parts.append(f"{v} lr scaling")
        elif key == "warmup_steps":
            if setting["lr_scaling"] != "none":
                parts.append(f"warm-up {v}")
        elif key == "lr":
            parts.append(f"lr {v:g}")
        else:
            parts.append(str(v))
    return ", ".join(parts)


def curves_for(exp: Experiment, runs, ref: dict) -> list:
    groups = defaultdict(list)
    for r in runs:
        s = dict(r.setting)
        if any(s[k] != ref[k] for k in SETTING_FIELDS if k not in exp.vary):
            continue
        if any(not pred(s[k]) for k, pred in exp.fixed.items()):
            continue
        groups[r.setting].append(r)
    curves = [Curve(label(dict(k), exp), k, v) for k, v in groups.items()]
    order = {"sum": 0, "mean": 1, "sync": 0, "race": 1, "atomic": 2, "hogwild": 3, "local": 4}

    def sort_key(c):
        s = dict(c.setting)
        return (s["budget"][0] != "epochs", s["budget"][1], order.get(s["reduce"], 9), s["lr_scaling"],
                order.get(s["mode"], 9), s["lr"])

    return sorted(curves, key=sort_key)


def fmt(x, digits=1, sign=False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def pm(mean, sd, sign=False) -> str:
    return fmt(mean, 1, sign) + (f" ± {fmt(sd)}" if sd is not None and math.isfinite(sd) else "")


def curve_table(curves) -> list:
    all_ranks = sorted({n for c in curves for n in c.ranks})
    head = ["setting"] + [f"n={n}" for n in all_ranks] + ["gain (pp)", "slope / doubling", "verdict",
                                                          "SGD steps", "step size on mean grad"]
    if any(c.diverged for c in curves):
        head.append("diverged (NaN loss)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in curves:
        cells = [c.label]
        for n in all_ranks:
            cells.append(pm(c.mean(n), c.sd(n)) if c.at(n) else "–")
        g, gse = c.gain()
        s, sse = c.slope()
        lo, hi = c.ranks[0], c.ranks[-1]
        cells += [pm(g, gse, sign=True), pm(s, sse, sign=True), c.verdict(),
                  f"{c.steps_at(lo)} → {c.steps_at(hi)}", f"{c.step_size(lo):.3g} → {c.step_size(hi):.3g}"]
        if len(head) > len(cells):
            cells.append(", ".join(f"n={r.ranks} seed {r.seed}" for r in c.diverged) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(exp: Experiment, curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in curves:
        xs = c.ranks
        ax.errorbar(xs, [c.mean(n) for n in xs], yerr=[0 if not math.isfinite(c.sd(n)) else c.sd(n) for n in xs],
                    marker="o", capsize=3, label=f"{c.label} ({plural(len(c.seeds()), 'seed')})")
    xs = sorted(PAPER_ACC)
    ax.plot(xs, [PAPER_ACC[n] for n in xs], "--", color="0.5", label="paper (threads)")
    ax.set_xlabel("ranks (= samples per step)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(exp.title)
    ax.set_xticks(sorted({n for c in curves for n in c.ranks} | {1, 12}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# findings: sentences built only from measured numbers


def curve_sentence(c: Curve) -> str:
    g, gse = c.gain()
    s, sse = c.slope()
    lo, hi = c.ranks[0], c.ranks[-1]
    pg = paper_gain(lo, hi)
    text = (f"**{c.label}**: {fmt(c.mean(lo))}% at {plural(lo)} → {fmt(c.mean(hi))}% at "
            f"{plural(hi)} ({pm(g, gse, sign=True)} pp; {pm(s, sse, sign=True)} pp per doubling): {c.verdict()}")
    if pg is not None and "rises" in c.verdict():
        text += f", {100 * g / pg:.0f}% of the paper's {pg:+.1f} pp over the same ranks"
    return text + "."


def compare_sentence(a: Curve, b: Curve) -> str:
    shared = [n for n in a.ranks if n in b.ranks]
    if not shared:
        return f"{a.label} and {b.label} share no rank count."
    diffs = [(n, *differ(a, b, n)) for n in shared]
    n_max, d_max, sig_max = max(diffs, key=lambda t: abs(t[1]))
    significant = [n for n, d, sig in diffs if sig]
    text = f"{a.label} minus {b.label}: largest difference {d_max:+.1f} pp at {plural(n_max)}; "
    if any(sig is None for _, _, sig in diffs):
        text += "one seed at some rank counts, so no noise estimate there."
    elif significant:
        text += f"beyond two standard errors at {', '.join(map(str, significant))} ranks."
    else:
        text += "within two standard errors at every rank count."
    return text


def find(curves, **want):
    for c in curves:
        s = dict(c.setting)
        if all((s[k][0] == v) if k == "budget" else s[k] == v for k, v in want.items()):
            return c
    return None


def rising(c: Curve | None) -> bool:
    return c is not None and c.verdict().startswith("rises")


def falling(c: Curve | None) -> bool:
    return c is not None and c.verdict().startswith("falls")


def interpret(exp: Experiment, curves) -> list:
    """A few sentences that follow from the verdicts; nothing is said about settings that were not run."""
    out = []
    if exp.key == "reduce":
        s, m = find(curves, reduce="sum"), find(curves, reduce="mean")
        if s and m:
            out.append(compare_sentence(s, m))
            if rising(s) and not rising(m):
                out.append("The rise needs the sum: with the same samples per update but the mean gradient "
                           f"(the step size no longer growing with the batch) the curve {trend(m)}. "
                           "Averaging more samples per update does not by itself raise the accuracy here.")
            elif rising(s) and rising(m):
                out.append("Both rise: bigger batches help here even when the step size does not grow with "
                           "them, which is what the paper's 'more accurate update' explanation predicts.")
            elif not rising(s):
                out.append("The summed gradient does not produce a rising curve in this setting.")
    elif exp.key == "budget":
        se, me = find(curves, reduce="sum", budget="epochs"), find(curves, reduce="mean", budget="epochs")
        ss, ms = find(curves, reduce="sum", budget="steps"), find(curves, reduce="mean", budget="steps")
        if me and ms:
            out.append(compare_sentence(ms, me))
            if rising(ms) and not rising(me):
                out.append("With the same number of updates, bigger averaged batches do give higher accuracy "
                           "(a less noisy gradient, and N times more samples seen); with the same epochs they "
                           f"do not (the curve {trend(me)}), because N ranks then take N times fewer steps.")
            elif rising(ms):
                out.append("Averaged bigger batches raise accuracy under both budgets.")
            else:
                out.append(f"Even with the same number of updates, the averaged-batch curve {trend(ms)}.")
        if se and ss:
            out.append(compare_sentence(ss, se))
        if not out:
            out.append("Needs the same reduce with both budgets to compare.")
    elif exp.key == "lr-scaling":
        out.append("Note: without warm-up, the mean with linear scaling is the sum exactly (lr × N × mean = lr × "
                   "sum); the warm-up, which starts from the base lr, is the only difference between them.")
        s = find(curves, reduce="sum", lr_scaling="none")
        m = find(curves, reduce="mean", lr_scaling="none")
        lin = find(curves, reduce="mean", lr_scaling="linear")
        if lin and s:
            out.append(compare_sentence(lin, s))
            sigs = [differ(lin, s, n)[1] for n in lin.ranks if n in s.ranks]
            if sigs and not any(sigs) and None not in sigs:
                out.append("Mean with the learning rate scaled linearly by the global batch matches the sum "
                           "within seed noise: the sum *is* the linear scaling rule (lr × batch on the mean "
                           "gradient), warm-up aside.")
            elif any(sigs):
                out.append("The scaled mean and the sum differ beyond seed noise at some rank counts "
                           "(the warm-up is the only difference between them).")
        if lin and m:
            out.append(compare_sentence(lin, m))
    elif exp.key == "exchange":
        sync = find(curves, mode="sync")
        for other in RACE_MODES:
            c = find(curves, mode=other)
            if sync and c:
                out.append(compare_sentence(c, sync))
        race = find(curves, mode="race")
        if race:
            audited = [r for r in race.runs if r.audit]
            if audited:
                hi = max(r.ranks for r in audited)
                at_hi = [r for r in audited if r.ranks == hi]
                frac = np.mean([r.audit.get("frac_elements_differ", float("nan")) for r in at_hi])
                rel = np.mean([r.audit.get("rel_l2_error", float("nan")) for r in at_hi])
                out.append(f"Race audit at {hi} ranks: per step, on average {100 * frac:.2f}% of the gradient's "
                           f"elements differed from the exact sum (lost contributions), relative L2 error "
                           f"{rel:.2g}.")
            else:
                out.append("No race audit in these logs (run race with --race-audit to measure lost updates).")
    elif exp.key == "lr":
        by_lr = sorted(curves, key=lambda c: c.value("lr"))
        if len(by_lr) >= 2:
            out.append("; ".join(f"{c.label}: {fmt(c.mean(c.ranks[0]))}% at {plural(c.ranks[0])}, "
                                 f"{pm(*c.gain(), sign=True)} pp to {c.ranks[-1]}" for c in by_lr) + ".")
            risers = [c for c in by_lr if rising(c)]
            fallers = [c for c in by_lr if falling(c)]
            if risers and risers[0] is by_lr[0]:
                out.append(f"The smallest base lr ({by_lr[0].label}) gives a rising curve: with the sum, N ranks "
                           "take an N times bigger step, which helps where one rank is under-trained in the "
                           "budget.")
            if fallers and all(c.value("lr") > by_lr[0].value("lr") for c in fallers):
                out.append(f"Large base learning rates ({', '.join(c.label for c in fallers)}) make the summed "
                           "step (lr × N on the mean gradient) too large at many ranks, and accuracy falls.")
            if not risers:
                out.append("No base learning rate gives a rising curve.")
    return out


def conclusion(by_key: dict, ref: dict) -> list:
    lines = []
    main = next((c for curves in by_key.values() for c in curves
                 if all(dict(c.setting)[k] == ref[k] for k in SETTING_FIELDS)), None)
    if main is None:
        return ["The reference setting (sync, sum, epoch budget) was not run, so no conclusion is drawn."]
    g, gse = main.gain()
    lo, hi = main.ranks[0], main.ranks[-1]
    pg = paper_gain(lo, hi)
    verdict = main.verdict()
    reproduced = "reproduces" if rising(main) else "does not reproduce"
    lines.append(f"- The paper's setting (summed gradient, the same epochs for every rank count) {reproduced} a "
                 f"rising curve here: {pm(g, gse, sign=True)} pp from {lo} to {hi} ranks (verdict: {verdict})"
                 + (f", against the paper's {pg:+.1f} pp." if pg is not None else "."))
    mean_e = find(by_key.get("reduce", []), reduce="mean")
    if mean_e:
        lines.append(f"- Averaging instead of summing (same epochs): {mean_e.verdict()} "
                     f"({pm(*mean_e.gain(), sign=True)} pp). " +
                     ("So what rises with the ranks is tied to the step size growing with the batch (lr × N on "
                      "the mean gradient), not to the averaging of more samples per update."
                      if rising(main) and not rising(mean_e) else
                      "Sum and mean behave alike across ranks here." if main.verdict() == mean_e.verdict() else
                      "With the mean, N ranks take N times fewer steps of the same size, and accuracy falls; "
                      "the sum takes N times fewer steps N times bigger, keeping (steps × step size) the same, "
                      "and stays flat." if falling(mean_e) and not rising(main) and not falling(main) else
                      "Sum and mean differ in trend."))
    ms = find(by_key.get("budget", []), reduce="mean", budget="steps")
    if ms:
        lines.append(f"- With the same number of updates (mean, step budget): {ms.verdict()} "
                     f"({pm(*ms.gain(), sign=True)} pp). " +
                     ("These runs also process N times more samples, so the rise is the batch's less noisy "
                      "gradient plus more data, not a free gain." if rising(ms) else
                      "Even with N times more samples per update, the 'more accurate' batched update does not "
                      "raise the accuracy measurably here."))
    lin = find(by_key.get("lr-scaling", []), lr_scaling="linear")
    if lin:
        lines.append(f"- Mean with linear learning-rate scaling: {lin.verdict()} ({pm(*lin.gain(), sign=True)} pp).")
    race = find(by_key.get("exchange", []), mode="race")
    sync = find(by_key.get("exchange", []), mode="sync")
    if race and sync:
        diffs = [differ(race, sync, n) for n in race.ranks if n in sync.ranks]
        sig = [s for _, s in diffs if s]
        biggest = max((abs(d) for d, _ in diffs if d is not None), default=float("nan"))
        unknown = any(s is None for _, s in diffs)
        lines.append(f"- The race's lost updates: race vs sync differ by at most {biggest:.1f} pp"
                     + (" (beyond seed noise at some rank counts)." if sig else
                        " (one seed at some rank counts: no seed noise to compare with)." if unknown else
                        ", within seed noise: losing updates does not change the accuracy measurably."))
    lrs = by_key.get("lr", [])
    if len(lrs) >= 2:
        low = min(lrs, key=lambda c: c.value("lr"))
        lines.append(f"- Lower base lr ({low.value('lr'):g}): {low.verdict()} ({pm(*low.gain(), sign=True)} pp), "
                     f"{fmt(low.mean(low.ranks[0]))}% at {plural(low.ranks[0])}.")
    lines.append("- The paper credits the rise to fewer, more accurate batched updates. The comparisons above "
                 "separate that effect (mean, same steps) from the step-size effect of summing (sum vs mean, same "
                 "epochs); read each verdict against its seed spread before generalising.")
    return lines


def write_report(runs, skipped, out: Path, sources) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Why does accuracy rise with the rank count? Controlled experiments", ""]
    if not runs:
        raise UserError(str(sources[0]) if sources else "LOGS", "no complete run log among the files given")
    ref = reference(runs)
    seeds = sorted({r.seed for r in runs})
    md += [f"{len(runs)} complete run logs ({len(seeds)} seed(s): {', '.join(map(str, seeds))}); dataset "
           f"`{ref['dataset']}`, arch `{ref['arch']}`. Reference setting: `--mode sync --reduce sum`, "
           f"{budget_text(ref['budget'])}, lr {ref['lr']:g}. Accuracy is the final test accuracy (%), "
           "mean ± sd over seeds; *gain* is from the fewest to the most ranks (± its standard error); *slope* "
           "is per doubling of ranks (least squares over every run, ± standard error); *rises*/*falls* "
           "when the slope is more than two standard errors from 0. *Step size on mean grad* is the learning "
           "rate times the factor the update applies to the batch's mean gradient (N for a sum of N samples).",
           "",
           "The paper (Table I, OpenMP threads, summed gradient, same epochs): "
           + ", ".join(f"{n}: {a}" for n, a in PAPER_ACC.items()) + " % — "
           f"{PAPER_ACC[12] - PAPER_ACC[1]:+.1f} pp from 1 to 12 threads.", ""]
    if skipped:
        md += [f"Skipped {len(skipped)} file(s): " + "; ".join(f"`{os.path.basename(p)}` ({why})"
                                                               for p, why in skipped[:10])
               + (" …" if len(skipped) > 10 else ""), ""]
    by_key = {}
    for i, exp in enumerate(EXPERIMENTS, 1):
        md += [f"## {i}. {exp.title}", "", exp.question, ""]
        curves = curves_for(exp, runs, ref)
        dead = [c.label for c in curves if not c.runs]
        curves = [c for c in curves if c.runs]
        if dead:
            md += [f"Every run diverged (NaN loss) for: {', '.join(dead)}.", ""]
        found = [c.label for c in curves]
        lacking = f" and {exp.needs[0]}" if exp.needs and not exp.needs[1](curves) else ""
        if len(curves) < 2 or lacking:
            md += [f"**Missing**: this experiment needs at least two settings{lacking}; found "
                   f"{'; '.join(found) if found else 'none'} (the explain preset runs: "
                   f"{'; '.join(exp.expected)}). Run `cnnpar sweep --preset explain --group {exp.key}`.",
                   ""]
            continue
        by_key[exp.key] = curves
        figure = f"explain-{exp.key}.png"
        plot(exp, curves, out / figure)
        md += [f"![{exp.title}]({figure})", ""] + curve_table(curves) + [""]
        thin = [c.label for c in curves if len(c.ranks) < 2]
        if thin:
            md += [f"Only one rank count for: {', '.join(thin)}.", ""]
        md += ["- " + curve_sentence(c) for c in curves if len(c.ranks) >= 2]
        md += ["- " + line for line in interpret(exp, curves)] + [""]
    md += ["## Conclusion", ""] + conclusion(by_key, ref) + [""]
    missing = [e.key for e in EXPERIMENTS if e.key not in by_key]
    if missing:
        md += [f"Not measured: {', '.join(missing)}; the conclusion says nothing about them.", ""]
    path = out / "explain.md"
    path.write_text("\n".join(md))
    return path


@exit_on_user_error
def main(argv=None) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError("command line", message)

    parser = Parser(allow_abbrev=False, prog="cnnpar explain", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 2)[2] + "\n\nA file that is not a readable run log, or a log that "
                    "is not complete, is skipped with a note on stderr\nnaming it (diverged runs count, at "
                    "chance accuracy); the script stops with a one-line error\n(exit status 2) only when no "
                    "usable log is left, and then leaves no --out folder behind.")
    parser.add_argument("logs", nargs="+", help="run logs (.h5) or folders of them, e.g. runs/explain")
    parser.add_argument("--out", required=True, help="folder for explain.md and the figures")
    args = parser.parse_args(argv)
    paths = []
    for p in args.logs:
        if os.path.isdir(p):
            paths += sorted(str(q) for q in Path(p).glob("*.h5"))
            paths += sorted(str(q) for q in Path(p).glob("diverged/*.h5"))
        else:
            paths.append(p)
    runs, skipped = load_runs(paths)
    for path, why in skipped:
        print(f"explain: skipped {path}: {why}", file=sys.stderr)
    out = Path(args.out)
    created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    try:
        report = write_report(runs, skipped, out, args.logs)
    except BaseException:
        for folder in created:  # a failed report leaves the file system as it found it
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    print(f"explain: {len(runs)} runs -> {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
