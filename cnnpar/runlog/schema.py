"""The run-log schema as data: every dataset and attribute of a log, with its dtype, shape, units,
meaning and when it is written.

The writer creates datasets (and their `units` / `description` attributes) from this table, the reader
validates files against it, and docs/runlog.md embeds `markdown_table()` verbatim (a test compares the
two), so the file, the code and the documentation cannot drift apart.

Paths: `/steps/loss` is a dataset; `/final@test_acc` is attribute `test_acc` of group `/final`;
`/@status` is an attribute of the root group. Shapes use S = rows of the table, R = ranks that train
the logged replica (`/@ranks`), C = classes, P = parameters, n = parameter tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "cnnpar-runlog"
FORMAT_VERSION = 2  # 2: units/description on every dataset, uint8 /consistency/ok, fixed-shape /final/params
# "incomplete" is never written: a reader reports it for a "running" log that no live writer holds.
STATUSES = ("running", "complete", "failed", "diverged", "interrupted", "preempted", "incomplete")
WRITTEN_STATUSES = STATUSES[:-1]

STATUS_BYTES = 16          # fixed size of the root `status` attribute (rewritten in place)
MESSAGE_BYTES = 1024       # fixed size of the root `status_message` attribute (longer messages are cut)
FINAL_EXTRA_BYTES = 4096   # fixed size of /final's `extra_json` attribute

# HDF5 1.10 (Debian's hdf5-tools) must read every log: no object header or index newer than 1.10's.
LIBVER = ("earliest", "v110")


@dataclass(frozen=True)
class Entry:
    path: str          # "/group/dataset" or "/group@attribute"
    dtype: str         # numpy dtype string, or "str" (fixed-length UTF-8; "str16" = 16 bytes)
    shape: str         # "(S,)", "(S, R)", "()" for a scalar attribute, ...
    units: str         # "1" = dimensionless
    description: str
    written: str       # "create", "flush" (rows appended, visible after a flush), "final", "in place"
    present: str = "always"  # or the config setting that makes the group exist

    @property
    def is_attribute(self) -> bool:
        return "@" in self.path

    @property
    def group(self) -> str:
        head = self.path.split("@")[0] if self.is_attribute else self.path.rsplit("/", 1)[0]
        return head.rstrip("/") or "/"

    @property
    def name(self) -> str:
        return self.path.split("@")[1] if self.is_attribute else self.path.rsplit("/", 1)[1]

    @property
    def ndim(self) -> int:
        return len([d for d in self.shape.strip("()").split(",") if d.strip()])

    @property
    def per_rank(self) -> bool:
        return self.shape == "(S, R)"


def _e(path, dtype, shape, units, description, written, present="always") -> Entry:
    return Entry(path, dtype, shape, units, description, written, present)


SCHEMA: tuple[Entry, ...] = (
    # root attributes
    _e("/@format", "str", "()", "", "always `cnnpar-runlog`; a file without it is not a run log", "create"),
    _e("/@format_version", "int64", "()", "", "schema version; readers refuse versions newer than they know",
       "create"),
    _e("/@created", "str", "()", "", "when the run started, ISO 8601 UTC (the instant the default file name "
       "is stamped with); kept across resumes", "create"),
    _e("/@status", "str16", "()", "", "`running`, `complete`, `failed`, `diverged`, `interrupted` or "
       "`preempted` (readers report a `running` log that no live writer holds as `incomplete`)", "in place"),
    _e("/@status_message", "str1024", "()", "", "why the run ended that way; empty while running or when "
       "complete; cut with `...` when longer", "in place"),
    _e("/@cnnpar_version", "str", "()", "", "version of the cnnpar that created the log", "create"),
    _e("/@ranks", "int64", "()", "ranks", "R: ranks that train the logged replica, the width of every "
       "per-rank dataset (with `--folds k`: fold 0's group, `world_ranks / k`)", "create"),
    _e("/@world_ranks", "int64", "()", "ranks", "MPI ranks of the whole job", "create"),
    _e("/@n_classes", "int64", "()", "classes", "C: number of classes", "create"),
    _e("/@resume_count", "int64", "()", "", "times the log was reopened to resume from a checkpoint",
       "create"),
    # config and environment
    _e("/config@json", "str", "()", "", "the frozen `Config` as JSON (sorted keys), the authoritative copy; "
       "one more attribute per field repeats it for `h5ls -v` (bools as uint8 0/1, `None` omitted)",
       "create"),
    _e("/env@json", "str", "()", "", "software and machine as JSON (authoritative): versions, "
       "`mpi_library`, `hostnames` (per rank of `/@ranks`), `ranks` (the job's), `nodes`, `cores`, `physical_cores`, "
       "`oversubscribed`, `wait`, `threads_per_rank` (int), `exchange` (the one the run used, as the start-up "
       "line says it: `factored`, `race, shared window`, ...); each repeated as an attribute", "create"),
    # parameter layout
    _e("/layout/names", "str", "(n,)", "", "parameter tensor names, in the order of the flat vector",
       "create"),
    _e("/layout/shapes", "str", "(n,)", "", "each tensor's shape as `8x1x5x5` (empty = scalar)", "create"),
    _e("/layout/offsets", "int64", "(n,)", "values", "first index of each tensor in the flat vector",
       "create"),
    _e("/layout/sizes", "int64", "(n,)", "values", "values in each tensor (the product of its shape)",
       "create"),
    # per-step table
    _e("/steps/step", "int64", "(S,)", "steps", "global step index, 0-based, contiguous", "flush"),
    _e("/steps/epoch", "int32", "(S,)", "epochs", "epoch the step belongs to, 0-based", "flush"),
    _e("/steps/loss", "float32", "(S,)", "nats", "the step's mean training loss over all its samples",
       "flush"),
    _e("/steps/rank_loss", "float32", "(S, R)", "nats", "each rank's mean loss over its own samples of the "
       "step; NaN when it had none", "flush"),
    _e("/steps/samples", "int32", "(S,)", "samples", "samples processed in the step, all ranks", "flush"),
    _e("/steps/compute_s", "float32", "(S, R)", "s", "each rank's time from step start to entering the "
       "exchange (sampling, forward, backward)", "flush"),
    _e("/steps/exchange_s", "float32", "(S, R)", "s", "each rank's time in the exchange minus its waiting, "
       "race-audit time excluded", "flush"),
    _e("/steps/wait_s", "float32", "(S, R)", "s", "each rank's time waiting for slower ranks inside the "
       "exchange (measured where the exchange can, else estimated from arrival times)", "flush"),
    _e("/steps/lr", "float32", "(S,)", "1", "learning rate applied in the step; NaN when not given",
       "flush"),
    # race audit
    _e("/audit/step", "int64", "(S,)", "steps", "audited global step", "flush", "race_audit"),
    _e("/audit/rel_l2_error", "float64", "(S,)", "1", "|g_race - g_exact|_2 / |g_exact|_2 of the step's "
       "summed gradient", "flush", "race_audit"),
    _e("/audit/frac_elements_differ", "float64", "(S,)", "1", "fraction of gradient elements where the race "
       "result differs from the exact sum", "flush", "race_audit"),
    _e("/audit/lost_contributions", "float64", "(S,)", "contributions", "estimated per-element rank "
       "contributions the race lost in the step, summed over the elements (of R x n_params)", "flush",
       "race_audit"),
    # gradient noise scale (--noise-scale, cnnpar/noise.py; McCandlish et al. 2018, appendix A.1)
    _e("/noise/step", "int64", "(S,)", "steps", "last global step of the window", "flush", "noise_scale"),
    _e("/noise/first_step", "int64", "(S,)", "steps", "first global step of the window", "flush",
       "noise_scale"),
    _e("/noise/steps", "int32", "(S,)", "steps", "steps in the window that had two batch sizes to compare",
       "flush", "noise_scale"),
    _e("/noise/b_small", "float64", "(S,)", "samples", "the small batch: samples per rank (one sample with "
       "one rank)", "flush", "noise_scale"),
    _e("/noise/b_big", "float64", "(S,)", "samples", "the big batch: the step's global batch", "flush",
       "noise_scale"),
    _e("/noise/g2", "float64", "(S,)", "nats^2", "mean over the window "
       "of the unbiased estimate of the true gradient G's squared norm", "flush", "noise_scale"),
    _e("/noise/trace", "float64", "(S,)", "nats^2", "mean over the window of the unbiased estimate of "
       "tr(Sigma), the per-sample gradient covariance's trace", "flush", "noise_scale"),
    _e("/noise/b_simple", "float64", "(S,)", "samples", "trace / g2: the simple noise scale B_simple",
       "flush", "noise_scale"),
    _e("/noise_epochs/epoch", "int32", "(S,)", "epochs", "epoch, 0-based", "flush", "noise_scale"),
    _e("/noise_epochs/step", "int64", "(S,)", "steps", "global steps done at the epoch's end", "flush",
       "noise_scale"),
    _e("/noise_epochs/steps", "int32", "(S,)", "steps", "steps of the epoch that entered the estimates",
       "flush", "noise_scale"),
    _e("/noise_epochs/g2", "float64", "(S,)", "nats^2", "the epoch's mean estimate of G's squared norm", "flush",
       "noise_scale"),
    _e("/noise_epochs/trace", "float64", "(S,)", "nats^2", "the epoch's mean tr(Sigma) estimate",
       "flush", "noise_scale"),
    _e("/noise_epochs/b_simple", "float64", "(S,)", "samples", "the epoch's B_simple = trace / g2", "flush",
       "noise_scale"),
    # per-epoch table
    _e("/epochs/epoch", "int32", "(S,)", "epochs", "evaluated epoch, 0-based", "flush"),
    _e("/epochs/step", "int64", "(S,)", "steps", "global steps done at that point", "flush"),
    _e("/epochs/train_loss", "float64", "(S,)", "nats", "mean training loss over the epoch's samples, as "
       "trained", "flush"),
    _e("/epochs/train_acc", "float64", "(S,)", "1", "training accuracy over the epoch's samples (fraction)",
       "flush"),
    _e("/epochs/test_loss", "float64", "(S,)", "nats", "mean loss on the test set after the epoch", "flush"),
    _e("/epochs/test_acc", "float64", "(S,)", "1", "test-set accuracy after the epoch (fraction)", "flush"),
    _e("/epochs/train_time_s", "float64", "(S,)", "s", "cumulative training wall time, evaluation excluded",
       "flush"),
    _e("/epochs/samples", "int64", "(S,)", "samples", "cumulative training samples", "flush"),
    # replica checks
    _e("/consistency/step", "int64", "(S,)", "steps", "global step after which the replicas were compared",
       "flush"),
    _e("/consistency/checksum", "uint64", "(S,)", "", "rank 0's CRC-32 of its float32 params", "flush"),
    _e("/consistency/ok", "uint8", "(S,)", "", "1 when every rank's checksum was equal, else 0", "flush"),
    # cross-validation
    _e("/folds/fold", "int32", "(S,)", "folds", "fold index", "final", "folds > 1"),
    _e("/folds/test_acc", "float64", "(S,)", "1", "held-out accuracy of the fold (fraction)", "final",
       "folds > 1"),
    _e("/folds/test_loss", "float64", "(S,)", "nats", "held-out mean loss of the fold", "final", "folds > 1"),
    _e("/folds@mean_acc", "float64", "()", "1", "mean of `test_acc` (NaN until written)", "final",
       "folds > 1"),
    _e("/folds@sd_acc", "float64", "()", "1", "sample standard deviation (ddof 1) of `test_acc` (NaN for "
       "k < 2 or until written)", "final", "folds > 1"),
    # the result
    _e("/final/params", "float32", "(P,)", "", "final flat parameters (zeros until `/committed_rows` says "
       "final = 1); attribute `n_params`", "final"),
    _e("/final/confusion", "int64", "(C, C)", "samples", "test-set confusion matrix: row = true label, "
       "column = predicted", "final"),
    _e("/final@test_acc", "float64", "()", "1", "final test accuracy (fraction; NaN until written)",
       "final"),
    _e("/final@test_loss", "float64", "()", "nats", "final test loss", "final"),
    _e("/final@train_time_s", "float64", "()", "s", "total training wall time, evaluation excluded",
       "final"),
    _e("/final@samples", "int64", "()", "samples", "total training samples (-1 until written)", "final"),
    _e("/final@samples_per_s", "float64", "()", "samples/s", "`samples / train_time_s`", "final"),
    _e("/final@steps", "int64", "()", "steps", "global steps done", "final"),
    _e("/final@extra_json", "str4096", "()", "", "any other keyword given to `write_final`, as JSON",
       "final"),
    # what a reader may trust
    _e("/committed_rows", "int64", "(8,)", "rows", "rows of steps, audit, epochs, consistency, folds, noise, "
       "noise_epochs complete at the last flush, then 1 once `/final` was written; attribute `tables` names "
       "them (logs of format 1 have the first five and final)", "flush"),
)

BY_PATH = {entry.path: entry for entry in SCHEMA}


@dataclass(frozen=True)
class Table:
    """One row table of a log: the writer creates, appends to and rewrites it, the reader loads and truncates
    it, all by looping over TABLE_RECORDS."""
    name: str
    chunk_rows: int             # HDF5 chunk length of its datasets
    present: str = "always"     # the config setting that makes the group exist (the schema's `present` column)
    on_resume: str = "before"   # which rows a resume at step s keeps: "before" those whose `step` < s (the
                                # steps done before it), "through" those whose `step` <= s (a step count at an
                                # epoch's end), "none" (written with /final, so written again)

    def present_in(self, config: dict) -> bool:
        """Whether a run of this config (Config fields as a dict) has the table."""
        if self.present == "always":
            return True
        if self.present == "folds > 1":
            return int(config.get("folds", 1) or 1) > 1
        return bool(config.get(self.present, False))


TABLE_RECORDS = (
    Table("steps", 512),
    Table("audit", 512, "race_audit"),
    Table("epochs", 64, on_resume="through"),
    Table("consistency", 256),
    Table("folds", 16, "folds > 1", on_resume="none"),
    Table("noise", 64, "noise_scale"),              # a window's `step` is its last one
    Table("noise_epochs", 64, "noise_scale", on_resume="through"),
)
TABLES = tuple(t.name for t in TABLE_RECORDS)
BY_TABLE = {t.name: t for t in TABLE_RECORDS}
COMMITTED = TABLES + ("final",)   # what /committed_rows counts, in order
COMMITTED_V1 = ("steps", "audit", "epochs", "consistency", "folds", "final")  # logs without a `tables` attribute
OPTIONAL_GROUPS = {t.name: t.present for t in TABLE_RECORDS if t.present != "always"}
assert all(e.present == BY_TABLE[e.group[1:]].present for e in SCHEMA if e.group[1:] in BY_TABLE)
FINAL_ATTRS = {e.name: e.dtype for e in SCHEMA if e.group == "/final" and e.is_attribute and e.name != "extra_json"}


def columns(table: str) -> tuple[Entry, ...]:
    """The datasets of one row table, in schema order."""
    return _COLUMNS.get(table, ())


# Looked up for every column of every append and flush: the schema is scanned once, not each time
_COLUMNS = {t.name: tuple(e for e in SCHEMA if e.group == f"/{t.name}" and not e.is_attribute) for t in TABLE_RECORDS}


def datasets() -> list[Entry]:
    return [e for e in SCHEMA if not e.is_attribute]


def markdown_table() -> str:
    """The schema as the markdown table docs/runlog.md embeds."""
    lines = ["| path | dtype | shape | units | written | present | meaning |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in SCHEMA:
        lines.append(f"| `{e.path}` | {e.dtype} | {e.shape} | {e.units} | {e.written} | {e.present} | "
                     f"{e.description} |")
    return "\n".join(lines)
