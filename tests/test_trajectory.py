import pytest
import torch

from rollout.trajectory import Trajectory, collate


def test_collate_aligns_tokens_masks_and_versions():
    a = Trajectory(prompt_ids=[5, 6, 7])
    a.add_policy_tokens([8, 9], [-0.5, -0.25], version=3)
    a.add_env_tokens([10])
    a.add_policy_tokens([11], [-0.125], version=4)
    b = Trajectory(prompt_ids=[5])
    b.add_policy_tokens([1], [-1.0], version=3)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11], [5, 1, 0, 0, 0, 0, 0]]
    # entry t scores input_ids[:, t+1]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]
    assert batch["behaviour_logprobs"][0].tolist() == [0, 0, -0.5, -0.25, 0, -0.125]
    assert batch["versions"][0].tolist() == [-1, -1, 3, 3, -1, 4]
    assert batch["lengths"].tolist() == [7, 2]
    assert a.num_policy_tokens == 3


def test_partial_rollout_versions_and_group_staleness():
    from rollout.trajectory import group_staleness

    t = Trajectory(prompt_ids=[1, 2])
    t.add_policy_tokens([5, 6, 7], [-0.1, -0.2, -0.3], [3, 3, 4])  # a weight update mid-request
    t.add_env_tokens([8])
    t.add_policy_tokens([9], [-0.4], 4)
    assert t.versions == [3, 3, 4, -1, 4] and t.min_version == 3
    fresh = Trajectory(prompt_ids=[1])
    fresh.add_policy_tokens([5], [-0.1], 5)
    assert group_staleness([t, fresh], 5) == 2  # the oldest token decides
    assert group_staleness([fresh], 5) == 0
    assert group_staleness([Trajectory(prompt_ids=[1])], 5) == 0  # nothing sampled (failed episode)
    with pytest.raises(ValueError, match="versions"):
        t.add_policy_tokens([1, 2], [0.0, 0.0], [1])
    batch = collate([t], 0)
    assert batch["versions"][0, 1:6].tolist() == [3, 3, 4, -1, 4]
