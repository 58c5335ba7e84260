"""Algorithms as pure tensor functions, registered by name (no Ray, DeepSpeed or vLLM here)."""
from rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, group_normalized_advantages, register_advantage
from rl.algorithms.kl import KL_ESTIMATORS, kl_estimate
from rl.algorithms.losses import POLICY_LOSSES, masked_mean, ppo_clip_loss, register_policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "KL_ESTIMATORS",
    "group_normalized_advantages", "ppo_clip_loss", "kl_estimate", "masked_mean",
    "register_advantage", "register_policy_loss",
]
