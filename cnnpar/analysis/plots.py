#!/usr/bin/env python3
"""Figures from run logs, as PNG (150 dpi) and PDF, sized for a README (6.4 x 4.2 in).

    cnnpar plots LOGS... --out DIR

LOGS are run logs or folders of them (*.h5 directly inside). Runs are grouped as in cnnpar table
(mode, ranks, and every other config field that differs between the logs; seeds pooled). Writes:

  speedup       speedup against ranks per setting, with the ideal line, the machine's physical core
                count, and the paper's speedup for reference
  accuracy      final test accuracy against ranks: mean, and the spread over seeds (sd error bars, min-max
                band), with the paper's accuracy for reference
  loss          training loss against samples seen (per-step loss averaged in bins of samples, seeds
                averaged), one line per rank count
  time_split    mean per-step time of a rank split into compute / exchange / wait, per rank count
  lost_updates  lost-update fraction against ranks for race modes (only when logs hold --race-audit data)

A file that is not a readable run log, or a log that is not complete, is skipped with a note on stderr
naming it; the script stops with a one-line error (exit status 2) only when no complete log is left.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from cnnpar.analysis.common import (PAPER_ACC_PCT, PAPER_LABEL, PAPER_SPEEDUP, SKIP_RULE, build_groups, final_accuracy,
                     load_complete_logs, logical_cores, note, physical_cores, series_label, series_of)

from cnnpar.errors import UserError, exit_on_user_error

SCRIPT = "plots.py"
FIGSIZE = (6.4, 4.2)
DPI = 150
PAPER_STYLE = dict(color="0.25", linestyle=":", marker="s", markersize=4, linewidth=1.4, zorder=2)
LOSS_BINS = 120  # per-step losses are averaged over this many bins of samples seen (per rank count)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError("command line", message)


def parse_args(argv):
    parser = _Parser(allow_abbrev=False, prog="cnnpar plots", description=__doc__.split("\n\n")[0],
                     epilog=SKIP_RULE)
    parser.add_argument("logs", nargs="+", metavar="LOGS", help="run logs (.h5) or folders of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the figures (created if needed)")
    return parser.parse_args(argv)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight",
                         "pdf.fonttype": 42, "legend.frameon": True, "legend.framealpha": 0.85,
                         "legend.edgecolor": "none"})
    return plt


def _colors(n):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _rank_ticks(ax, ranks):
    ranks = sorted(set(ranks))
    if len(ranks) <= 16:
        ax.set_xticks(ranks)
    ax.set_xlim(0.5, max(ranks) + 0.5)


def _save(fig, out: str, name: str, written: list) -> None:
    for ext in ("png", "pdf"):
        path = os.path.join(out, f"{name}.{ext}")
        fig.savefig(path, dpi=DPI)
        written.append(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _core_lines(ax, logs):
    for cores in physical_cores(logs):
        ax.axvline(cores, color="tab:red", linestyle="--", linewidth=1, alpha=0.7,
                   label=f"physical cores of this machine ({cores})")
    physical = set(physical_cores(logs))
    for cores in logical_cores(logs):
        if cores not in physical:
            ax.axvline(cores, color="tab:red", linestyle=":", linewidth=1, alpha=0.5,
                       label=f"hardware threads ({cores})")


def plot_speedup(plt, groups, logs, out, written):
    fig, ax = plt.subplots(figsize=FIGSIZE)
    series = series_of(groups)
    all_ranks = [g.ranks for g in groups] + [1]
    top = max(all_ranks)
    paper_ranks = [n for n in sorted(PAPER_SPEEDUP) if n <= max(top, 12)]
    ideal_top = max(top, max(paper_ranks))
    ax.plot([1, ideal_top], [1, ideal_top], color="0.6", linewidth=1, linestyle="-", label="ideal (speedup = ranks)",
            zorder=1)
    drawn = 0
    for color, (key, members) in zip(_colors(len(series)), series.items()):
        points = [(g.ranks, g.speedup) for g in members if math.isfinite(g.speedup)]
        if not points:
            continue
        x, y = zip(*points)
        ax.plot(x, y, marker="o", markersize=4.5, color=color, linewidth=1.8, label=series_label(key), zorder=3)
        drawn += 1
    ax.plot(paper_ranks, [PAPER_SPEEDUP[n] for n in paper_ranks], label=PAPER_LABEL, **PAPER_STYLE)
    _core_lines(ax, logs)
    if not drawn:
        ax.text(0.5, 0.5, "no 1-rank runs among the logs: speedup unknown", transform=ax.transAxes,
                ha="center", va="center", color="tab:red")
    ymax = max([PAPER_SPEEDUP[n] for n in paper_ranks] + [g.speedup for g in groups if math.isfinite(g.speedup)])
    ax.set_ylim(0, max(2.0, ymax * 1.25))
    _rank_ticks(ax, all_ranks + paper_ranks)
    ax.set_xlabel("MPI ranks (paper: OpenMP threads)")
    ax.set_ylabel("speedup over 1 rank (training time ratio)")
    ax.set_title("Speedup")
    ax.legend(loc="upper left")
    _save(fig, out, "speedup", written)


def plot_accuracy(plt, groups, out, written):
    fig, ax = plt.subplots(figsize=FIGSIZE)
    series = series_of(groups)
    for color, (key, members) in zip(_colors(len(series)), series.items()):
        members = [g for g in members if math.isfinite(g.acc_mean)]
        if not members:
            continue
        x = np.array([g.ranks for g in members])
        y = np.array([100 * g.acc_mean for g in members])
        sd = np.array([100 * g.acc_sd if math.isfinite(g.acc_sd) else 0.0 for g in members])
        lo = np.array([100 * min(_accs(g)) for g in members])
        hi = np.array([100 * max(_accs(g)) for g in members])
        if np.any(hi > lo):
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        seeds = sorted({g.runs for g in members})
        seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        ax.errorbar(x, y, yerr=sd, marker="o", markersize=4.5, color=color, linewidth=1.8, capsize=3,
                    label=f"{series_label(key)} (mean ± sd, {seeds_text} seed{'s' if seeds[-1] > 1 else ''})",
                    zorder=3)
    paper_ranks = sorted(PAPER_ACC_PCT)
    ax.plot(paper_ranks, [PAPER_ACC_PCT[n] for n in paper_ranks], label=PAPER_LABEL, **PAPER_STYLE)
    _rank_ticks(ax, [g.ranks for g in groups] + paper_ranks)
    values = [100 * a for g in groups for a in _accs(g)] + list(PAPER_ACC_PCT.values())
    ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 5))
    ax.set_xlabel("MPI ranks (paper: OpenMP threads)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Accuracy (shaded: min-max over seeds)")
    ax.legend(loc="lower right")
    _save(fig, out, "accuracy", written)


def _accs(group):
    return [a for a in (final_accuracy(log) for log in group.logs) if math.isfinite(a)]


def _binned_loss(log, edges):
    """Per-step loss averaged over bins of samples seen (weighted by each step's samples)."""
    samples = log.steps["samples"].astype(np.float64)
    loss = log.steps["loss"].astype(np.float64)
    ok = np.isfinite(loss) & (samples > 0)
    seen = np.cumsum(samples)
    index = np.clip(np.searchsorted(edges, seen[ok], side="left") - 1, 0, len(edges) - 2)
    weight = np.bincount(index, weights=samples[ok], minlength=len(edges) - 1)
    total = np.bincount(index, weights=(loss * samples)[ok], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def _panels(plt, n, sharey=True):
    """One axes per series: a README-size figure for one, a row (then rows) of up to 3 panels for more."""
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    size = FIGSIZE if n == 1 else (3.5 * ncols, 3.4 * nrows + 0.4)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, sharey=sharey, sharex=False, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_loss(plt, groups, out, written):
    import matplotlib

    series = series_of(groups)
    fig, axes = _panels(plt, len(series))
    all_ranks = sorted({g.ranks for g in groups})
    cmap = matplotlib.colormaps["viridis"]
    color_of = {n: cmap(0.9 * i / max(1, len(all_ranks) - 1)) for i, n in enumerate(all_ranks)}
    for ax, (key, members) in zip(axes, series.items()):
        drawn = 0
        for g in members:
            logs = [log for log in g.logs if len(log.steps["loss"])]
            if not logs:
                continue
            end = max(float(log.steps["samples"].sum()) for log in logs)
            steps = min(len(log.steps["loss"]) for log in logs)
            edges = np.linspace(0.0, end, max(2, min(LOSS_BINS, steps)) + 1)  # a bin holds at least a step
            curves = np.vstack([_binned_loss(log, edges) for log in logs])
            with _quiet_nanmean():
                curve = np.nanmean(curves, axis=0)
            centers = 0.5 * (edges[1:] + edges[:-1])
            ax.plot(centers, curve, color=color_of[g.ranks], linewidth=1.5,
                    label=f"{g.ranks} rank{'s' if g.ranks > 1 else ''}")
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no per-step data", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("training samples seen")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_ylim(bottom=0)
        if len(series) > 1:
            ax.set_title(series_label(key))
    axes[0].set_ylabel("training loss (cross-entropy, nats)")
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = sorted(handles, key=lambda label: int(label.split()[0]))
    axes[0].legend([handles[k] for k in order], order, loc="upper right",
                   ncol=2 if len(order) > 6 else 1)
    title = "Training loss (binned by samples seen, mean over seeds)"
    if len(series) > 1:
        fig.suptitle(title)
    else:
        axes[0].set_title(title)
    fig.tight_layout()
    _save(fig, out, "loss", written)


class _quiet_nanmean:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _time_split(group):
    """Mean per-step seconds of a rank: (compute, exchange, wait), averaged over the group's logs."""
    parts = []
    for log in group.logs:
        if len(log.steps["step"]) == 0:
            continue
        parts.append([float(np.nanmean(log.steps[k])) for k in ("compute_s", "exchange_s", "wait_s")])
    return np.mean(parts, axis=0) if parts else np.full(3, np.nan)


def plot_time_split(plt, groups, out, written):
    series = series_of(groups)
    n = len(series)
    fig, axes = _panels(plt, n)
    colors = {"compute": "tab:blue", "exchange": "tab:orange", "wait": "tab:gray"}
    for ax, (key, members) in zip(axes, series.items()):
        ranks = [g.ranks for g in members]
        split = np.array([_time_split(g) for g in members]) * 1e3  # ms
        x = np.arange(len(ranks))
        bottom = np.zeros(len(ranks))
        for i, name in enumerate(("compute", "exchange", "wait")):
            values = np.nan_to_num(split[:, i])
            ax.bar(x, values, bottom=bottom, width=0.7, color=colors[name], label=name,
                   hatch="//" if name == "wait" else None, edgecolor="white", linewidth=0.5)
            bottom += values
        ax.set_xticks(x, [str(r) for r in ranks])
        ax.set_xlabel("MPI ranks")
        ax.set_title(series_label(key) if n > 1 else "Per-step time of a rank (mean over steps and ranks)")
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel("mean time per step per rank (ms)")
    axes[0].legend(loc="upper left")
    if n > 1:
        fig.suptitle("Per-step time of a rank (mean over steps and ranks)")
    fig.tight_layout()
    _save(fig, out, "time_split", written)


def plot_lost_updates(plt, groups, out, written) -> bool:
    audited = [g for g in groups if math.isfinite(g.lost_mean)]
    if not audited:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE)
    series = series_of(audited)
    for color, (key, members) in zip(_colors(len(series)), series.items()):
        x = [g.ranks for g in members]
        y = [100 * g.lost_mean for g in members]
        sd = [100 * g.lost_sd if math.isfinite(g.lost_sd) else 0.0 for g in members]
        ax.errorbar(x, y, yerr=sd, marker="o", markersize=4.5, color=color, linewidth=1.8, capsize=3,
                    label=series_label(key))
    _rank_ticks(ax, [g.ranks for g in audited] + [1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("MPI ranks")
    ax.set_ylabel("lost updates (% of rank contributions per step)")
    ax.set_title("Updates lost to the lock-free race (mean ± sd over seeds)")
    ax.legend(loc="upper left")
    _save(fig, out, "lost_updates", written)
    return True


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs = load_complete_logs(args.logs, SCRIPT)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        raise UserError(args.out, f"cannot create the folder: {err.strerror}") from None
    if not os.access(args.out, os.W_OK):
        raise UserError(args.out, "the folder is not writable")
    groups, _ = build_groups(logs)
    plt = _pyplot()
    written = []
    plot_speedup(plt, groups, logs, args.out, written)
    plot_accuracy(plt, groups, args.out, written)
    plot_loss(plt, groups, args.out, written)
    plot_time_split(plt, groups, args.out, written)
    if not plot_lost_updates(plt, groups, args.out, written):
        note(SCRIPT, "no --race-audit data in the logs: lost_updates not drawn")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
