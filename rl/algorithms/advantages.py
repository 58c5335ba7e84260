"""Advantage estimators: rewards [num_samples] (grouped contiguously) -> per-sample advantages."""
from __future__ import annotations

from typing import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return wrap


@register_advantage("grpo")
def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: (r - mean_group) / (std_group + eps); samples of one prompt are contiguous.

    std is the unbiased sample std (as in the GRPO paper / OpenRLHF); a group whose rewards are all
    equal gets zero advantage.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)
