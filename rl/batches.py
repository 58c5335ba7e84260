"""Batch assembly: which env seeds are rolled out, and which finished groups make up a step's batch.

`BatchAssembler` asks a rollout source (rollout.episodes.EpisodeRunner, or a fake in tests) for
groups of episodes and returns a `Collected` batch of exactly `rollout.prompts_per_step` groups:
- env seeds: `seed * TRAIN_SEED_BLOCK + n`, one per prompt, drawn in order by every mode (the
  position is checkpointed, so a resumed run continues the sequence);
- dynamic sampling (DAPO): groups whose shaped rewards are all equal are dropped and more prompts
  are rolled out, up to `algorithm.max_sample_rounds` rounds; if still short, dropped groups pad
  the batch with zero advantage;
- streaming (async mode): finished groups are taken in completion order; groups more than
  `trainer.max_staleness` versions old are dropped (stale_policy=drop) and replaced;
- failures: a group with an episode that failed after all retries gets zero advantage, and more
  than `env.max_error_frac` failed episodes stop the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from common.errors import RunError
from rl.algorithms import groups_with_signal, overlong_penalty
from rl.config import TRAIN_SEED_BLOCK, TrainConfig
from rollout.trajectory import group_staleness

SUMMED_ROLLOUT_STATS = ("rollout/episodes", "env/errors", "env/retries", "env/failed_episodes",
                        "env/failed_groups", "rollout/generated_tokens", "rollout/wall_s",
                        "rollout/engine_restarts", "rollout/engine_retried_episodes", "rollout/context_truncated")


@dataclass
class Collected:
    """One step's rollouts: the batch (exactly prompts_per_step groups, renumbered 0..P-1), the
    groups whose advantage is forced to 0, every sampled trajectory (also dropped ones) and stats."""
    batch: list
    zero_groups: set
    sampled: list
    stats: dict = field(default_factory=dict)


def shaped_rewards(cfg: TrainConfig, trajs: list) -> torch.Tensor:
    """Episode rewards plus DAPO's overlong penalty (when algorithm.overlong_buffer_frac > 0)."""
    a, r = cfg.algorithm, cfg.rollout
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    if a.overlong_buffer_frac > 0:
        longest = r.max_tokens * r.max_turns
        rewards = rewards + overlong_penalty(torch.tensor([t.num_policy_tokens for t in trajs]), longest,
                                             a.overlong_buffer_frac * longest, a.overlong_penalty)
    return rewards


