"""The sweep's named grids (`cnnpar sweep --preset NAME`), as plain data.

A preset has a `doc`, a default output folder `out`, a list of `groups`, and `timed` when its runs' timings
are results (then it never runs as a job array). A group is one block of the grid,
every setting x mode x rank count x seed:
  ranks, modes, seeds   the lists that are multiplied;
  settings              a list of {flag: value}, one grid dimension encoded in the file names ([{}]: none);
  base                  {flag: value} that every run of the group gets, not in the names;
  mode_base             {mode: {flag: value}} for the runs of that mode only;
  name, doc             a group with a doc is listed by --list-presets and chosen by --group.
Flags are cnnpar.train's, spelt as Config fields (`lr_scaling`), values as strings; cnnpar/experiments/grid.py
checks every one against cnnpar.config before a sweep starts.
"""

PAPER_EPOCHS = "10"         # sized to ~20 min quiet / ~40 min shared on 2 cores (launch/README.md)
EXPLAIN_EPOCHS = "1"
EXPLAIN_STEPS = "4000"      # the step budget at every rank count = one epoch of mnist-5k at 1 rank
EXPLAIN_WARMUP = "20"       # warm-up steps of the linear lr scaling: 6% of the 12-rank run's 334 steps
EXPLAIN_SMALL_LR = "0.001"  # the low and high base learning rates of the `lr` group (default 0.01)
EXPLAIN_LARGE_LR = "0.05"

SUM, MEAN = {"reduce": "sum"}, {"reduce": "mean"}
EXPLAIN = {"ranks": [1, 2, 4, 8, 12], "modes": ["sync"], "seeds": [1, 2],
           "base": {"dataset": "mnist-5k", "epochs": EXPLAIN_EPOCHS}}

PRESETS = {
    "smoke": {
        "doc": "CI check that the whole chain works: ranks 1,2; --steps 200; seed 1; sync and race; "
               "mnist-5k. Under a minute on 2 cores.",
        "out": "runs/smoke",
        "groups": [{"name": "smoke", "ranks": [1, 2], "modes": ["sync", "race"], "seeds": [1],
                    "base": {"dataset": "mnist-5k", "steps": "200", "check_every": "100"}}],
    },
    "paper": {
        "doc": "the paper's Table I: ranks 1..12; sync and race; seeds 1,2,3; mnist-5k; --reduce sum (the "
               f"paper's unprotected sum); --epochs {PAPER_EPOCHS} for every rank count, so bigger rank "
               "counts take fewer, bigger steps.",
        "out": "runs/paper",
        "timed": True,   # Table I's times are results: one run at a time, in one allocation
        "groups": [{"name": "paper", "ranks": list(range(1, 13)), "modes": ["sync", "race"], "seeds": [1, 2, 3],
                    "base": {"dataset": "mnist-5k", "reduce": "sum", "epochs": PAPER_EPOCHS,
                             "checkpoint_every": "1e"}}],  # a stopped run continues; not timed
    },
    "explain": {
        "doc": "controlled experiments that test the paper's explanation (analyse with cnnpar explain): "
               f"ranks 1,2,4,8,12; seeds 1,2; mnist-5k; --epochs {EXPLAIN_EPOCHS} unless said otherwise. "
               "Groups (--group):",
        "out": "runs/explain",
        "groups": [
            dict(EXPLAIN, name="reduce", doc="gradient sum vs mean, same epochs", settings=[SUM, MEAN]),
            dict(EXPLAIN, name="budget", doc=f"same epochs vs same SGD steps (--steps {EXPLAIN_STEPS} at every "
                                             "rank count), each with sum and mean",
                 settings=[SUM, MEAN, dict(SUM, steps=EXPLAIN_STEPS), dict(MEAN, steps=EXPLAIN_STEPS)]),
            dict(EXPLAIN, name="lr-scaling", doc="mean with --lr-scaling linear (lr x global batch, "
                                                 f"--warmup-steps {EXPLAIN_WARMUP}) vs sum vs plain mean",
                 settings=[SUM, MEAN, dict(MEAN, lr_scaling="linear", warmup_steps=EXPLAIN_WARMUP)]),
            dict(EXPLAIN, name="exchange", doc="sync vs race (with --race-audit: lost updates measured) vs "
                                               "atomic, sum",
                 settings=[SUM], modes=["sync", "race", "atomic"], mode_base={"race": {"race_audit": "true"}}),
            dict(EXPLAIN, name="lr", doc=f"base learning rate {EXPLAIN_SMALL_LR} vs 0.01 (default) vs "
                                         f"{EXPLAIN_LARGE_LR}, sum",
                 settings=[dict(SUM, lr=EXPLAIN_SMALL_LR), SUM, dict(SUM, lr=EXPLAIN_LARGE_LR)]),
        ],
    },
}

