"""The interface every gradient exchange has (package docstring: cnnpar/exchange/__init__.py)."""

from __future__ import annotations

import numpy as np


class Exchange:
    name = "base"
    lossless = True        # False where updates may be lost by design (race, hogwild)
    deterministic = True   # same inputs -> bit-identical result
    replicas_agree = True  # False where a params checksum cannot be compared: 'local' (replicas diverge by
                           # design) and 'hogwild' (one shared copy, still being written when ranks check)
    excluded_s = 0.0       # seconds of the last reduce() spent on diagnostics (the race audit), not exchange
    reduces_nothing = False  # True where reduce() does nothing at all (one rank, 'local'): the trainer then
                             # runs whole windows of steps in one compiled call (cnnpar.exchange.reduces_nothing)
    first_step = 0         # global step of the first reduce() (a resumed run starts later)

    def describe(self) -> str:
        """What this exchange is, as the start-up line and the log's env say it: its name, and its window
        where it has one ('race, shared window')."""
        window = getattr(self, "window", None)
        return f"{self.name}, {window} window" if window else self.name

    def bind(self, params: np.ndarray) -> np.ndarray:
        return params

    def reduce(self, grads: np.ndarray) -> float:
        raise NotImplementedError

    def split_wait(self, arrive_s: np.ndarray, reduce_s: np.ndarray, measured_wait_s: np.ndarray) -> tuple:
        """Split each rank's time in `reduce` into waiting for slower ranks and exchanging.

        arrive_s, reduce_s, measured_wait_s: (steps, ranks). `arrive_s` is the time from a rank's step start
        to entering `reduce`; `measured_wait_s` what `reduce` returned. A blocking exchange releases all ranks
        at nearly the same moment, so steps start aligned and rank r waits for about
        max_j(arrive_j) - arrive_r. Where the exchange measured its wait itself (not NaN), that measurement
        wins. Returns (exchange_s, wait_s)."""
        estimated = arrive_s.max(axis=1, keepdims=True) - arrive_s
        wait_s = np.where(np.isnan(measured_wait_s), np.minimum(estimated, reduce_s), measured_wait_s)
        wait_s = np.clip(wait_s, 0.0, reduce_s)
        return reduce_s - wait_s, wait_s

    def drain_audit(self) -> dict | None:
        """Per-step race-audit figures gathered since the last call (rank 0 logs them), or None."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
