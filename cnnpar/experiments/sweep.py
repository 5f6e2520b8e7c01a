#!/usr/bin/env python3
"""Run a grid of cnnpar training runs, one HDF5 log per run, resumably.

    cnnpar sweep                          # the `paper` preset into runs/paper/
    cnnpar sweep --preset smoke --out /tmp/smoke
    cnnpar sweep --preset explain --group reduce,budget
    cnnpar sweep --ranks 1-4 --modes sync --seeds 1,2 --set lr=0.01,0.05 --set reduce=sum,mean \
        --out runs/lr -- --dataset mnist-5k --epochs 1
    cnnpar sweep --preset paper --dry-run  # print the commands and the time estimate
    cnnpar sweep --list-presets

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
A failed run is reported with the tail of its output, the sweep goes on, and it exits 1 at the end; when the
first 3 runs all fail the same way, it stops there. SIGUSR1/SIGTERM (a scheduler's time limit or
preemption), or a job step the scheduler ended, stop it as an interruption: exit 75, resumable.

The launcher is the `mpiexec` next to this Python (the `mpich` wheel's) when there is one, else `mpiexec` /
`mpirun` from PATH, or `--launcher "srun --mpi=pmi2"` (or any launcher; `{n}` in it is replaced by the rank
count, otherwise `-n N` is appended). Its flavour comes from `--version`: Open MPI gets `--oversubscribe`
when a run has more ranks than this machine has cores (MPICH needs nothing).

Presets are plain data in cnnpar/experiments/presets.py; `--list-presets` prints them with their groups, run counts and
estimated durations. The grid lives in cnnpar/experiments/grid.py, the launcher in
cnnpar/experiments/launchers.py, the runs, resume and estimates in cnnpar/experiments/runner.py; this module is
the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cnnpar.errors import UserError, exit_on_user_error
from cnnpar.experiments.grid import OWN_FLAGS, Group, expand, load_presets, parse_int_list, parse_modes, parse_set
from cnnpar.experiments.launchers import make_launcher
from cnnpar.experiments.resumable import array_task
from cnnpar.experiments.runner import expected_config, hms, prior_seconds, sweep


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError("command line", message)

    parser = Parser(allow_abbrev=False, prog="cnnpar sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Run a grid of cnnpar training runs (one HDF5 log each) through mpiexec, "
                                "skipping runs whose complete log exists, so an interrupted sweep resumes.",
                    epilog="Arguments after `--` go to every training run unchanged and override the preset's value of the same "
                           "flag (they are not in the file names).\n"
                           "Example: cnnpar sweep --ranks 1-4 --set reduce=sum,mean --out runs/r "
                           "-- --epochs 1\n\n" + preset_help())
    parser.add_argument("--preset", help="a named grid: " + ", ".join(load_presets()) + " (default: paper, unless "
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
    parser.add_argument("--launcher", help="MPI launcher command, e.g. \"srun --mpi=pmi2\" (MPICH; pmix for Open MPI) or \"mpirun "
                        "--bind-to none\"; {n} is replaced by the rank count, else -n N is appended "
                        "(default: the mpiexec next to this Python, else on PATH)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs cnnpar.train "
                        "(default: this one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1: runs compete "
                        "for cores and their timings are results)")
    parser.add_argument("--timeout", type=float, default=0, help="kill a run after this many seconds "
                        "(default 0: never)")
    parser.add_argument("--slices", type=int, default=0, help="run one slice of the grid: every N-th run of the "
                        "full list (--task, or SLURM_ARRAY_TASK_ID in a job array: launch/slurm/map.sbatch sweep "
                        "...); not for timed presets (paper), whose timings need the machine to themselves")
    parser.add_argument("--task", type=int, help="which slice, 0..N-1 (default: SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return parser


def preset_help() -> str:
    lines = ["Presets:"]
    for p in load_presets().values():
        points = expand(p.groups)
        lines.append(f"  {p.name} ({len(points)} runs, about {hms(prior_seconds(points))} on a shared 2-core machine): "
                     f"{p.doc}")
        for g in p.groups:
            if g.doc:
                n = len(expand([g]))
                lines.append(f"      {g.name} ({n} runs): {g.doc}")
    return "\n".join(lines)


def build_groups(args, extra) -> tuple:
    """(groups, out folder, preset name or None) from the command line."""
    custom = bool(args.ranks or args.modes or args.seeds or args.set)
    name = args.preset or (None if custom else "paper")
    if name:
        all_presets = load_presets()
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
    task = array_slice(args, preset)
    points = expand(groups, extra)
    if not points:
        raise UserError("grid", "no runs: the ranks, modes or seeds list is empty")
    for config in {tuple(sorted(p.flags().items())) + p.extra: p for p in points}.values():
        expected_config(config)  # every distinct flag set is valid before anything runs
    launcher = make_launcher(args.launcher)
    out = out.resolve() if not args.dry_run else out
    return sweep(points, out, launcher, args.python, args.jobs, args.timeout or None, args.dry_run, preset,
                 task=task, slices=args.slices or 1)


def array_slice(args, preset) -> tuple:
    """The task of a sliced sweep, None for a whole one."""
    if not args.slices:
        if args.task is not None:
            raise UserError("--task", "needs --slices")
        return None
    if args.slices < 1:
        raise UserError("--slices", f"must be at least 1, got {args.slices}")
    if preset and load_presets()[preset].timed:
        raise UserError("--slices", f"the {preset} preset's timings are results: its runs stay sequential in "
                                    "one allocation (launch/slurm/sweep.sbatch)")
    task = args.task if args.task is not None else array_task()
    if task is None or not 0 <= task < args.slices:
        raise UserError("--task", f"a slice of 0..{args.slices - 1} is needed with --slices {args.slices} (got "
                                  f"{task}; inside a job array it is SLURM_ARRAY_TASK_ID)")
    return task


if __name__ == "__main__":
    raise SystemExit(main())
