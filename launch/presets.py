"""The sweep's named grids (`python launch/sweep.py --preset NAME`), as plain data.

A preset has a `doc`, a default output folder `out` and a list of `groups`. A group is one block of the grid,
every setting x mode x rank count x seed:
  ranks, modes, seeds   the lists that are multiplied;
  settings              a list of {flag: value}, one grid dimension encoded in the file names ([{}]: none);
  base                  {flag: value} that every run of the group gets, not in the names;
  mode_base             {mode: {flag: value}} for the runs of that mode only;
  name, doc             a group with a doc is listed by --list-presets and chosen by --group.
Flags are cnnpar.train's, spelt as Config fields (`lr_scaling`), values as strings; launch/sweep_grid.py
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
        "groups": [{"name": "paper", "ranks": list(range(1, 13)), "modes": ["sync", "race"], "seeds": [1, 2, 3],
                    "base": {"dataset": "mnist-5k", "reduce": "sum", "epochs": PAPER_EPOCHS}}],
    },
    "explain": {
        "doc": "controlled experiments that test the paper's explanation (analyse with analysis/explain.py): "
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
