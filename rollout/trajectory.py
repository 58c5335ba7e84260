"""Trajectories (the unit that moves from rollout to learner) and their collation into tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # everything after the first prompt
    loss_mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy (trained on)
    behaviour_logprobs: list[float] = field(default_factory=list)  # engine logprobs (0 for env tokens)
    versions: list[int] = field(default_factory=list)  # policy version per token (-1 for env tokens)
    reward: float = 0.0  # episode reward: the sum of turn rewards
    turn_rewards: list[float] = field(default_factory=list)
    group: int = 0
    seed: int = 0
    finish_reason: str = ""
    turns: int = 0
    error: str | None = None
    info: dict = field(default_factory=dict)
    # vision-language prompts: the processor's pixel_values [patches, D] and image_grid_thw [images, 3]
    # (policies/vision.py); prompt_ids hold the expanded image placeholder tokens they fill
    mm_inputs: dict = field(default_factory=dict)

    def add_policy_tokens(self, ids: list[int], logprobs: list[float], version: int | list[int]) -> None:
        """`version`: one policy version for all `ids`, or one per token (partial rollouts)."""
        versions = list(version) if isinstance(version, (list, tuple)) else [version] * len(ids)
        if not len(versions) == len(ids) == len(logprobs):
            raise ValueError(f"{len(ids)} tokens, {len(logprobs)} logprobs and {len(versions)} versions")
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.behaviour_logprobs += logprobs
        self.versions += versions

    def add_env_tokens(self, ids: list[int]) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.behaviour_logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)

    @property
    def min_version(self) -> int:
        """Oldest policy version among the sampled tokens (-1 if none)."""
        pol = [v for v in self.versions if v >= 0]
        return min(pol) if pol else -1

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.loss_mask)


def group_staleness(group: list[Trajectory], learner_version: int) -> int:
    """How many policy versions the oldest sampled token of the group is behind the learner (0 if
    the group has no sampled tokens)."""
    oldest = min((t.min_version for t in group if t.min_version >= 0), default=learner_version)
    return learner_version - oldest


def collate(trajs: list[Trajectory], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Token-aligned tensors are [B, T-1]: entry t refers to input_ids[:, t+1]."""
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    T = max(lengths)
    B = len(trajs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T - 1), dtype=torch.float32)
    behaviour = torch.zeros((B, T - 1), dtype=torch.float32)
    versions = torch.full((B, T - 1), -1, dtype=torch.long)
    for i, t in enumerate(trajs):
        seq = t.prompt_ids + t.response_ids
        input_ids[i, : len(seq)] = torch.tensor(seq)
        p, r = len(t.prompt_ids), len(t.response_ids)
        if r:
            loss_mask[i, p - 1 : p - 1 + r] = torch.tensor(t.loss_mask, dtype=torch.float32)
            behaviour[i, p - 1 : p - 1 + r] = torch.tensor(t.behaviour_logprobs, dtype=torch.float32)
            versions[i, p - 1 : p - 1 + r] = torch.tensor(t.versions)
    from policies.vision import pad_mm_inputs

    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "behaviour_logprobs": behaviour,
        "versions": versions,
        "rewards": torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        "lengths": torch.tensor(lengths),
        **pad_mm_inputs([t.mm_inputs for t in trajs]),  # images: pixel_values, image_grid_thw
    }
