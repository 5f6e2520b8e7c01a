"""The loop's window of steps: per-step statistics kept on each rank, gathered to rank 0 in one go, where
the step figures are derived and logged and the run's divergence is decided for everyone."""

from __future__ import annotations

import itertools

import numpy as np

from .progress import milestone


class Diverged(Exception):
    """The loss became NaN or infinite: rank 0 saw it in a window, and every rank stops together."""


class StepWindow:
    """Per-step statistics of this rank, kept until they are gathered to rank 0 in one go: one tuple of
    FIELDS per step the Python loop ran (appending one costs a fraction of writing a row of an array), and
    the blocks of rows a compiled window of steps wrote (float64, FIELDS columns), kept in step order."""

    FIELDS = ("step", "epoch", "loss_sum", "count", "step_count", "arrive_s", "reduce_s", "wait_s", "lr")

    def __init__(self, size: int):
        self.size = size
        self.rows = []
        self._blocks = []   # earlier rows of the window as arrays, before those in `rows`
        self._in_blocks = 0
        self.noise = None  # a cnnpar.noise.NoiseMeter with --noise-scale: its rows travel in the same gather

    def __len__(self) -> int:
        return self._in_blocks + len(self.rows)

    def add_block(self, block: np.ndarray) -> None:
        """Rows (n, FIELDS) that a compiled window of steps wrote, after every row so far."""
        if self.rows:
            self._blocks.append(self._tuples_as_array())
            self.rows = []
        self._blocks.append(block)
        self._in_blocks += len(block)

    def table(self) -> np.ndarray:
        """Every row of the window, in step order, as one float64 array (steps, FIELDS)."""
        parts = self._blocks + ([self._tuples_as_array()] if self.rows or not self._blocks else [])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self) -> np.ndarray:
        """`table()`, and the window starts empty."""
        rows = self.table()
        self.rows, self._blocks, self._in_blocks = [], [], 0
        return rows

    def _tuples_as_array(self) -> np.ndarray:
        n_fields = len(self.FIELDS)  # fromiter over the flattened tuples: ~30% faster than np.array
        return np.fromiter(itertools.chain.from_iterable(self.rows), np.float64,
                           count=len(self.rows) * n_fields).reshape(len(self.rows), n_fields)


def flush_window(window, comm, log, exchange) -> None:
    """Gather the window's per-rank rows to rank 0, which derives the step figures and logs them.
    Rank 0 also decides, for everyone, whether the run has diverged."""
    rows = window.take()
    milestone("first_window")
    gathered = comm.gather(rows if window.noise is None else (rows, window.noise.take_rows()), root=0)
    if window.noise is not None and comm.Get_rank() == 0:
        gathered, noise_rows = [g[0] for g in gathered], [g[1] for g in gathered]
    audit = exchange.drain_audit()
    bad_step = -1
    if comm.Get_rank() == 0:
        per_rank = np.stack(gathered, axis=1)  # (steps, ranks, fields)
        f = {name: per_rank[:, :, i] for i, name in enumerate(StepWindow.FIELDS)}
        counts = f["count"]
        with np.errstate(invalid="ignore", divide="ignore"):
            rank_loss = np.where(counts > 0, f["loss_sum"] / counts, np.nan)
            loss = f["loss_sum"].sum(axis=1) / np.maximum(counts.sum(axis=1), 1)
        exchange_s, wait_s = exchange.split_wait(f["arrive_s"], f["reduce_s"], f["wait_s"])
        steps = f["step"][:, 0].astype(np.int64)
        if log is not None:
            log.append_steps(steps, f["epoch"][:, 0].astype(np.int32), loss.astype(np.float32),
                             rank_loss.astype(np.float32), f["step_count"][:, 0].astype(np.int32),
                             f["arrive_s"].astype(np.float32), exchange_s.astype(np.float32),
                             wait_s.astype(np.float32), f["lr"][:, 0].astype(np.float32))
            if audit is not None:
                log.append_audit(**audit)
            if window.noise is not None:
                log.append_noise(int(steps[0]), int(steps[-1]), **window.noise.window_summary(
                    noise_rows, f["step_count"][:, 0]))
        nonfinite = ~np.isfinite(loss)
        if nonfinite.any():
            bad_step = int(steps[np.argmax(nonfinite)])
    bad_step = comm.bcast(bad_step, root=0)
    if bad_step >= 0:
        raise Diverged(f"the loss became NaN or infinite at step {bad_step}; try a smaller --lr "
                        f"or --reduce mean")
