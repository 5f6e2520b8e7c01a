#!/usr/bin/env python3
"""The paper's Table I from run logs: accuracy, time and speedup against the number of ranks.

    cnnpar table LOGS... [--paper] [--csv OUT.csv] [--md OUT.md]

LOGS are run logs or folders (a folder stands for the *.h5 files directly inside it). Complete logs are
grouped by mode, rank count, and every other config field that differs between the logs (lr, reduce,
...); seeds are pooled. For each group:

  ranks          MPI ranks (the paper's threads)
  seeds          number of runs pooled
  accuracy %     final test accuracy, mean +- sample sd over the runs
  time s         mean training wall time (evaluation excluded)
  speedup        mean time of the 1-rank group with the same settings / mean time of this group
                 (when the mode has no 1-rank run, another mode's, marked *; at one rank all modes
                 compute the same thing)
  efficiency     speedup / ranks
  lost updates % mean over audited steps of lost rank contributions / ranks (race modes with --race-audit)

--paper adds the paper's accuracy, time and speedup at the same thread count. Markdown goes to stdout
(and to --md), CSV with full precision to --csv. A file that is not a readable run log, or a log that
is not complete, is skipped with a note on stderr naming it; the script stops with a one-line error
(exit status 2) only when no complete log is left.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys

from cnnpar.analysis.common import (PAPER_ACC_PCT, PAPER_LABEL, PAPER_SPEEDUP, PAPER_TIME_S, SKIP_RULE, build_groups, fmt,
                     load_complete_logs, out_path)

from cnnpar.errors import UserError, exit_on_user_error

SCRIPT = "table.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError("command line", message)


def parse_args(argv):
    parser = _Parser(allow_abbrev=False, prog="cnnpar table", description=__doc__.split("\n\n")[0],
                     epilog="Columns and grouping: see the top of cnnpar table. " + SKIP_RULE)
    parser.add_argument("logs", nargs="+", metavar="LOGS", help="run logs (.h5) or folders of them")
    parser.add_argument("--paper", action="store_true", help="add the paper's accuracy, time and speedup columns")
    parser.add_argument("--csv", metavar="OUT.csv", help="also write the table as CSV (full precision)")
    parser.add_argument("--md", metavar="OUT.md", help="also write the Markdown table to this file")
    return parser.parse_args(argv)


def table_rows(groups, fields, paper: bool):
    """(csv_rows, markdown_rows, headers, has_lost, footnotes)."""
    has_lost = any(math.isfinite(g.lost_mean) for g in groups)
    csv_rows, md_rows, footnotes = [], [], []
    for g in groups:
        settings = dict(g.settings)
        row = {"mode": g.mode, **{name: settings[name] for name in fields}, "ranks": g.ranks, "seeds": g.runs,
               "acc_mean_pct": 100 * g.acc_mean, "acc_sd_pct": 100 * g.acc_sd,
               "time_mean_s": g.time_mean, "time_sd_s": g.time_sd,
               "speedup": g.speedup, "efficiency": g.efficiency}
        if has_lost:
            row["lost_updates_pct"] = 100 * g.lost_mean
        if paper:
            row["paper_acc_pct"] = PAPER_ACC_PCT.get(g.ranks, math.nan)
            row["paper_time_s"] = PAPER_TIME_S.get(g.ranks, math.nan)
            row["paper_speedup"] = PAPER_SPEEDUP.get(g.ranks, math.nan)
        csv_rows.append(row)

        acc = fmt(100 * g.acc_mean, 1) + (f" ± {fmt(100 * g.acc_sd, 1)}" if math.isfinite(g.acc_sd) else "")
        speedup = fmt(g.speedup, 2) if math.isfinite(g.speedup) else "–"
        if g.baseline and math.isfinite(g.speedup):
            speedup += "*"
            text = f"\\* speedup of {g.mode} {g.baseline} (no 1-rank {g.mode} run with these settings)"
            if text not in footnotes:
                footnotes.append(text)
        cells = [g.mode] + [_cell(settings[name]) for name in fields] + [
            str(g.ranks), str(g.runs), acc, fmt(g.time_mean, 2), speedup,
            fmt(g.efficiency, 2) if math.isfinite(g.efficiency) else "–"]
        if has_lost:
            cells.append(fmt(100 * g.lost_mean, 2) if math.isfinite(g.lost_mean) else "–")
        if paper:
            cells += [_paper_cell(PAPER_ACC_PCT, g.ranks, 1), _paper_cell(PAPER_TIME_S, g.ranks, 2),
                      _paper_cell(PAPER_SPEEDUP, g.ranks, 2)]
        md_rows.append(cells)
    headers = ["mode"] + fields + ["ranks", "seeds", "accuracy %", "time s", "speedup", "efficiency"]
    if has_lost:
        headers.append("lost updates %")
    if paper:
        headers += ["paper acc %", "paper time s", "paper speedup"]
    return csv_rows, md_rows, headers, has_lost, footnotes


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _paper_cell(series: dict, ranks: int, digits: int) -> str:
    return fmt(series[ranks], digits) if ranks in series else "–"


def markdown(headers, rows, footnotes, paper: bool) -> str:
    numeric = {"ranks", "seeds", "accuracy %", "time s", "speedup", "efficiency", "lost updates %",
               "paper acc %", "paper time s", "paper speedup"}
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if h in numeric else "---" for h in headers) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    notes = ["", "accuracy: final test accuracy, mean ± sample sd over seeds; time: training wall time "
                 "(evaluation excluded), mean over seeds; speedup: 1-rank time / time; efficiency: speedup / ranks."]
    if "lost updates %" in headers:
        notes.append("lost updates: mean over audited steps of the rank contributions the race lost / ranks.")
    if paper:
        notes.append(f"paper: {PAPER_LABEL}, Table I, one sample per thread; speedup from its times.")
    notes += footnotes
    return "\n".join(lines + notes) + "\n"


def write_csv(path: str, rows: list) -> None:
    headers = []
    for row in rows:
        headers += [k for k in row if k not in headers]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=headers)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value):
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return value


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for path in (args.csv, args.md):
        if path:
            out_path(path)
    logs = load_complete_logs(args.logs, SCRIPT)
    groups, fields = build_groups(logs)
    csv_rows, md_rows, headers, _, footnotes = table_rows(groups, fields, args.paper)
    text = markdown(headers, md_rows, footnotes, args.paper)
    sys.stdout.write(text)
    try:
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(text)
        if args.csv:
            write_csv(args.csv, csv_rows)
    except OSError as err:
        raise UserError(err.filename or args.csv or args.md, f"cannot write: {err.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
