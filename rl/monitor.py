"""Run-health monitors that turn metrics into warnings."""
from __future__ import annotations

import statistics


class MismatchMonitor:
    """Flags a jump of the engine/learner mismatch (`mismatch/kl`): a value above `factor` times the
    median of the last `window` steps (and above `floor`) usually means a broken weight sync, a
    dtype change or stale weights, not policy drift."""

    def __init__(self, factor: float = 5.0, floor: float = 1e-3, window: int = 10, min_history: int = 3):
        self.factor, self.floor, self.window, self.min_history = factor, floor, window, min_history
        self.history: list[float] = []

    def update(self, value: float) -> str | None:
        """Record this step's value; returns a warning message on a jump, else None."""
        recent = self.history[-self.window:]
        self.history.append(value)
        if len(recent) < self.min_history:
            return None
        median = statistics.median(recent)
        if value > self.floor and value > self.factor * median:
            return (f"engine/learner mismatch jumped: mismatch/kl {value:.3g} vs a median of {median:.3g} over the "
                    f"last {len(recent)} steps; check the weight sync (sync/*), the engine dtype "
                    "(policy.engine_dtype) and is/clipped_frac")
        return None
