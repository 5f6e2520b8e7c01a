"""The `cnnpar` command: one entry point for everything the package does, each subcommand taking the flags of
the module it stands for (`cnnpar sweep --preset smoke --out DIR` is `python launch/sweep.py --preset smoke
--out DIR`). `mpirun -n 12 cnnpar train` trains like `mpirun -n 12 python -m cnnpar.train`.

This module imports nothing heavy: `cnnpar train` must reach cnnpar.train before numpy loads (the trainer
pins numba's and BLAS's threads first), and `cnnpar --help` should answer at once.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose main() it runs, one line of help); the order is the help's.
COMMANDS = {
    "train": ("cnnpar.train", "train the CNN (run it under mpirun/mpiexec/srun for several ranks)"),
    "sweep": ("cnnpar.experiments.sweep", "run a grid of training runs, resumably (presets: paper, explain, ...)"),
    "map": ("cnnpar.experiments.map", "run the accuracy map: learning rate x reduce x budget x ranks"),
    "study": ("cnnpar.experiments.study", "the mechanism study's runs: the fit with 8 seeds, the collapse law, "
                                          "the threshold, the climb search"),
    "predict": ("cnnpar.analysis.predict", "predict the smallest rank count that trains at an lr, from a short "
                                           "probe"),
    "report": ("cnnpar.analysis.map_report", "the accuracy map's report, fits and figures from its logs"),
    "explain": ("cnnpar.analysis.explain", "the controlled experiments' report from a sweep's logs"),
    "table": ("cnnpar.analysis.table", "Table I (accuracy, time, speedup per rank count) from run logs"),
    "plots": ("cnnpar.analysis.plots", "speedup, accuracy, loss, time split and lost-update figures"),
    "runlog": ("cnnpar.runlog.__main__", "what a run log holds (info), its schema, exports"),
    "data": ("cnnpar.data", "list, fetch and check datasets"),
    "warmup": ("cnnpar.warmup", "compile the kernels ahead of the first run, or clear their caches"),
    "launcher": ("cnnpar.launcher", "the MPI library mpi4py links, srun's --mpi plugin for it"),
    "bench": ("cnnpar.bench", "benchmarks: cnnpar bench NAME (kernels, scaling, startup, flush, compare, "
                              "noise, race)"),
}
BENCHMARKS = ("kernels", "scaling", "startup", "flush", "compare", "noise", "race")


def invoked_as(module: str) -> str:
    """This program's name as the user typed it, for usage lines: `cnnpar COMMAND` (main() below sets it), a
    console script's own name (`cnnpar-train`), or `python -m MODULE` where Python ran the module's file."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.startswith("cnnpar "):
        return argv0
    name = argv0.replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name == "-c" or name.endswith(".py"):
        return f"python -m {module}"
    return name


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cnnpar COMMAND [FLAGS ...]   (cnnpar COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _refuse(message: str) -> int:
    print(f"cnnpar: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"cnnpar {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _refuse(f"command: no command {name!r}; the commands are: {', '.join(COMMANDS)}")
    module, prog = COMMANDS[name][0], f"cnnpar {name}"
    if name == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: cnnpar bench NAME [FLAGS ...]\n\nbenchmarks: {', '.join(BENCHMARKS)}\n"
                  "(cnnpar bench NAME --help for one's flags)")
            return 0
        if rest[0] not in BENCHMARKS:
            return _refuse(f"bench: no benchmark {rest[0]!r}; the benchmarks are: {', '.join(BENCHMARKS)}")
        module, prog, rest = f"cnnpar.bench.{rest[0]}", f"cnnpar bench {rest[0]}", rest[1:]
    # Every main() reads sys.argv when called without arguments, and argparse names the program after
    # sys.argv[0] unless the parser names it.
    sys.argv = [prog, *rest]
    return importlib.import_module(module).main()


if __name__ == "__main__":
    raise SystemExit(main())
