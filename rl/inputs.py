"""A run's inputs, checked before Ray or any model starts: the env (importable, accepts its
kwargs), the policy and critic folders, the preset's shape, the tokenizer, LoRA targets. Each bad
input fails here with a message naming it and the fix."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rl.algorithms import NEEDS_CRITIC
from rl.config import TrainConfig


@dataclass
class RunInputs:
    policy_path: str  # a local HF folder (tiny:<name> built, hub ids resolved)
    tokenizer: Any
    processor: Any  # vision-language policies only (else None)


def check_inputs(cfg: TrainConfig) -> RunInputs:
    from envs.registry import make_env, resolve_env_class
    from policies.build import load_processor, load_tokenizer, resolve_policy_path
    from policies.presets import check_checkpoint_shape

    resolve_env_class(cfg.env.name, cfg.env._target_)
    probe = make_env(cfg.env.name, cfg.env._target_, cfg.env.kwargs)  # bad env.kwargs / missing files
    getattr(probe, "close", lambda: None)()
    policy_path = resolve_policy_path(cfg.policy.path, asdict(cfg.policy.tiny), cfg.cache_dir)
    if cfg.algorithm.critic.path and cfg.algorithm.advantage in NEEDS_CRITIC:
        resolve_policy_path(cfg.algorithm.critic.path, {}, cfg.cache_dir, key="algorithm.critic.path")
    check_checkpoint_shape(policy_path, cfg.policy.shape)  # qwen3_5_* presets vs the folder's config.json
    tokenizer = load_tokenizer(policy_path)
    processor = load_processor(policy_path)
    if cfg.learner.lora.rank > 0:  # bad learner.lora.target_modules fail here, not in a Ray actor
        from policies.lora import check_targets

        check_targets(policy_path, cfg.learner.lora.target_modules)
    return RunInputs(policy_path, tokenizer, processor)
