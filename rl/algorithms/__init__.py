"""Algorithms as pure tensor functions, registered by name (no Ray, DeepSpeed or vLLM here).

Registries: ADVANTAGE_ESTIMATORS (`register_advantage`), POLICY_LOSSES (`register_policy_loss`),
KL_ESTIMATORS (`register_kl_estimator`). Plugins add entries from a module listed under the
entry-point group `rl.algorithms` (imported at start by `load_algorithm_plugins`).
"""
from rl.algorithms.advantages import (ADVANTAGE_ESTIMATORS, NEEDS_CRITIC, AdvantageInputs, AdvantageParams,
                                      discounted_returns, gae, group_normalized_advantages,
                                      last_token_rewards, leave_one_out_advantages, register_advantage, whiten)
from rl.algorithms.importance import IS_MODES, importance_weights
from rl.algorithms.kl import KL_ESTIMATORS, kl_estimate, kl_reward_penalty, register_kl_estimator
from rl.algorithms.losses import (LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate, gspo, masked_mean, ppo_clip,
                                  ppo_clip_loss, register_policy_loss, value_loss)
from rl.algorithms.objective import policy_objective, value_objective
from rl.algorithms.pipeline import compute_advantages
from rl.algorithms.shaping import groups_with_signal, overlong_penalty

_plugins_loaded = False


def load_algorithm_plugins() -> list[str]:
    """Import every module registered under the entry-point group `rl.algorithms` (once); importing
    it registers its estimators/losses. Returns the entry-point names loaded."""
    global _plugins_loaded
    from importlib.metadata import entry_points

    names = []
    if not _plugins_loaded:
        for ep in entry_points(group="rl.algorithms"):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001
                raise ImportError(f"algorithm plugin {ep.name!r} ({ep.value}) failed to import: {e}") from e
            names.append(ep.name)
        _plugins_loaded = True
    return names


__all__ = [
    "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "KL_ESTIMATORS", "NEEDS_CRITIC", "LOSS_AGGREGATIONS",
    "AdvantageInputs", "AdvantageParams", "group_normalized_advantages", "leave_one_out_advantages",
    "last_token_rewards", "discounted_returns", "gae", "whiten", "ppo_clip", "gspo", "ppo_clip_loss",
    "value_loss", "aggregate", "kl_estimate", "kl_reward_penalty", "masked_mean", "policy_objective",
    "value_objective", "compute_advantages", "overlong_penalty", "groups_with_signal",
    "register_advantage", "register_policy_loss", "register_kl_estimator", "load_algorithm_plugins",
    "IS_MODES", "importance_weights",
]
