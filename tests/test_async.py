"""Asynchronous training modes on the real stack: one-step-off overlap and streaming async with a
staleness bound; every sample's staleness and importance-sampling statistics are reported."""
from tests.test_e2e import SMALL


def test_one_step_off_trains_on_samples_exactly_one_version_old(train):
    metrics = train("trainer.mode=one_step_off", "steps=4", *SMALL)
    assert [m["policy/version"] for m in metrics] == [1, 2, 3, 4]
    # step 0 trains on version-0 samples; step k > 0 on samples of version k-1 (generated while
    # step k-1 trained), so exactly one version behind the learner
    assert [m["rollout/policy_version"] for m in metrics] == [0, 0, 1, 2]
    assert [m["async/staleness_max"] for m in metrics] == [0, 1, 1, 1]
    # eval (eval.every=10: after steps 0 and 3) syncs the engines to the learner first, without
    # changing which version the next rollouts use (above)
    assert [m.get("eval/policy_version") for m in metrics] == [1, None, None, 4]
    for m in metrics:
        assert m["is/mean"] > 0 and 0 <= m["is/clipped_frac"] <= 1 and m["train/policy_tokens"] > 0


def test_async_never_trains_on_samples_beyond_max_staleness(train):
    metrics = train("trainer.mode=async", "trainer.max_staleness=1", "steps=5", *SMALL)
    assert [m["policy/version"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(m["async/staleness_max"] <= 1 for m in metrics), [m["async/staleness_max"] for m in metrics]
    assert any(m["async/staleness_max"] == 1 for m in metrics)  # it did run ahead of the learner
    assert all(m["rollout/episodes"] >= 32 and "async/stale_groups_dropped" in m for m in metrics)
    # eval episodes join the running stream's event loop, on the just-synced policy
    assert [m.get("eval/policy_version") for m in metrics] == [1, None, None, None, 5]
    assert metrics[-1]["eval/num_episodes"] == 8 and metrics[-1]["eval/failed_episodes"] == 0


def test_async_zero_staleness_is_on_policy(train):
    metrics = train("trainer.mode=async", "trainer.max_staleness=0", "steps=3", "policy=tiny_qwen3", *SMALL)
    assert all(m["async/staleness_max"] == 0 for m in metrics)
    # on-policy with fp32 on both sides: behaviour == learner, importance weights are 1
    assert all(abs(m["is/mean"] - 1.0) < 1e-4 and m["is/clipped_frac"] == 0.0 for m in metrics)