# --- the accuracy map: cnnpar map runs these groups cheaply (a sync point of N ranks as one
# process with N samples per rank, many runs per Python process; race points and the `check` group with
# real ranks); `sweep.py --preset map` would run every point with real ranks instead (days on 2 cores).
MAP_LRS = ["0.001", "0.00178", "0.00316", "0.00562", "0.01", "0.0178", "0.0316", "0.0562", "0.1", "0.178", "0.316",
           "0.562", "1"]                      # a quarter-decade log grid
MAP_FINE_LRS = ["0.133", "0.15", "0.2", "0.237", "0.266"]  # where one rank's averaged-gradient run stops training
MAP_LARGE_SET_LRS = ["0.001", "0.00316", "0.01", "0.0316", "0.0562", "0.1", "0.178", "0.316", "0.562", "1"]
MAP_LARGE_SET_MEAN_LRS = ["0.01", "0.0562", "0.1", "0.178", "0.316", "0.562"]  # the first 60k-set pass
MAP_LARGE_SET_SUM_LRS = ["0.001", "0.00316", "0.01", "0.0316"]
MAP_RANKS = [1, 2, 3, 4, 6, 8, 12]
MAP_RACE_LRS = ["0.01", "0.0316", "0.1"]
MAP_NOISE_WINDOW = "50"                       # --log-window of the --noise-scale reruns: an estimate per 50 steps
ONE_EPOCH = {"epochs": "1"}
MNIST_STEPS = {"steps": "4000"}               # one 1-rank epoch of mnist-5k, at every rank count
LARGE_SET_STEPS = {"steps": "60000"}          # one 1-rank epoch of the 60,000-image set


def _lr_reduce(lrs, reduces=("sum", "mean"), **more):
    return [dict(more, reduce=r, lr=lr) for r in reduces for lr in lrs]


def _map_group(name, doc, ranks, seeds, settings, named, modes=("sync",)):
    """Dataset and budget (`named`) go into every setting, so the file names of a sweep tell groups apart;
    log_window is not a setting (it changes no result)."""
    window = {k: v for k, v in named.items() if k == "log_window"}
    named = {k: v for k, v in named.items() if k != "log_window"}
    return {"name": name, "doc": doc, "ranks": list(ranks), "modes": list(modes), "seeds": list(seeds),
            "settings": [dict(named, **s) for s in settings], "base": window}


_MNIST, _LARGE = {"dataset": "mnist-5k"}, {"dataset": "fashion-mnist"}
_STEP_RANKS = [n for n in MAP_RANKS if n > 1]  # a step budget's 1-rank run is the 1-rank one-epoch run
_NOISE = {"noise_scale": "true"}

