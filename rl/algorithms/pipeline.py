"""From a batch's rewards to per-token advantages: the one place where an algorithm config's
choices (KL in the reward, estimator, γ/λ, ...) meet. Pure: tensors in, tensors out. `algo` is any
object with the fields of `rl.config.AlgorithmConfig`."""
from __future__ import annotations

from typing import Optional

import torch

from rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, AdvantageParams
from rl.algorithms.kl import kl_reward_penalty
from rl.algorithms.losses import masked_mean


def compute_advantages(algo, rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                       old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                       values: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """Returns (advantages [B, T], returns [B, T] or None, stats)."""
    if algo.advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm.advantage={algo.advantage!r} is unknown; available: "
                         f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    stats: dict = {}
    token_rewards = None
    if algo.kl_in_reward and algo.kl_coef:
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("KL in the reward needs the policy's and the reference's logprobs")
        token_rewards = kl_reward_penalty(old_logprobs, ref_logprobs, mask, algo.kl_coef, algo.kl_estimator)
        stats["kl/reward_penalty"] = float(masked_mean(token_rewards, mask))
    params = AdvantageParams(gamma=algo.gamma, lam=algo.lam, normalize_std=algo.normalize_std,
                             whiten=algo.whiten_advantages)
    adv, returns = ADVANTAGE_ESTIMATORS[algo.advantage](
        AdvantageInputs(rewards=rewards.float(), mask=mask.float(), group_size=group_size,
                        token_rewards=token_rewards, values=values), params)
    stats["advantage/mean"] = float(masked_mean(adv, mask))
    stats["advantage/abs_mean"] = float(masked_mean(adv.abs(), mask))
    if returns is not None:
        stats["critic/returns_mean"] = float(masked_mean(returns, mask))
    return adv, returns, stats
