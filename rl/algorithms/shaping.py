"""Reward shaping and sample selection before advantages: DAPO's overlong penalty and dynamic
sampling (keep only groups whose rewards differ)."""
from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: float, buffer: float, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to (max_len - buffer) tokens, then
    falling linearly to -penalty at max_len (and staying there beyond)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0)
    return -penalty * torch.clamp(over / buffer, max=1.0)


def groups_with_signal(rewards: torch.Tensor, group_size: int, tol: float = 1e-8) -> torch.Tensor:
    """[n_groups] bool: True where the group's rewards are not all equal (such a group gives a
    non-zero group-relative advantage; DAPO's dynamic sampling keeps only these)."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > tol
