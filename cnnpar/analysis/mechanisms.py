"""Issue 23's sections of the map report: metrics that tell mechanisms apart (null models, bootstrap
intervals, the shape of a curve, the share of seeds that train), the collapse law, the threshold as a
prediction, and the climb search. Plain functions on the map report's curves (setting -> {N: {seed: acc}});
the report (cnnpar.analysis.map_report) writes what they return."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from cnnpar.analysis.common import PAPER_ACC_PCT

TRAINED_PCT = 50.0        # a run "trains" when its final accuracy reaches this
BOOTSTRAP_RESAMPLES = 2000
PAPER_SHAPE = {"level_n1": 26.0, "jump_1_3": PAPER_ACC_PCT[3] - PAPER_ACC_PCT[1],
               "climb_4_12": round(PAPER_ACC_PCT[12] - PAPER_ACC_PCT[4], 1)}
CLIMB_TARGET_PP, CLIMB_TOLERANCE_PP, LEVEL_RANGE_PCT = 14.0, 4.0, (15.0, 40.0)


def _paper(ranks) -> np.ndarray:
    return np.array([PAPER_ACC_PCT[n] for n in ranks])


def _rms(curve, ranks) -> float:
    return float(np.sqrt(np.mean((np.asarray(curve) - _paper(ranks)) ** 2)))


# ----------------------------------------------------------------------------------------------------
# metrics


def null_models(ranks) -> list:
    """Curves that know nothing of any mechanism, fitted to Table I itself: the best constant, the best
    one-jump step (free levels), and a step from chance (10% at n=1, the best constant after)."""
    paper = _paper(ranks)
    constant = np.full(len(ranks), paper.mean())
    steps = []
    for k in range(1, len(ranks)):
        steps.append(np.r_[np.full(k, paper[:k].mean()), np.full(len(ranks) - k, paper[k:].mean())])
    step = min(steps, key=lambda c: _rms(c, ranks))
    chance = np.r_[10.0, np.full(len(ranks) - 1, paper[1:].mean())]
    return [{"name": name, "curve": [round(float(v), 2) for v in curve], "rms_pp": round(_rms(curve, ranks), 2)}
            for name, curve in (("best constant", constant), ("best step", step), ("chance, then constant", chance))]


def seed_matrix(by_rank: dict, ranks, seeds) -> np.ndarray:
    """(ranks x seeds) accuracies."""
    return np.array([[by_rank[n][s] for s in seeds] for n in ranks], np.float64)


def bootstrap_rms(values: np.ndarray, ranks, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 23) -> tuple:
    """95% percentile interval of the RMS of the seed-mean curve to Table I, seeds resampled with
    replacement (the same seeds at every rank count: a seed is one whole curve)."""
    rng = np.random.default_rng(seed)
    n_seeds = values.shape[1]
    picks = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    means = values[:, picks].mean(axis=2)  # (ranks, resamples)
    rms = np.sqrt(np.mean((means - _paper(ranks)[:, None]) ** 2, axis=0))
    return float(np.percentile(rms, 2.5)), float(np.percentile(rms, 97.5))


def shape_of(mean, ranks) -> dict:
    """The n=1 level, the jump n=1 -> 3 and the climb n=4 -> 12 (NaN where a rank count is missing)."""
    at = dict(zip(ranks, np.asarray(mean, np.float64)))
    get = lambda n: at.get(n, math.nan)  # noqa: E731
    return {"level_n1": get(1), "jump_1_3": get(3) - get(1), "climb_4_12": get(12) - get(4)}


def trained_fraction(values: np.ndarray) -> np.ndarray:
    """Per rank count, the share of seeds whose final accuracy reaches TRAINED_PCT."""
    return (values >= TRAINED_PCT).mean(axis=1)


# ----------------------------------------------------------------------------------------------------
# the collapse law


def _mean_at(all_curves, setting, n, seeds=None):
    """(mean accuracy, seeds, share of them that train) of one point over the given seeds it ran."""
    by_rank = all_curves.get(setting, {})
    if n not in by_rank:
        return math.nan, (), math.nan
    common = sorted(by_rank[n] if seeds is None else set(by_rank[n]) & set(seeds))
    values = np.array([by_rank[n][s] for s in common])
    if not common:
        return math.nan, (), math.nan
    return float(values.mean()), tuple(common), float(np.mean(values >= TRAINED_PCT))


def collapse_rows(all_curves, setting_cls) -> list:
    """(dataset, reduce, lr, {N: (A(N, lr), A(1, lr'), residual, seeds)}) with lr' = lr/N for mean and lr for
    sum, over the seeds both points ran, for every one-epoch sync setting with N > 1 runs."""
    rows = []
    for s, by_rank in sorted(all_curves.items(), key=lambda t: (t[0].dataset, t[0].reduce, float(t[0].lr))):
        if s.mode != "sync" or s.budget != "epochs" or not any(n > 1 for n in by_rank):
            continue
        cells = {}
        for n in sorted(k for k in by_rank if k > 1):
            lr_one = f"{float(s.lr) / n:.3g}" if s.reduce == "mean" else s.lr
            one = setting_cls(s.dataset, "epochs", "sync", "", s.reduce, lr_one, 0)
            a_one, seeds, trained_one = _mean_at(all_curves, one, 1, by_rank[n])
            if seeds:
                a_n, _, trained_n = _mean_at(all_curves, s, n, seeds)
                cells[n] = (a_n, a_one, a_n - a_one, seeds, trained_n, trained_one)
        if cells:
            rows.append((s.dataset, s.reduce, s.lr, cells))
    return rows


def collapse_lines(rows) -> list:
    if not rows:
        return []
    ranks = sorted({n for *_, cells in rows for n in cells})
    lines = ["## The collapse law", "",
             "With averaged gradients, N samples per step at lr move the parameters as far, to first order, as "
             "N one-sample steps at lr/N, with the same update noise per sample (lr^2 sigma^2 / N per N "
             "samples either way); with summed gradients, N one-sample steps at lr. So the law predicts "
             "A(N, lr) = A(1, lr/N) for `--reduce mean` and A(N, lr) = A(1, lr) for `--reduce sum`. Each cell: "
             "the residual A(N, lr) - A(1, lr'), pp, over the seeds both ran (one epoch, 1 rank x N samples).", "",
             "| dataset | reduce | lr | seeds | " + " | ".join(f"N={n}" for n in ranks)
             + " | mean abs residual, N>=3 |", "|---|---|---|---|" + "---|" * (len(ranks) + 1)]
    for dataset, reduce, lr, cells in rows:
        seeds = min(len(c[3]) for c in cells.values())
        res = [f"{cells[n][2]:+.1f}" if n in cells else "" for n in ranks]
        tail = [abs(c[2]) for n, c in cells.items() if n >= 3]
        lines.append(f"| {dataset} | {reduce} | {lr} | {seeds} | " + " | ".join(res) + " | "
                     + (f"{np.mean(tail):.1f}" if tail else "") + " |")
    n2 = [(d, r, lr, c) for d, r, lr, cells in rows for n, c in cells.items() if n == 2 and r == "mean"]
    rest = [abs(c[2]) for d, r, lr, cells in rows for n, c in cells.items() if n >= 3 and r == "mean"]
    if n2 and rest:
        shares = "; ".join(f"{d} lr {lr}: {c[4]:.0%} of the seeds train at N=2, {c[5]:.0%} at one rank and lr/2 "
                           f"({c[2]:+.1f} pp)" for d, _, lr, c in n2)
        lines += ["", f"For averaged gradients the mean absolute residual is {np.mean(rest):.1f} pp over N >= 3 and "
                  f"{np.mean([abs(c[2]) for *_, c in n2]):.1f} pp at N = 2. At N = 2, lr/2 lies at one rank's edge of "
                  "stability, where a run either collapses to a constant output in its first steps or trains: "
                  f"{shares}. Where the seeds split, each side of the law is a draw of that lottery, and the "
                  "residual measures the draw, not the law; where both sides train, it is the law's first-order "
                  "error (N one-sample steps see the gradient move between samples, one N-sample step does not)."]
    return lines + [""]


# ----------------------------------------------------------------------------------------------------
# the threshold


def observed_critical(all_curves, setting, min_seeds: int = 8, max_n: int = 12):
    """(smallest N at which at least half the seeds train, seeds, largest N run) for a setting run at every N
    1..K (K >= 2) with at least min_seeds common seeds; N is None when no N up to K does; None when the setting
    lacks the runs."""
    by_rank = all_curves.get(setting, {})
    top = 0
    while top < max_n and top + 1 in by_rank and len(by_rank[top + 1]) >= min_seeds:
        top += 1
    if top < 2:
        return None
    ranks = list(range(1, top + 1))
    seeds = sorted(set.intersection(*(set(by_rank[n]) for n in ranks)))
    if len(seeds) < min_seeds:
        return None
    fraction = trained_fraction(seed_matrix(by_rank, ranks, seeds))
    return next((n for n, f in zip(ranks, fraction) if f >= 0.5), None), seeds, top


def one_rank_points(all_curves, dataset) -> list:
    """(lr, trains?, seeds) for every one-epoch averaged-gradient lr run at N = 1 on dataset."""
    out = []
    for s, by_rank in all_curves.items():
        if (s.dataset, s.reduce, s.budget, s.mode) == (dataset, "mean", "epochs", "sync") and 1 in by_rank:
            accs = list(by_rank[1].values())
            out.append((float(s.lr), float(np.mean(np.array(accs) >= TRAINED_PCT)) >= 0.5, len(accs)))
    return sorted(out)


def calibrate(constraints) -> tuple:
    """The constant c satisfying the most constraints (each an interval [lo, hi) of c), the geometric
    middle of the widest stretch that does; returns (c, satisfied, total)."""
    grid = np.logspace(-2, 5, 7001)
    counts = np.zeros(len(grid), int)
    for lo, hi in constraints:
        counts += (grid >= lo) & (grid < hi)
    best = counts.max()
    ok = counts == best
    runs, start = [], None
    for i, flag in enumerate(np.r_[ok, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    lo, hi = max(runs, key=lambda r: r[1] - r[0])
    return float(math.sqrt(grid[lo] * grid[hi])), int(best), len(constraints)


def agrees(row) -> bool:
    """Predicted within +-1 of observed; 'none' observed up to K agrees with a prediction above K - 1."""
    pred, obs = row["predicted"], row["observed"]
    if obs is None:
        return pred is None or pred >= row["ranks_run"]
    return pred is not None and abs(pred - obs) <= 1


def threshold_section(all_curves, setting_cls, probe_folder: Path, calibrate_on: str = "fashion-mnist") -> tuple:
    """(report lines, JSON rows): c fitted on calibrate_on's observed thresholds, predictions tested on the
    other datasets; the probe inputs come from the probe logs in probe_folder (cnnpar predict --probe-log)."""
    from cnnpar.analysis import predict

    probes = {}
    for path in sorted(probe_folder.glob("*.h5")) if probe_folder.is_dir() else []:
        inputs = predict.probe_inputs(str(path))
        probes.setdefault(inputs["dataset"], inputs)
    if not probes:
        return [], []
    observed = []
    for s in all_curves:
        if (s.reduce, s.budget, s.mode) == ("mean", "epochs", "sync") and s.dataset in probes:
            got = observed_critical(all_curves, s)
            if got is not None:
                observed.append((s.dataset, float(s.lr), got[0], len(got[1]), got[2]))
    observed.sort()
    variants = {}
    for name, eps_key, noise_key in VARIANTS:
        fitted = _fit_variant(all_curves, probes, observed, calibrate_on, eps_key, noise_key)
        if fitted is not None:
            variants[name] = fitted
    if not variants:
        return [], []
    lines = ["## The threshold as a prediction", "",
             "`cnnpar predict --dataset D --reduce mean --lr X` (cnnpar/analysis/predict.py) probes "
             f"{predict.PROBE_STEPS} steps at lr {predict.PROBE_LR} with {predict.PROBE_SAMPLES} samples per step "
             "and --noise-scale, and reads from that log the early noise scale B_noise = tr(Sigma)/|G|^2 (its "
             "windows' estimates) and, at its final parameters, eps_max = |G|^2 / G^T H G (H G by a central "
             f"difference of two {predict.CURVATURE_SAMPLES}-sample gradients). A run at batch B trains when lr <= "
             "c eps_max B / (B + B_noise) (McCandlish et al. 2018's loss change per step with the factor 2 "
             "replaced by c), so the critical N is the smallest B >= 1 with B >= lr B_noise / (c eps_max - lr). "
             "*Observed*: the smallest N at which at least half of the seeds reach "
             f"{TRAINED_PCT:.0f}% after one epoch. The *start* variant takes both quantities at the seed's initial "
             "parameters instead (B_noise from 1000 per-sample gradients); it was added after the first variant's "
             "predictions had been compared with mnist-5k's thresholds, so only the first is a blind test.", "",
             "| dataset | B_noise (probe) | eps_max (probe end) | B_noise (start) | eps_max (start) |",
             "|---|---|---|---|---|"]
    for d, p in sorted(probes.items()):
        lines.append(f"| {d} | {p['b_noise']:.1f} | {p['eps_max']:.4f} | {p['start_b_noise']:.1f} | "
                     f"{p['start_eps_max']:.4f} |")
    names = list(variants)
    lines += [""] + [f"*{name}*: c = {v['c']:.3g}, fitted on {calibrate_on} ({v['satisfied']} of {v['total']} "
                     "constraints met: its observed critical N and its one-rank runs' pass/fail at each lr they "
                     "ran), then used unchanged on the other dataset." for name, v in variants.items()]
    lines += ["", "| dataset | lr | role | " + " | ".join(f"predicted N, {n}" for n in names)
              + " | observed N | seeds per (lr, N) | N run |", "|---|---|---|" + "---|" * (len(names) + 3)]
    base = variants[names[0]]["rows"]
    for i, r in enumerate(base):
        preds = [variants[n]["rows"][i]["predicted"] for n in names]
        lines.append(f"| {r['dataset']} | {r['lr']:g} | {r['role']} | "
                     + " | ".join("none <= 12" if v is None else str(v) for v in preds) + " | "
                     f"{'none <= %d' % r['ranks_run'] if r['observed'] is None else r['observed']} | {r['seeds']} | "
                     f"1..{r['ranks_run']} |")
    for name, v in variants.items():
        held = [r for r in v["rows"] if r["role"] == "test"]
        if held:
            lines += ["", f"Held out, *{name}*: {sum(map(agrees, held))} of {len(held)} learning rates predicted "
                      "within +-1 (the issue's target: 4 of 5)."]
    return lines + [""], {"calibrated_on": calibrate_on, "probes": probes, "variants": variants,
                          "rows": variants[names[0]]["rows"]}


VARIANTS = (("probe", "eps_max", "b_noise"), ("start", "start_eps_max", "start_b_noise"))


def _fit_variant(all_curves, probes, observed, calibrate_on, eps_key, noise_key) -> dict | None:
    """c fitted on calibrate_on with one choice of inputs, and every observed row's prediction with it."""
    from cnnpar.analysis import predict

    if calibrate_on not in probes:
        return None
    p = probes[calibrate_on]
    constraints = [predict.c_interval(lr, n, p[eps_key], p[noise_key], top)
                   for d, lr, n, _, top in observed if d == calibrate_on]
    for lr, trains, _ in one_rank_points(all_curves, calibrate_on):
        low, _ = predict.c_interval(lr, 1, p[eps_key], p[noise_key])
        constraints.append((low, math.inf) if trains else (0.0, low))
    if not constraints:
        return None
    c, satisfied, total = calibrate(constraints)
    rows = []
    for d, lr, n_obs, seeds, top in observed:
        q = probes[d]
        rows.append({"dataset": d, "lr": lr, "predicted": predict.critical_n(lr, q[eps_key], q[noise_key], c),
                     "observed": n_obs, "seeds": seeds, "ranks_run": top,
                     "role": "calibration" if d == calibrate_on else "test"})
    return {"c": c, "satisfied": satisfied, "total": total, "rows": rows}


# ----------------------------------------------------------------------------------------------------
# the climb search


def climb_axis(config: dict) -> str:
    """Which of the climb's axes a run's config differs on ('base' when none)."""
    if float(config.get("input_scale", 1.0)) != 1.0:
        return f"input scale {float(config['input_scale']):g}"
    if config.get("arch", "small") != "small":
        return f"--arch {config['arch']}"
    if int(config.get("epochs", 1)) != 1 and not int(config.get("steps", 0)):
        return f"{int(config['epochs'])} epochs"
    if float(config.get("momentum", 0.0)):
        return f"momentum {float(config['momentum']):g}"
    return "base"


def load_climb(folder: Path) -> dict:
    """(dataset, axis) -> {lr: {N: {seed: acc %}}} from the climb's logs (diverged = chance)."""
    from cnnpar.analysis.common import final_accuracy
    from cnnpar.runlog import open_log

    out = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            log = open_log(path)
        except Exception:  # noqa: BLE001 - an unreadable leftover is not a result
            continue
        if log.status not in ("complete", "diverged"):
            continue
        c = log.config
        acc = 100.0 * final_accuracy(log) if log.status == "complete" else 100.0 / log.n_classes
        out[(c["dataset"], climb_axis(c))][float(c["lr"])][int(c["samples_per_rank"])][int(c["seed"])] = acc
    return out


def interval95(values) -> tuple:
    """mean and the half-width of its 95% t-interval (NaN half-width for one value)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36}.get(len(values), 2.26)
    return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(len(values)))


def predicted_climb(curve: dict) -> dict | None:
    """From A(1, lr) (lr -> mean %), the collapse law's best candidate for the paper's shape: the lr L whose
    predicted n=1 level A(1, L) lies in LEVEL_RANGE_PCT and whose climb A(1, L/12) - A(1, L/4) is largest
    (A(1, .) interpolated linearly in log lr between measured points)."""
    lrs = np.array(sorted(curve))
    if len(lrs) < 3:
        return None
    acc = np.array([curve[lr] for lr in lrs])
    at = lambda x: float(np.interp(np.log(x), np.log(lrs), acc)) if lrs[0] <= x <= lrs[-1] else math.nan  # noqa
    best = None
    for big in np.logspace(np.log10(lrs[0] * 12), np.log10(lrs[-1]), 200):
        level, climb = at(big), at(big / 12) - at(big / 4)
        if not (math.isfinite(level) and math.isfinite(climb)):
            continue
        in_range = LEVEL_RANGE_PCT[0] <= level <= LEVEL_RANGE_PCT[1]
        key = (in_range, climb)
        if best is None or key > best[0]:
            best = (key, {"lr": float(big), "level_n1": level, "climb_4_12": climb, "level_in_range": in_range})
    return best[1] if best else None


def climb_lines(climb: dict, base_curves: dict) -> tuple:
    """The A(1, lr) table per axis (mean and 95% interval), the law's predicted best climb per axis, and the
    measured N = 1..12 curve where the search mapped one."""
    axes = dict(climb)
    for dataset, curve in base_curves.items():
        axes.setdefault((dataset, "base"), {lr: {1: seeds} for lr, seeds in curve.items()})
    if not axes:
        return [], []
    lines = ["## Search for the climb", "",
             "The collapse law turns the paper's climb (+14.0 pp from n=4 to n=12 at a level of 26% at n=1) into "
             "a property of one rank: A(1, lr) must keep rising from lr/4 to lr/12 while A(1, lr) itself is "
             "15-40%. A(1, lr) over axes the map never had (one epoch unless named; mean over seeds +- the 95% "
             "t-interval's half-width, seeds in brackets; *base* is the map's own one-rank runs). The race with "
             "averaged gradients has no axis of its own here: at one rank nothing races, so its A(1, lr) is the "
             "base curve, and its N-rank curves need real ranks (not run for this report).", ""]
    summary = []
    for (dataset, axis), by_lr in sorted(axes.items()):
        ones = {lr: list(v[1].values()) for lr, v in by_lr.items() if 1 in v}
        if not ones:
            continue
        cells = [f"{lr:g}: {m:.0f}" + (f" +-{h:.0f}" if math.isfinite(h) else "") + f" ({len(v)})"
                 for lr, v in sorted(ones.items()) for m, h in [interval95(v)]]
        lines.append(f"- **{dataset}, {axis}**: " + "; ".join(cells))
        cand = predicted_climb({lr: float(np.mean(v)) for lr, v in ones.items()})
        if cand:
            summary.append({"dataset": dataset, "axis": axis, "kind": "predicted by the law", **cand})
        mapped = {lr: v for lr, v in by_lr.items() if all(n in v for n in range(1, 13))}
        for lr, v in mapped.items():
            seeds = sorted(set.intersection(*(set(v[n]) for n in range(1, 13))))
            values = seed_matrix(v, list(range(1, 13)), seeds)
            mean = values.mean(axis=1)
            sh = shape_of(mean, list(range(1, 13)))
            one_lrs = np.array(sorted(ones))
            one_acc = np.array([np.mean(ones[x]) for x in one_lrs])
            law = [float(np.interp(np.log(lr / n), np.log(one_lrs), one_acc)) if one_lrs[0] <= lr / n else math.nan
                   for n in range(3, 13)]
            summary.append({"dataset": dataset, "axis": axis, "kind": f"measured, N = 1..12, {len(seeds)} seeds",
                            "law_residual_n3plus": float(np.nanmean(mean[2:] - np.array(law))),
                            "jump_1_3": sh["jump_1_3"],
                            "lr": lr, "level_n1": sh["level_n1"], "climb_4_12": sh["climb_4_12"],
                            "rms_pp": _rms(mean, list(range(1, 13))), "curve": [round(float(x), 1) for x in mean],
                            "level_in_range": LEVEL_RANGE_PCT[0] <= sh["level_n1"] <= LEVEL_RANGE_PCT[1]})
    lines += ["", "| dataset | axis | kind | lr | n=1 level | climb n=4 -> 12 (pp) | RMS to Table I (pp) |",
              "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['dataset']} | {r['axis']} | {r['kind']} | {r['lr']:.3g} | {r['level_n1']:.1f} | "
                     f"{r['climb_4_12']:+.1f} | {r['rms_pp']:.1f} |" if "rms_pp" in r else
                     f"| {r['dataset']} | {r['axis']} | {r['kind']} | {r['lr']:.3g} | {r['level_n1']:.1f} | "
                     f"{r['climb_4_12']:+.1f} | |")
    for r in (r for r in summary if "law_residual_n3plus" in r):
        lines += ["", f"Measured at {r['dataset']}, {r['axis']}, lr {r['lr']:.3g}: "
                  + ", ".join(f"n={n} {v:.1f}" for n, v in zip(range(1, 13), r["curve"]))
                  + f" (jump 1->3 {r['jump_1_3']:+.1f} pp); against the collapse law's A(1, lr/N) the N >= 3 "
                  f"points differ by {r['law_residual_n3plus']:+.1f} pp on average."]
    hits = [r for r in summary if r["level_in_range"]
            and abs(r["climb_4_12"] - CLIMB_TARGET_PP) <= CLIMB_TOLERANCE_PP]
    measured_hits = [r for r in hits if r["kind"].startswith("measured")]
    if measured_hits:
        best = min(measured_hits, key=lambda r: r["rms_pp"])
        lines += ["", f"**A regime reproduces the climb**: {best['dataset']}, {best['axis']}, lr {best['lr']:.3g}: "
                  f"n=1 {best['level_n1']:.1f}%, climb {best['climb_4_12']:+.1f} pp, RMS {best['rms_pp']:.1f} pp."]
    elif not summary:
        lines += ["", "No climb-search runs in this folder (`cnnpar study` makes them)."]
    else:
        pool = [r for r in summary if r["kind"].startswith("measured")] or summary
        closest = min(pool, key=lambda r: abs(r["climb_4_12"] - CLIMB_TARGET_PP)
                      + (0 if r["level_in_range"] else 100))
        lines += ["", f"**No measured regime reproduces +14 +- 4 pp with an n=1 level of 15-40%.** The closest: "
                  f"{closest['dataset']}, {closest['axis']}, lr {closest['lr']:.3g} ({closest['kind']}): n=1 "
                  f"{closest['level_n1']:.1f}%, climb {closest['climb_4_12']:+.1f} pp"
                  + (f", RMS {closest['rms_pp']:.1f} pp." if "rms_pp" in closest else ".")]
    return lines + [""], summary


# ----------------------------------------------------------------------------------------------------
# the verdict


def plot_verdict(plt, fit, collapse_rows_, threshold, out: Path, climb_rows=()) -> str | None:
    """Table I, the best fit's seed mean (+- sd), the collapse law's A(1, lr/N), the predicted critical N and
    the climb search's measured candidates."""
    if fit is None:
        return None
    hyp, dataset, ranks, r = fit
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.plot(ranks, _paper(ranks), "k-o", lw=2.5, label="paper, Table I")
    mean, sd = np.asarray(r["mean"]), np.asarray(r["sd"])
    ax.errorbar(ranks, mean, yerr=[np.minimum(sd, mean), np.minimum(sd, 100 - mean)], marker="s", capsize=2,
                label=f"{hyp.name}: {dataset}, mean, lr {r['setting'].lr}, {len(r['seeds'])} seeds "
                      f"(RMS {r['rms_pp']:.1f} pp)")
    law = [(n, c[1]) for d, red, lr, cells in collapse_rows_ for n, c in sorted(cells.items())
           if (d, red, lr) == (dataset, "mean", r["setting"].lr)]
    if law:
        ax.plot([1] + [n for n, _ in law], [mean[0]] + [a for _, a in law], "g^--",
                label=f"collapse law: one rank at lr {r['setting'].lr}/N")
    for c in (c for c in climb_rows if "curve" in c):
        ax.plot(range(1, 13), c["curve"], "x-", color="tab:purple", lw=1,
                label=f"climb search: {c['dataset']}, {c['axis']}, lr {c['lr']:.3g} (RMS {c['rms_pp']:.1f} pp)")
    pred = next((row for row in (threshold or {}).get("rows", []) if row["dataset"] == dataset
                 and f"{row['lr']:.3g}" == r["setting"].lr), None)
    if pred and pred["predicted"]:
        ax.axvline(pred["predicted"], color="tab:red", ls=":", label=f"predicted critical N = {pred['predicted']}")
    accuracy_axes(ax, ranks)
    return save_figure(plt, fig, out, "verdict.png")


def accuracy_axes(ax, ranks) -> None:
    """The look of every accuracy-against-ranks panel of the report."""
    ax.set_xlabel("ranks (paper: threads)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(ranks)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def save_figure(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def verdict_lines(fit, table: dict, threshold: dict, climb_rows: list, figure) -> list:
    """Three sentences from the numbers: the mechanism, what of Table I it reproduces, what it predicts."""
    if fit is None:
        return []
    hyp, dataset, ranks, r = fit
    sh, paper = r["shape"], PAPER_SHAPE
    best_null = min(table["null_models"], key=lambda m: m["rms_pp"])
    lo, hi = r["rms_interval"]
    held = [row for row in (threshold or {}).get("rows", []) if row["role"] == "test"]
    within = [row for row in held if agrees(row)]
    measured = [c for c in climb_rows if c["kind"].startswith("measured")]
    best_climb = max(measured or climb_rows, key=lambda c: c["climb_4_12"]) if climb_rows else None
    first = (f"**The mechanism**: averaged gradients at a learning rate too high for one sample per step "
             f"({hyp.name}, `{' '.join(r['setting'].flags())}`): N samples per step at lr train like one rank "
             f"at lr/N (the collapse law), and one rank collapses to a constant output above a critical lr, so "
             f"the curve is one rank's accuracy against lr read at lr/N.")
    second = (f"**Of Table I it reproduces the jump** (n=1 -> 3: {sh['jump_1_3']:+.1f} pp against the paper's "
              f"{paper['jump_1_3']:+.1f}; RMS {r['rms_pp']:.1f} pp, 95% interval {lo:.1f}-{hi:.1f} over "
              f"{len(r['seeds'])} seeds, against {best_null['rms_pp']:.1f} pp for the {best_null['name']}, a curve "
              f"with no mechanism), **not the climb** (n=4 -> 12: {sh['climb_4_12']:+.1f} pp against "
              f"{paper['climb_4_12']:+.1f}) **and not the level** (n=1: {sh['level_n1']:.1f}% against "
              f"{paper['level_n1']:.1f}%: {1 - r['trained'][0]:.0%} of the seeds collapse to a constant output at "
              f"n=1 and the rest train, where the paper's one thread learnt a little)"
              + (f"; the climb search's best candidate ({best_climb['dataset']}, {best_climb['axis']}, lr "
                 f"{best_climb['lr']:.3g}, {best_climb['kind']}) has an n=1 level of {best_climb['level_n1']:.1f}% "
                 f"but a climb of {best_climb['climb_4_12']:+.1f} pp." if best_climb else "."))
    third = ("**It predicts** the rank count at which training starts from a probe of 400 steps: the smallest N "
             "with lr <= c eps_max N / (N + B_noise)"
             + (f", c fitted on {threshold['calibrated_on']}; on the held-out dataset it is within +-1 of the "
                f"observed critical N at {len(within)} of {len(held)} learning rates." if held else "."))
    lines = ["## Verdict", "", " ".join([first, second, third]), ""]
    return lines + ([f"![verdict]({figure})", ""] if figure else [])
