"""`python -m cnnpar.runlog info PATH...`: what a run log holds and in what state;
`python -m cnnpar.runlog schema`: the schema table that docs/runlog.md embeds."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..errors import exit_on_user_error
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
    checkpoint = checkpoint_path(path)
    if os.path.exists(checkpoint):
        lines.append(f"  checkpoint {checkpoint}: continue with the same flags and --resume auto")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> int:
    from .schema import markdown_table

    parser = argparse.ArgumentParser(prog="python -m cnnpar.runlog", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="status, row counts and final result of run logs")
    info.add_argument("paths", nargs="+", metavar="PATH", help="run log files (.h5)")
    commands.add_parser("schema", help="print the schema table (markdown) that docs/runlog.md embeds")
    args = parser.parse_args(argv)
    if args.command == "schema":
        print(markdown_table())
        return 0
    for path in args.paths:
        print(_info(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
