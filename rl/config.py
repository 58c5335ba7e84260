"""Typed config schema (Hydra structured configs). Every group in `conf/` is validated against these
dataclasses, so an unknown or misspelt key fails at start, before any model loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore

from policies.tiny import TinySpec


@dataclass
class PolicyConfig:
    path: str = "tiny:default"  # HF folder, hub id (Qwen/Qwen3.5-0.8B) or tiny:<name>
    tiny: TinySpec = field(default_factory=TinySpec)  # used when path is tiny:<name>
    engine_dtype: str = "auto"  # auto | bfloat16 | float32


@dataclass
class EnvConfig:
    name: Optional[str] = "copy_digits"  # registered name (entry point group `rl.envs`)
    _target_: Optional[str] = None  # or a dotted class path; wins over `name`
    kwargs: Dict[str, Any] = field(default_factory=dict)
    num_actors: int = 2  # env actors (Ray processes), spread over the cluster's nodes
    envs_per_actor: int = 1024  # live episodes per actor; num_actors × envs_per_actor bounds concurrency
    num_cpus_per_actor: float = 0.1
    placement: str = "SPREAD"  # Ray placement-group strategy for env actors: SPREAD | PACK | STRICT_SPREAD
    step_timeout_s: float = 30.0  # a reset/step taking longer fails its episode (retried on a fresh env)
    call_timeout_s: float = 60.0  # an actor not answering a batch within this (+2×step timeout) is replaced
    max_error_frac: float = 0.5  # abort the run when more episodes than this fail after retries


@dataclass
class RolloutConfig:
    num_engines: int = 1
    engine_num_cpus: float = 1.0
    prompts_per_step: int = 32
    group_size: int = 8
    max_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 1
    max_retries: int = 1
    max_inflight: int = 4096  # episodes live at once (backpressure on env pool and engines)
    engine_backend: str = "auto"  # auto (inproc on CPU, async on GPU) | inproc | async
    max_model_len: int = 512
    kv_cache_memory_mb: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    num_cpus_per_rank: float = 0.5
    zero_stage: int = 2
    dtype: str = "float32"
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    mini_batches: int = 1
    logprob_chunk_tokens: int = 4096
    gradient_checkpointing: bool = False
    num_threads: int = 1
    sync_bucket_mb: float = 64.0
    ds_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage: str = "grpo"
    normalize_std: bool = True
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | console
    project: str = "qrl"
    run_name: Optional[str] = None
    mode: str = "auto"  # auto: online with WANDB_API_KEY, offline otherwise
    progress: bool = True


@dataclass
class RayConfig:
    # null: join the running cluster if there is one (RAY_ADDRESS or `ray start`), else start a local
    # one; "local": always start a local one; "auto" or host:port: join that cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None


@dataclass
class TrainConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    steps: int = 30
    seed: int = 0
    cache_dir: Optional[str] = None  # tiny models are built here (default ~/.cache/qrl)
    run_dir: Optional[str] = None  # default: the Hydra run folder


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    register_plugin_envs(cs)


def register_plugin_envs(cs: ConfigStore) -> None:
    """Make every installed env plugin (entry-point group `rl.envs`) selectable as `env=<name>`,
    unless `conf/env/<name>.yaml` already exists (then that file, with its kwargs, is used)."""
    from importlib.metadata import entry_points
    from importlib.resources import files

    conf_env = files("conf") / "env"
    for ep in entry_points(group="rl.envs"):
        if not (conf_env / f"{ep.name}.yaml").is_file():
            cs.store(group="env", name=ep.name, node={"name": ep.name, "kwargs": {}})


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that name the keys to change."""
    r, l = cfg.rollout, cfg.learner
    B = r.prompts_per_step * r.group_size
    if r.group_size < 2:
        raise ValueError(f"rollout.group_size={r.group_size}: GRPO needs at least 2 samples per prompt")
    per = B // (l.num_ranks * l.mini_batches)
    if B % (l.num_ranks * l.mini_batches) or per % min(l.micro_batch_size, per):
        raise ValueError(
            f"rollout.prompts_per_step*group_size={B} samples must split evenly over learner.num_ranks="
            f"{l.num_ranks} x learner.mini_batches={l.mini_batches} and then into micro-batches of "
            f"learner.micro_batch_size={l.micro_batch_size}; change one of them"
        )
    if l.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"learner.zero_stage={l.zero_stage}; use 0, 1, 2 or 3")
    from rl.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES

    a = cfg.algorithm
    for key, val, reg in [("algorithm.advantage", a.advantage, ADVANTAGE_ESTIMATORS),
                          ("algorithm.policy_loss", a.policy_loss, POLICY_LOSSES),
                          ("algorithm.kl_estimator", a.kl_estimator, KL_ESTIMATORS)]:
        if val not in reg:
            raise ValueError(f"{key}={val!r} is unknown; available: {', '.join(sorted(reg))}")
    if cfg.ray.temp_dir and len(str(cfg.ray.temp_dir)) > 50:
        raise ValueError(
            f"ray.temp_dir={cfg.ray.temp_dir!r} is {len(str(cfg.ray.temp_dir))} characters; Ray's socket "
            "paths under it must stay below 107 bytes, so use a shorter folder (at most 50 characters)"
        )
    if cfg.logger.backend not in ("wandb", "console"):
        raise ValueError(f"logger.backend={cfg.logger.backend!r}; use wandb or console")
