"""KL estimators between the policy (samples drawn from it) and a reference, per token.

With log-ratio l = logp - ref_logp (samples from the policy):
  k1 = l,  k2 = l^2 / 2,  k3 = exp(-l) - 1 + l  (Schulman's unbiased, non-negative estimator)
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = {
    "k1": lambda l: l,
    "k2": lambda l: 0.5 * l * l,
    "k3": lambda l: torch.expm1(-l) + l,
}


def register_kl_estimator(name: str):
    def wrap(fn):
        KL_ESTIMATORS[name] = fn
        return fn
    return wrap


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; available: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)


def kl_reward_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float,
                      kind: str = "k1") -> torch.Tensor:
    """Per-token rewards -coef·KL_t on policy tokens (KL as a reward penalty, as in RLHF-PPO)."""
    return -coef * kl_estimate(logprobs, ref_logprobs, kind) * mask
