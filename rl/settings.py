"""The one place where runtime settings objects are built from the config schema (rl/config.py).

Runtime classes (LearnerSettings, AlgoSettings, RolloutSettings, EngineConfig, EnvPool) declare no
defaults of their own: every default lives in the schema, so the two cannot drift apart
(tests/test_settings.py checks it). Each builder takes a TrainConfig (default: the schema's
defaults) and keyword overrides of the runtime object's fields, which is how tests and benchmarks
make the variants they need.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rl.config import EnvConfig, TrainConfig

if TYPE_CHECKING:
    from rl.ds_worker import LearnerSettings
    from rl.learner import AlgoSettings
    from rollout.engine import EngineConfig
    from rollout.env_pool import EnvPool
    from rollout.episodes import RolloutSettings


def _cfg(cfg: TrainConfig | None) -> TrainConfig:
    return TrainConfig() if cfg is None else cfg


def learner_settings(cfg: TrainConfig | None = None, **overrides) -> "LearnerSettings":
    """One policy-learner rank (also the critic's base, see critic_settings)."""
    from rl.ds_worker import LearnerSettings

    cfg = _cfg(cfg)
    l = cfg.learner
    fields = dict(zero_stage=l.zero_stage, dtype=l.dtype, lr=l.lr, weight_decay=l.weight_decay, betas=tuple(l.betas),
                  grad_clip=l.grad_clip, micro_batch_size=l.micro_batch_size, mini_batches=l.mini_batches,
                  logprob_chunk_tokens=l.logprob_chunk_tokens, packing=l.packing,
                  gradient_checkpointing=l.gradient_checkpointing, kernels=l.kernels, fused_logprobs=l.fused_logprobs,
                  fused_optimizer=l.fused_optimizer, keep_head_logits=l.keep_head_logits, num_threads=l.num_threads,
                  cpus=l.cpus, seed=cfg.seed, ds_extra=dict(l.ds_extra), lora=l.lora,
                  sync_transport=l.sync_transport, sync_bucket_mb=l.sync_bucket_mb)
    return LearnerSettings(**{**fields, **overrides})


def critic_settings(cfg: TrainConfig | None = None, **overrides) -> "LearnerSettings":
    """PPO's value model: the learner's settings with the critic's learning rate and its own seed."""
    cfg = _cfg(cfg)
    return learner_settings(cfg, **{"lr": cfg.algorithm.critic.lr, "seed": cfg.seed + 1, **overrides})


def loss_norm_tokens(cfg: TrainConfig) -> float:
    """seq-mean-token-sum-norm's constant: algorithm.loss_norm_tokens, else the longest response."""
    a, r = cfg.algorithm, cfg.rollout
    return float(a.loss_norm_tokens or r.max_tokens * r.max_turns)


def algo_settings(cfg: TrainConfig | None = None, **overrides) -> "AlgoSettings":
    from rl.learner import AlgoSettings

    cfg = _cfg(cfg)
    a = cfg.algorithm
    fields = dict(policy_loss=a.policy_loss, clip_low=a.clip_low, clip_high=a.clip_high, loss_agg=a.loss_agg,
                  loss_norm_tokens=loss_norm_tokens(cfg), kl_coef=0.0 if a.kl_in_reward else a.kl_coef,
                  kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef)
    return AlgoSettings(**{**fields, **overrides})


def rollout_settings(cfg: TrainConfig | None = None, **overrides) -> "RolloutSettings":
    from rollout.episodes import RolloutSettings

    r = _cfg(cfg).rollout
    fields = dict(group_size=r.group_size, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                  max_turns=r.max_turns, max_context=r.max_model_len, max_retries=r.max_retries,
                  max_inflight=r.max_inflight)
    return RolloutSettings(**{**fields, **overrides})


def eval_rollout_settings(cfg: TrainConfig) -> "RolloutSettings":
    """Evaluation episodes: eval.* where set, else the rollout's own settings."""
    e, r = cfg.eval, cfg.rollout
    return rollout_settings(cfg, group_size=e.samples_per_prompt, max_tokens=e.max_tokens or r.max_tokens,
                            temperature=e.temperature, top_p=e.top_p, max_turns=e.max_turns or r.max_turns)


def engine_config(cfg: TrainConfig | None = None, model: str | None = None, index: int = 0,
                  **overrides) -> "EngineConfig":
    """Engine `index` serving `model` (default: policy.path) under cfg.rollout / cfg.policy."""
    from rollout.engine import EngineConfig

    cfg = _cfg(cfg)
    r = cfg.rollout
    fields = dict(model=model or cfg.policy.path, dtype=cfg.policy.engine_dtype, seed=cfg.seed + index,
                  max_model_len=r.max_model_len, kv_cache_memory_mb=r.kv_cache_memory_mb,
                  enforce_eager=r.enforce_eager, enable_prefix_caching=r.enable_prefix_caching,
                  backend=r.engine_backend, cpus=r.engine_cpus, extra=dict(r.extra))
    return EngineConfig(**{**fields, **overrides})


def env_pool(env: EnvConfig | None = None, **options) -> "EnvPool":
    """The env pool of an `env` config section; `options` go to EnvPool as they are (e.g.
    actor_options, max_inflight_calls)."""
    from rollout.env_pool import EnvPool

    e = EnvConfig() if env is None else env
    return EnvPool(e.name, e._target_, e.kwargs, num_actors=e.num_actors, envs_per_actor=e.envs_per_actor,
                   num_cpus_per_actor=e.num_cpus_per_actor, step_timeout_s=e.step_timeout_s,
                   call_timeout_s=e.call_timeout_s, placement=e.placement, **options)

