"""`cnnpar runlog info PATH...`: what a run log holds and in what state;
`cnnpar runlog schema`: the schema table that docs/runlog.md embeds;
`cnnpar runlog export PATH --csv DIR`: every table of a log as DIR/<table>.csv (no pandas needed).
(`python -m cnnpar.runlog ...` is the same.)"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

from ..errors import OneLineParser, UserError, WriteError, exit_on_user_error
from ..runpaths import checkpoint_path


def _info(path: str) -> str:
    from .reader import open_log

    log = open_log(path)
    lines = [f"{path}: {log.status}" + (f" ({log.status_message})" if log.status_message else "")]
    writer = {True: "a live writer holds it", False: "no writer holds it", None: "unknown (no lock support)"}
    lines.append(f"  format {log.format_version}, created {log.created} by cnnpar {log.cnnpar_version}, "
                 f"{os.path.getsize(path)} bytes; writer: {writer[log.writer_alive]}")
    lines.append(f"  {log.config.get('mode', '?')} x {log.ranks} ranks (job: {log.world_ranks}), "
                 f"{log.n_classes} classes, resumed {log.resume_count} times")
    steps = log.steps["step"]
    last = f", last step {int(steps[-1])}" if len(steps) else ""
    lines.append(f"  flushed rows: {len(steps)} steps{last}, {len(log.epochs['epoch'])} epochs, "
                 f"{len(log.consistency['step'])} checks"
                 + (f", {len(log.audit['step'])} audits" if log.audit is not None else "")
                 + (f", {len(log.folds['fold'])} folds" if log.folds else ""))
    if len(log.epochs["epoch"]):
        lines.append(f"  last epoch {int(log.epochs['epoch'][-1])}: test accuracy "
                     f"{100 * float(log.epochs['test_acc'][-1]):.1f}%")
    if log.final is not None:
        acc = log.final["attrs"]["test_acc"]
        lines.append(f"  final: {log.final['params'].size} params, test accuracy "
                     f"{100 * acc if not math.isnan(acc) else float('nan'):.1f}%")
    else:
        lines.append("  final: not written")
    lines.append(_next_step(path, log))
    return "\n".join(lines)


def _next_step(path: str, log) -> str:
    """What to do with the log and the checkpoint beside it, as the trainer's --resume auto would see them."""
    checkpoint = checkpoint_path(path)
    has_checkpoint = os.path.exists(checkpoint)
    if log.complete:
        if has_checkpoint:  # --resume auto answers `nothing to resume` and never reads it again
            return (f"  complete: nothing to resume; the checkpoint {checkpoint} is stale (the run went on to "
                    f"finish after it) and can be removed")
        return "  complete: nothing to resume"
    if log.writer_alive:
        return "  being written by a live run: wait for it (--resume auto refuses a log in use)"
    if log.status == "diverged":
        return "  diverged: a resumed run would follow the same trajectory; change --lr or --reduce"
    if has_checkpoint:
        return f"  checkpoint {checkpoint}: continue with the same flags and --resume auto"
    return "  no checkpoint: --resume auto keeps this log aside (<name>.no-checkpoint-N.h5) and starts over"



def export_csv(path: str, folder: str) -> list:
    """Write each table the log has (and `final` once written) to `folder`/<table>.csv, a header row of
    `RunLog.flat_columns` names then one row per table row; returns the files written. Refuses to replace
    a file, so an earlier export is never lost."""
    from .reader import open_log
    from .schema import TABLES

    log = open_log(path)
    tables = [t for t in TABLES if getattr(log, t) is not None] + (["final"] if log.final is not None else [])
    targets = {table: os.path.join(folder, f"{table}.csv") for table in tables}
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError("--csv", f"{folder} is a file, not a folder")
    taken = [target for target in targets.values() if os.path.exists(target)]
    if taken:
        raise UserError("--csv", f"{taken[0]} already exists; export into an empty or new folder")
    try:
        os.makedirs(folder, exist_ok=True)
        for table, target in targets.items():
            columns = log.flat_columns(table)
            with open(target, "x", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(columns)
                # str() of a numpy scalar is its shortest round-trip text (float32 stays 0.1, not 0.10000000149)
                writer.writerows(zip(*([str(v) for v in values] for values in columns.values())))
    except OSError as err:
        raise WriteError("--csv", f"cannot write {err.filename or folder}: {err.strerror or err}") from None
    return list(targets.values())


def build_parser() -> argparse.ArgumentParser:
    from ..cli import invoked_as

    parser = OneLineParser(prog=invoked_as("cnnpar.runlog"), description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="status, row counts and final result of run logs", allow_abbrev=False)
    info.add_argument("paths", nargs="+", metavar="PATH", help="run log files (.h5)")
    commands.add_parser("schema", help="print the schema table (markdown) that docs/runlog.md embeds",
                        allow_abbrev=False)
    export = commands.add_parser("export", help="write a log's tables as CSV files", allow_abbrev=False)
    export.add_argument("path", metavar="PATH", help="a run log file (.h5)")
    export.add_argument("--csv", required=True, metavar="DIR",
                        help="folder for one <table>.csv per table (steps, epochs, ...; final once written); "
                             "created if missing; existing files are never replaced")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    from .schema import markdown_table

    args = build_parser().parse_args(argv)
    if args.command == "schema":
        print(markdown_table())
        return 0
    if args.command == "export":
        for target in export_csv(args.path, args.csv):
            print(target)
        return 0
    for path in args.paths:
        print(_info(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
