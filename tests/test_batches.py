"""Batch assembly (rl/batches.py) against a fake rollout source: seeds, dynamic sampling, streaming
with staleness, failed groups, the error threshold. No Ray, no models."""
import pytest

from common.errors import RunError
from rl.batches import BatchAssembler
from rl.config import TRAIN_SEED_BLOCK, TrainConfig
from rollout.trajectory import Trajectory


class FakeSource:
    """Groups of `group_size` episodes per seed; `reward(seed, i)` and `fail(seed, i)` decide them."""

    def __init__(self, group_size, reward, fail=lambda seed, i: False, version=lambda seed: 0):
        self.G, self.reward, self.fail, self.version = group_size, reward, fail, version
        self.errors, self.stats, self.calls, self.queue = [], {}, [], []

    def episode(self, seed, i):
        t = Trajectory(prompt_ids=[1], seed=seed, reward=self.reward(seed, i), finish_reason="stop")
        t.add_policy_tokens([2], [-0.5], self.version(seed))
        if self.fail(seed, i):
            t.error = f"boom {seed}/{i}"
            self.errors.append({"seed": seed, "slot": i})
        return t

    def run(self, seeds):
        self.calls.append(list(seeds))
        self.errors = []
        trajs = [self.episode(s, i) for s in seeds for i in range(self.G)]
        self.stats = {"rollout/episodes": len(trajs), "rollout/generated_tokens": len(trajs), "rollout/wall_s": 1.0}
        return trajs

    # streaming
    def start_stream(self, next_seed, budget):
        self.next_seed, self.budget = next_seed, budget

    def take_group(self, timeout=None):
        seed = self.next_seed()
        return [self.episode(seed, i) for i in range(self.G)]

    def notify(self):
        pass

    def take_stream_stats(self, trajs):
        return {"rollout/episodes": len(trajs)}


def config(**algorithm) -> TrainConfig:
    cfg = TrainConfig()
    cfg.seed, cfg.rollout.prompts_per_step, cfg.rollout.group_size = 3, 4, 2
    for k, v in algorithm.items():
        setattr(cfg.algorithm, k, v)
    return cfg


def test_seeds_are_drawn_in_order_and_restored():
    cfg = config()
    src = FakeSource(2, reward=lambda s, i: float(i))
    b = BatchAssembler(cfg, src, on_errors=lambda e: None)
    b.collect()
    b.collect()
    base = 3 * TRAIN_SEED_BLOCK
    assert src.calls == [[base + n for n in range(4)], [base + n for n in range(4, 8)]]
    again = BatchAssembler(cfg, src, on_errors=lambda e: None)
    again.restore(b.state())
    assert again.next_seed() == base + 8


def test_batch_is_renumbered_groups_without_dynamic_sampling():
    cfg = config()
    got = BatchAssembler(cfg, FakeSource(2, reward=lambda s, i: 1.0), on_errors=lambda e: None).collect()
    assert [t.group for t in got.batch] == [0, 0, 1, 1, 2, 2, 3, 3] and got.zero_groups == set()
    assert got.stats["rollout/tokens_per_s"] == 8.0


def test_dynamic_sampling_drops_flat_groups_and_pads_when_rounds_run_out():
    cfg = config(dynamic_sampling=True, max_sample_rounds=2)
    # even seeds: rewards differ within the group (signal); odd seeds: all equal (dropped)
    src = FakeSource(2, reward=lambda s, i: float(i) if s % 2 == 0 else 1.0)
    got = BatchAssembler(cfg, src, on_errors=lambda e: None).collect()
    assert len(src.calls) == 2  # 2 kept groups per round, 4 needed: two rounds
    assert [t.seed % 2 for t in got.batch] == [0] * 8
    assert got.stats["dynamic/kept_groups"] == 4 and got.stats["dynamic/padded_groups"] == 0

    cfg = config(dynamic_sampling=True, max_sample_rounds=1)
    src = FakeSource(2, reward=lambda s, i: float(i) if s % 2 == 0 else 1.0)
    got = BatchAssembler(cfg, src, on_errors=lambda e: None).collect()
    assert got.zero_groups == {2, 3} and got.stats["dynamic/padded_groups"] == 2  # padding trains nothing
    assert len(got.sampled) == 8


def test_failed_groups_get_zero_advantage_and_errors_are_recorded_once():
    cfg = config()
    recorded = []
    src = FakeSource(2, reward=lambda s, i: 1.0, fail=lambda s, i: s == 3 * TRAIN_SEED_BLOCK + 1 and i == 0)
    got = BatchAssembler(cfg, src, on_errors=recorded.extend).collect()
    assert got.zero_groups == {1} and len(recorded) == 1


def test_too_many_failures_stop_the_run_naming_the_env_and_the_fix():
    cfg = config()
    src = FakeSource(2, reward=lambda s, i: 1.0, fail=lambda s, i: True)
    with pytest.raises(RunError, match=r"failed on 8/8 episodes.*raise env.max_error_frac"):
        BatchAssembler(cfg, src, on_errors=lambda e: None).collect()


def test_stream_drops_stale_groups_and_replaces_them():
    cfg = config()
    cfg.trainer.mode, cfg.trainer.max_staleness = "async", 1
    base = 3 * TRAIN_SEED_BLOCK
    # the first two groups were sampled by version 0, later ones by version 2
    src = FakeSource(2, reward=lambda s, i: float(i), version=lambda s: 0 if s < base + 2 else 2)
    recorded = []
    b = BatchAssembler(cfg, src, on_errors=recorded.extend)
    b.start_stream(lambda: 2)
    got = b.collect_stream(version=2)
    assert got.stats["async/stale_groups_dropped"] == 2 and b.replaced_groups == 2
    assert {t.seed for t in got.batch} == {base + n for n in range(2, 6)}
    assert len(got.sampled) == 12 and got.zero_groups == set()
    assert src.budget() == (2 + 1 + 1) * 4 + 2  # max_staleness + 1 batches ahead, plus the replaced groups