PRESETS["map"] = {
    "doc": "the accuracy map (run it with cnnpar map, report with cnnpar report): lr x sum/mean x "
           "same epochs/same steps x ranks, mnist-5k and fashion-mnist, race with real ranks, --noise-scale "
           "reruns. Groups:",
    "out": "runs/map",
    "groups": [
        _map_group("mnist-epochs", "mnist-5k, one epoch, ranks 1..12, 13 lr x sum/mean, seeds 1,2,3",
                   range(1, 13), [1, 2, 3], _lr_reduce(MAP_LRS), dict(_MNIST, **ONE_EPOCH)),
        _map_group("mnist-steps", "mnist-5k, 4000 steps at ranks 2,3,4,6,8,12, 13 lr x sum/mean, seeds 1,2,3",
                   _STEP_RANKS, [1, 2, 3], _lr_reduce(MAP_LRS), dict(_MNIST, **MNIST_STEPS)),
        _map_group("mnist-epochs-fine", "mnist-5k, one epoch, mean, lr 0.133-0.266, ranks 1..12, seeds 1,2,3",
                   range(1, 13), [1, 2, 3], _lr_reduce(MAP_FINE_LRS, ["mean"]), dict(_MNIST, **ONE_EPOCH)),
        _map_group("check", "real N-rank sync runs beside their one-process twins (an --allreduce named: real "
                            "ranks)", [2, 4, 12], [1], _lr_reduce(["0.178"], ["mean"], allreduce="auto"),
                   dict(_MNIST, **ONE_EPOCH)),
        _map_group("check-sum", "", [3, 8], [1], _lr_reduce(["0.01"], ["sum"], allreduce="auto"),
                   dict(_MNIST, **ONE_EPOCH)),
        _map_group("race", "--mode race, shared and rma windows, summed, one epoch, lr 0.01/0.0316/0.1, ranks "
                           "1..12, seeds 1,2 (real ranks)", range(1, 13), [1, 2],
                   [dict(s, race_window=w) for s in _lr_reduce(MAP_RACE_LRS, ["sum"]) for w in ("shared", "rma")],
                   dict(_MNIST, **ONE_EPOCH), modes=("race",)),
        _map_group("fashion-core", "fashion-mnist, one epoch, ranks 1,2,3,4,6,8,12, seed 1: mean at lr "
                                   f"{'/'.join(MAP_LARGE_SET_MEAN_LRS)}, sum at {'/'.join(MAP_LARGE_SET_SUM_LRS)} "
                                   "(what a shared 2-core machine finishes in an hour)", MAP_RANKS, [1],
                   _lr_reduce(MAP_LARGE_SET_MEAN_LRS, ["mean"]) + _lr_reduce(MAP_LARGE_SET_SUM_LRS, ["sum"]),
                   dict(_LARGE, **ONE_EPOCH)),
        _map_group("fashion-fit", "fashion-mnist, one epoch, mean at lr 0.1/0.178/0.316 (where the first pass "
                                  "rises), ranks 1..12, seeds 1,2,3: Table I fits on the 60,000-image set",
                   range(1, 13), [1, 2, 3], _lr_reduce(["0.1", "0.178", "0.316"], ["mean"]),
                   dict(_LARGE, **ONE_EPOCH)),
        _map_group("fashion-steps-fit", "fashion-mnist, 60,000 steps, ranks 2..12, seed 1: sum at lr 0.001/0.01 "
                                        "(H3), mean at 0.1/0.178 (H5)", range(2, 13), [1],
                   _lr_reduce(["0.001", "0.01"], ["sum"]) + _lr_reduce(["0.1", "0.178"], ["mean"]),
                   dict(_LARGE, **LARGE_SET_STEPS)),
        _map_group("noise", "--noise-scale reruns, one epoch, ranks 2,4,12 (fashion-mnist 2,12), seed 1",
                   [2, 4, 12], [1], _lr_reduce(["0.01", "0.0562", "0.178", "0.316"], ["mean"], **_NOISE)
                   + _lr_reduce(["0.01", "0.0562"], ["sum"], **_NOISE),
                   dict(_MNIST, log_window=MAP_NOISE_WINDOW, **ONE_EPOCH)),
        _map_group("noise-large-set", "", [2, 12], [1], _lr_reduce(["0.0562", "0.178", "0.316"], ["mean"], **_NOISE)
                   + _lr_reduce(["0.01"], ["sum"], **_NOISE), dict(_LARGE, log_window=MAP_NOISE_WINDOW, **ONE_EPOCH)),
        _map_group("fashion-race", "--mode race on fashion-mnist, shared window, summed, one epoch, lr 0.01 (the "
                                   "best race setting on mnist-5k), ranks 1..12, seed 1, with --race-audit (what "
                                   "the race lost; real ranks: 1-5 min a run here)", range(1, 13), [1],
                   _lr_reduce(["0.01"], ["sum"], race_window="shared", race_audit="true"), dict(_LARGE, **ONE_EPOCH),
                   modes=("race",)),
        _map_group("fashion-race-rma", "the same through the rma window at ranks 2,4,8 (its runs take 3-5 times "
                                       "as long; 12 ranks ran past 30 min on the shared 2-core machine)", [2, 4, 8],
                   [1],
                   _lr_reduce(["0.01"], ["sum"], race_window="rma", race_audit="true"), dict(_LARGE, **ONE_EPOCH),
                   modes=("race",)),
        _map_group("fashion-epochs", "fashion-mnist, one epoch, ranks 1..12, 10 lr x sum/mean, seeds 1,2,3",
                   range(1, 13), [1, 2, 3], _lr_reduce(MAP_LARGE_SET_LRS, ["mean", "sum"]),
                   dict(_LARGE, **ONE_EPOCH)),
        _map_group("fashion-steps", "fashion-mnist, 60,000 steps at ranks 2,3,4,6,8,12, 10 lr x sum/mean, "
                                    "seeds 1,2,3", _STEP_RANKS, [1, 2, 3], _lr_reduce(MAP_LARGE_SET_LRS),
                   dict(_LARGE, **LARGE_SET_STEPS)),
    ],
}
PRESETS["map-tiny"] = {
    "doc": "CI's accuracy map: mnist-5k, one epoch, mean, lr 0.01/0.178, ranks 1,2,3, seed 1; one rank at lr "
           "0.089/0.0593 (the collapse law); one real 2-rank "
           "twin, one --noise-scale rerun and one audited 2-rank race",
    "out": "runs/map-tiny",
    "groups": [
        _map_group("tiny", "", [1, 2, 3], [1], _lr_reduce(["0.01", "0.178"], ["mean"]), dict(_MNIST, **ONE_EPOCH)),
        # one rank at 0.178/2 and 0.178/3: the other side of the collapse law's A(N, lr) = A(1, lr/N)
        _map_group("tiny-collapse", "", [1], [1], _lr_reduce(["0.089", "0.0593"], ["mean"]),
                   dict(_MNIST, **ONE_EPOCH)),
        _map_group("tiny-check", "", [2], [1], _lr_reduce(["0.178"], ["mean"], allreduce="auto"),
                   dict(_MNIST, **ONE_EPOCH)),
        _map_group("tiny-noise", "", [2], [1], _lr_reduce(["0.178"], ["mean"], **_NOISE),
                   dict(_MNIST, log_window=MAP_NOISE_WINDOW, **ONE_EPOCH)),
        _map_group("tiny-race", "", [2], [1], _lr_reduce(["0.01"], ["sum"], race_window="shared", race_audit="true"),
                   dict(_MNIST, **ONE_EPOCH), modes=("race",)),
    ],
}
