"""Every algorithm of the `algorithm=` group runs end to end on the real stack; PPO (with its critic)
and DAPO (with dynamic sampling) make the tiny policy's mean reward rise on copy_digits.

Stated margins: over tests/test_learning.py's STEPS steps of 16 prompts x 8 samples, the mean reward
of the last 4 steps exceeds that of the first 4 by at least MARGIN (starts near 0.07). `reward/mean`
is over every sampled episode of a step (not only the groups DAPO keeps).
"""
import pytest

from tests.test_e2e import SMALL
from tests.test_learning import LEARN, STEPS, rise

MARGIN = 0.08


def test_ppo_with_critic_learns(train):
    metrics = train("algorithm=ppo", f"steps={STEPS}", *LEARN)
    start, end, rewards = rise(metrics)
    assert end >= start + MARGIN, rewards
    assert all(m["critic/mse"] >= 0 and "critic/loss" in m for m in metrics)
    assert metrics[-1]["policy/version"] == STEPS


def test_dapo_learns_with_dynamic_sampling(train):
    metrics = train("algorithm=dapo", f"steps={STEPS}", *LEARN)
    start, end, rewards = rise(metrics)
    assert end >= start + MARGIN, rewards
    for m in metrics:
        assert m["dynamic/kept_groups"] + m["dynamic/padded_groups"] == 16
        assert 1 <= m["dynamic/rounds"] <= 3
        assert m["rollout/episodes"] == 16 * 8 * m["dynamic/rounds"]
    assert sum(m["dynamic/dropped_groups"] for m in metrics) > 0  # all-equal groups were seen and dropped


@pytest.mark.parametrize("algo,extra", [
    ("dr_grpo", []),
    ("gspo", []),
    ("rloo", ["algorithm.entropy_coef=0.01"]),
    ("reinforce_pp", []),  # KL (k1) as a per-token reward penalty: a reference actor runs
    # KL (k2) as a loss term; truncated responses masked: the random policy stops in ~4% of episodes,
    # so this one keeps the default 256 episodes per step for some to be left in the loss
    ("reinforce_pp_baseline", ["algorithm.mask_truncated=true", "rollout.prompts_per_step=32", "rollout.group_size=8",
                               "learner.micro_batch_size=64"]),
    ("ppo", ["algorithm.critic.warmup_steps=1"]),
    ("ppo", ["learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=16",
             "learner.num_cpus_per_rank=0.25", "algorithm.critic.num_cpus_per_rank=0.1"]),  # critic under ZeRO-3
])
def test_algorithm_runs(train, algo, extra):
    metrics = train(f"algorithm={algo}", "steps=2", "eval.every=0", *SMALL, *extra)
    assert len(metrics) == 2
    for m in metrics:
        assert m["train/policy_tokens"] > 0 and m["advantage/abs_mean"] > 0
    if algo == "reinforce_pp":
        assert metrics[0]["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-6)  # reference == policy at step 0
        assert metrics[1]["kl/reward_penalty"] != 0.0  # the policy moved: -0.01 * k1 per token
        assert "train/kl_ref" not in metrics[0]
    if algo == "reinforce_pp_baseline":
        assert all("train/kl_ref" in m for m in metrics)
        assert metrics[0]["train/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # reference == policy at step 0
        assert metrics[1]["train/kl_ref"] > 0
        assert all(m["response/masked_truncated"] >= 0 for m in metrics)
    if algo == "ppo":
        assert all(m["critic/grad_norm"] > 0 for m in metrics)
    if algo == "ppo" and extra == ["algorithm.critic.warmup_steps=1"]:  # warm-up: step 0 trains only the critic, the policy (and its version) stays
        assert [m["policy/trained"] for m in metrics] == [0, 1]
        assert [m["policy/version"] for m in metrics] == [0, 1]
        assert all("critic/loss" in m for m in metrics)