class BatchAssembler:
    """`source`: run(seeds) -> trajectories (groups of group_size, in seed order), .stats, .errors;
    for streaming also start_stream(next_seed, budget), take_group(timeout), notify(),
    take_stream_stats(trajs). `on_errors(errors)` records every env failure of a round."""

    def __init__(self, cfg: TrainConfig, source, on_errors: Callable[[list], None]):
        self.cfg, self.source, self.on_errors = cfg, source, on_errors
        self.prompts_drawn = 0  # env seeds used so far (dynamic sampling draws extra prompts)
        self.replaced_groups = 0  # streaming: groups dropped and replaced so far
        self.streaming = False

    # -- seeds ------------------------------------------------------------------------------------
    def next_seed(self) -> int:
        """The next env seed (one per prompt; every mode draws from the same sequence)."""
        seed = self.cfg.seed * TRAIN_SEED_BLOCK + self.prompts_drawn
        self.prompts_drawn += 1
        return seed

    def next_seeds(self) -> list[int]:
        return [self.next_seed() for _ in range(self.cfg.rollout.prompts_per_step)]

    def state(self) -> dict:
        return {"prompts_drawn": self.prompts_drawn, "replaced_groups": self.replaced_groups}

    def restore(self, state: dict) -> None:
        self.prompts_drawn, self.replaced_groups = state["prompts_drawn"], state["replaced_groups"]

    # -- one batch, round by round (sync and one-step-off modes) ---------------------------------
    def collect(self) -> Collected:
        a, G, P = self.cfg.algorithm, self.cfg.rollout.group_size, self.cfg.rollout.prompts_per_step
        kept, dropped, everything, stats, rounds = [], [], [], {}, 0
        while True:
            trajs = self.source.run(self.next_seeds())
            rounds += 1
            self._check_errors(trajs)
            everything += trajs
            for k, v in self.source.stats.items():
                stats[k] = stats[k] + v if k in SUMMED_ROLLOUT_STATS and k in stats else v
            groups = [trajs[g * G:(g + 1) * G] for g in range(P)]
            if not a.dynamic_sampling:
                kept = groups
                break
            signal = groups_with_signal(shaped_rewards(self.cfg, trajs), G)
            for g, grp in enumerate(groups):
                (kept if bool(signal[g]) and not any(t.error for t in grp) else dropped).append(grp)
            if len(kept) >= P or rounds >= a.max_sample_rounds:
                break
        stats["rollout/tokens_per_s"] = stats["rollout/generated_tokens"] / max(stats["rollout/wall_s"], 1e-9)
        if a.dynamic_sampling:
            stats["dynamic/rounds"] = rounds
        return self._assemble(kept, dropped, everything, stats)

    # -- one batch from the stream (async mode) ----------------------------------------------------
    def stream_budget(self, version: int) -> int:
        """Groups the producer may have started: enough for `max_staleness + 1` batches ahead of
        policy `version`, plus every group dropped so far (they are replaced)."""
        return (version + self.cfg.trainer.max_staleness + 1) * self.cfg.rollout.prompts_per_step + self.replaced_groups

    def start_stream(self, version: Callable[[], int]) -> None:
        if not self.streaming:
            self.source.start_stream(self.next_seed, lambda: self.stream_budget(version()))
            self.streaming = True

    def collect_stream(self, version: int) -> Collected:
        cfg, a = self.cfg, self.cfg.algorithm
        t, G, P = cfg.trainer, cfg.rollout.group_size, cfg.rollout.prompts_per_step
        kept, no_signal, everything, stale = [], [], [], 0
        while len(kept) < P:
            grp = self.source.take_group(timeout=t.wait_timeout_s)
            everything += grp
            self._check_errors(grp, record=False)
            if group_staleness(grp, version) > t.max_staleness and t.stale_policy == "drop":
                stale += 1
                self._replace_group()
                continue
            if a.dynamic_sampling and not (bool(groups_with_signal(shaped_rewards(cfg, grp), G)[0])
                                           and not any(tr.error for tr in grp)):
                no_signal.append(grp)
                self._replace_group()
                continue
            kept.append(grp)
        stats = self.source.take_stream_stats(everything)
        self.on_errors(self.source.errors)
        self.source.errors = []
        stats["async/stale_groups_dropped"] = stale
        return self._assemble(kept, no_signal, everything, stats)

    def _replace_group(self) -> None:
        self.replaced_groups += 1
        self.source.notify()  # the budget grew: the producer starts a new group

    def stop_stream(self) -> None:
        if self.streaming:
            self.source.stop_stream()
            self.streaming = False

    # -- shared --------------------------------------------------------------------------------------
    def _check_errors(self, trajs: list, record: bool = True) -> None:
        failed = [t for t in trajs if t.error]
        if record:
            self.on_errors(self.source.errors)
        if len(failed) > self.cfg.env.max_error_frac * len(trajs):
            raise RunError(
                f"env {self.cfg.env._target_ or self.cfg.env.name!r} failed on {len(failed)}/{len(trajs)} episodes "
                f"after {self.cfg.rollout.max_retries} retries; first error: {failed[0].error}. "
                "Fix the environment (or raise env.max_error_frac to tolerate failures)"
            )

    def _assemble(self, kept: list, dropped: list, everything: list, stats: dict) -> Collected:
        """Exactly prompts_per_step groups, renumbered: kept groups first, then (if short) dropped
        ones as zero-advantage padding."""
        P = self.cfg.rollout.prompts_per_step
        padded = max(0, P - len(kept))
        batch_groups = kept[:P] + dropped[:padded]
        zero_groups = {g for g, grp in enumerate(batch_groups) if g >= len(kept[:P]) or any(t.error for t in grp)}
        batch = []
        for g, grp in enumerate(batch_groups):
            for t in grp:
                t.group = g
                batch.append(t)
        if self.cfg.algorithm.dynamic_sampling:
            stats.update({"dynamic/kept_groups": min(len(kept), P), "dynamic/dropped_groups": len(dropped),
                          "dynamic/padded_groups": padded})
        return Collected(batch, zero_groups, everything, stats)
