"""Training modes (`trainer.mode`): when a step's rollouts run relative to its update.

sync          rollout -> update -> weight sync (samples of step k come from version k);
one_step_off  the rollout of step k+1 runs (on version k) while step k trains;
async         groups stream in continuously; after each update the weights go to the engines
              mid-flight (partial rollouts) and samples are at most trainer.max_staleness
              versions old.

A schedule drives the controller's parts (batch assembly, learn, weight sync) and returns the
step's metrics; it owns whatever runs in the background between steps. Adding a mode is one
class here and one registry entry.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl.controller import Controller

NO_SYNC = {"timing/sync_s": 0.0}


class Schedule:
    def __init__(self, ctl: "Controller"):
        self.ctl = ctl

    def step(self) -> dict:
        """One training step: its metrics, with `timing/rollout_s` the time spent waiting for rollouts."""
        raise NotImplementedError

    def before_eval(self) -> None:
        """Called before an evaluation uses the engines and the runner's event loop."""

    def close(self) -> None:
        """Stop background work."""


class SyncSchedule(Schedule):
    def step(self) -> dict:
        c, t0 = self.ctl, time.perf_counter()
        collected = c.batches.collect()
        t_rollout = time.perf_counter() - t0
        metrics = c.learn(collected)
        sync = c.sync_weights(interrupt=False) if metrics["policy/trained"] else NO_SYNC
        return {**metrics, **sync, "timing/rollout_s": t_rollout}


class OneStepOffSchedule(Schedule):
    """The next batch's rollout runs in a thread (on the current weights) while this batch trains."""

    def __init__(self, ctl: "Controller"):
        super().__init__(ctl)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._pending: Future | None = None

    def step(self) -> dict:
        c, t0 = self.ctl, time.perf_counter()
        if self._pending is None:
            self._pending = self._executor.submit(c.batches.collect)
        collected = self._pending.result()
        t_rollout = time.perf_counter() - t0
        sync = c.sync_weights(interrupt=False) if c.engine_version < c.version else NO_SYNC  # engines idle now
        self._pending = self._executor.submit(c.batches.collect) if c.step + 1 < c.cfg.steps else None
        with c.learner_lock:
            metrics = c.learn(collected)
        return {**metrics, **sync, "timing/rollout_s": t_rollout}

    def before_eval(self) -> None:
        if self._pending is not None:  # it owns the runner's event loop: let it finish first
            self._pending.result()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class AsyncSchedule(Schedule):
    """Groups stream from the runner's producer; weights land in the engines mid-flight."""

    def step(self) -> dict:
        c, t0 = self.ctl, time.perf_counter()
        c.batches.start_stream(lambda: c.version)
        collected = c.batches.collect_stream(c.version)
        t_rollout = time.perf_counter() - t0
        with c.learner_lock:
            metrics = c.learn(collected)
        sync = NO_SYNC
        if metrics["policy/trained"]:
            sync = c.sync_weights(interrupt=True)
            c.batches.source.notify()  # the stream budget grew with the version
        return {**metrics, **sync, "timing/rollout_s": t_rollout}

    def close(self) -> None:
        self.ctl.batches.stop_stream()


SCHEDULES: dict[str, type[Schedule]] = {"sync": SyncSchedule, "one_step_off": OneStepOffSchedule,
                                        "async": AsyncSchedule}
