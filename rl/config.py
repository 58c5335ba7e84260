"""Typed config schema (Hydra structured configs). Every group in `conf/` is validated against these
dataclasses, so an unknown or misspelt key fails at start, before any model loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from policies.lora import LoraConfig
from policies.presets import ModelShape
from policies.tiny import TinySpec


@dataclass
class PolicyConfig:
    path: str = "tiny:default"  # HF folder, hub id (Qwen/Qwen3.5-0.8B) or tiny:<name>
    tiny: TinySpec = field(default_factory=TinySpec)  # used when path is tiny:<name>
    engine_dtype: str = "auto"  # auto | bfloat16 | float32
    # qwen3_5_* presets: the published architecture; a local checkpoint that differs fails at start (null: no check)
    shape: Optional[ModelShape] = None


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
    max_engine_restarts: int = 3  # vLLM engine actors that die are restarted (and resynced) this often per run
    max_inflight: int = 4096  # episodes live at once (backpressure on env pool and engines)
    engine_backend: str = "auto"  # auto (inproc on CPU, async on GPU) | inproc | async
    engine_cpus: Optional[str] = None  # CPU machines: pin the engine to these cores, e.g. "0" (null: vLLM's default)
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
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    mini_batches: int = 1
    logprob_chunk_tokens: int = 4096
    # pack each micro-batch into one row with per-sample boundaries (Gated DeltaNet state reset per
    # sample, block-diagonal attention): no compute on padding; off: right-padded micro-batches
    packing: bool = True
    gradient_checkpointing: bool = False
    # GPU speed (no effect on CPU): fla's fused norm/SwiGLU/conv kernels (auto | torch), the LM head's
    # logprobs in Triton kernels without fp32 logits, torch's fused AdamW (docs/gpu.md)
    kernels: str = "auto"
    fused_logprobs: bool = True
    fused_optimizer: bool = True
    # fused logprobs keep a micro-batch's bf16 logits for backward instead of recomputing the LM head:
    # tokens x vocab x 2 bytes more memory (15 GiB at 32K tokens for the 248K vocab), one matmul less
    keep_head_logits: bool = False
    num_threads: int = 1
    cpus: Optional[str] = None  # CPU machines: pin each learner rank to these cores, e.g. "1" (null: no pinning)
    sync_bucket_mb: float = 64.0
    # object_store: buckets through Ray's shared-memory object store (at most 2 in flight);
    # broadcast: a process group of learner rank 0 and the engine workers (gloo on CPU, NCCL on GPU)
    sync_transport: str = "object_store"
    ds_extra: Dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train LoRA adapters only (policies/lora.py)


@dataclass
class CriticConfig:
    """PPO's value model: its own DeepSpeed learner actor(s) (as many ranks as the policy learner)."""
    path: Optional[str] = None  # null: initialise the backbone from the policy; or an HF causal-LM folder
    lr: float = 5e-3
    warmup_steps: int = 0  # first steps train only the critic (the policy is not updated)
    value_clip: Optional[float] = 0.2  # clip V around the rollout-time value (null: no clipping)
    num_cpus_per_rank: float = 0.2


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae | a plugin's name
    normalize_std: bool = True  # grpo: divide by the group's reward std (false = Dr. GRPO)
    gamma: float = 1.0  # discount over policy tokens (reward-to-go, GAE)
    lam: float = 1.0  # GAE lambda
    whiten_advantages: bool = False  # gae: normalise advantages over the batch
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo | a plugin's name
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO's clip-higher: clip_high > clip_low
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    loss_norm_tokens: Optional[int] = None  # seq-mean-token-sum-norm's constant (null: max_tokens * max_turns)
    kl_coef: float = 0.0  # 0: no reference policy is loaded at all
    ref_num_cpus: float = 0.1  # Ray CPUs of the reference-policy actor
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_in_reward: bool = False  # true: -kl_coef*KL per token enters the rewards; false: a loss term
    entropy_coef: float = 0.0  # entropy bonus (loss -= entropy_coef * entropy)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill the batch
    max_sample_rounds: int = 3  # rollout rounds per step for dynamic sampling (then pad with dropped groups)
    overlong_buffer_frac: float = 0.0  # DAPO soft overlong penalty over the last frac of the max length
    overlong_penalty: float = 1.0  # reward at the max length (-overlong_penalty), linear inside the buffer
    mask_truncated: bool = False  # exclude truncated responses (hit max_tokens / context) from the loss
    # Off-policy correction between the engine's sampling logprobs and the learner's old policy
    # (stale samples in async modes; bf16 engine vs fp32 learner numerics): none | tis | mis
    is_correction: str = "tis"
    is_cap: float = 2.0  # tis: weights truncated at is_cap; mis: tokens above it leave the loss
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class TrainerConfig:
    # sync: rollout -> update -> sync. one_step_off: step k+1's rollout (on version k) overlaps step
    # k's update. async: rollouts stream continuously; weights land mid-flight (partial rollouts).
    mode: str = "sync"
    max_staleness: int = 1  # async: a sample's oldest token may be at most this many versions old
    stale_policy: str = "drop"  # async: drop older groups, or "correct" (keep; IS re-weights them)
    wait_timeout_s: float = 600.0  # async: no finished group for this long stops the run


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | console
    project: str = "qrl"
    run_name: Optional[str] = None
    mode: str = "auto"  # auto: online with WANDB_API_KEY, offline otherwise
    progress: bool = True
    # every N steps (0: never) a few rollouts go to <run>/samples.jsonl and to a W&B table "rollouts"
    samples_every: int = 10
    samples_per_step: int = 8


@dataclass
class CheckpointConfig:
    """<run>/checkpoints/step_XXXXXX (rl/checkpoint.py): learner (+critic) DeepSpeed state, RNGs, env
    seed position, policy version, and the policy as an HF folder; `resume=<run folder>` continues."""
    every: int = 50  # steps between checkpoints (0: only at the end and on Ctrl-C / SIGTERM)
    keep_last: int = 2  # older complete checkpoints are deleted (0: keep all)
    at_end: bool = True  # also after the last step (so `resume=<run> steps=<more>` extends a run)
    on_interrupt: bool = True  # Ctrl-C / SIGTERM: finish the current step, save, stop
    hf: bool = True  # include hf/, the policy as an HF checkpoint folder (for rl.eval / vLLM)


@dataclass
class EvalConfig:
    """Evaluation on held-out env seeds (rl/eval.py): during training, and `python -m rl.eval`."""
    every: int = 10  # after steps 0, every, 2*every, ... (0: off); engines hold the just-synced policy
    at_end: bool = True  # also after the last step (when every > 0)
    num_prompts: int = 64  # held-out seeds seed_start .. seed_start + num_prompts - 1, the same at every eval
    samples_per_prompt: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: Optional[int] = None  # per turn; null: rollout.max_tokens
    max_turns: Optional[int] = None  # null: rollout.max_turns
    # Independent of `seed`, so every run (and rl.eval) is scored on the same prompts; must lie outside
    # the run's training seeds (seed * 1_000_003 + n, n < 1_000_003)
    seed_start: int = 2_000_000_000


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    steps: int = 30
    seed: int = 0
    cache_dir: Optional[str] = None  # tiny models are built here (default ~/.cache/qrl)
    run_dir: Optional[str] = None  # default: the Hydra run folder
    export_final: bool = True  # at the end of a run: an HF checkpoint folder <run_dir>/final (+ tokenizer)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # continue a run: its folder (newest complete checkpoint), a checkpoints/step_XXXXXX folder, or
    # `latest` (newest under outputs/); the run's own overrides are re-applied, new ones win
    resume: Optional[str] = None


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


GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")  # baselines from the prompt's group


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that name the keys to change."""
    r, l = cfg.rollout, cfg.learner
    B = r.prompts_per_step * r.group_size
    if r.group_size < 2 and (cfg.algorithm.advantage in GROUP_ESTIMATORS or cfg.algorithm.dynamic_sampling):
        raise ValueError(f"rollout.group_size={r.group_size}: algorithm.advantage={cfg.algorithm.advantage!r} "
                         "compares samples of the same prompt, so it needs at least 2 samples per prompt")
    per = B // (l.num_ranks * l.mini_batches)
    if B % (l.num_ranks * l.mini_batches) or per % min(l.micro_batch_size, per):
        raise ValueError(
            f"rollout.prompts_per_step*group_size={B} samples must split evenly over learner.num_ranks="
            f"{l.num_ranks} x learner.mini_batches={l.mini_batches} and then into micro-batches of "
            f"learner.micro_batch_size={l.micro_batch_size}; change one of them"
        )
    if l.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"learner.zero_stage={l.zero_stage}; use 0, 1, 2 or 3")
    if l.lora.rank < 0 or l.lora.alpha <= 0 or not 0 <= l.lora.dropout < 1:
        raise ValueError(f"learner.lora: rank={l.lora.rank} alpha={l.lora.alpha} dropout={l.lora.dropout}; use rank >= 0 "
                         "(0: off), alpha > 0, 0 <= dropout < 1")
    from policies.fast_kernels import parse_kernels

    parse_kernels(l.kernels)  # raises naming the bad value and the choices
    validate_algorithm(cfg)
    validate_eval(cfg)
    t = cfg.trainer
    from sync import bucket_bytes, get_transport

    get_transport(cfg.learner.sync_transport)  # raises naming the bad value and the choices
    bucket_bytes(cfg.learner.sync_bucket_mb)
    if r.max_engine_restarts < 0:
        raise ValueError(f"rollout.max_engine_restarts={r.max_engine_restarts}; use >= 0 (0: an engine death stops the run)")
    from rl.schedules import SCHEDULES

    if t.mode not in SCHEDULES:
        raise ValueError(f"trainer.mode={t.mode!r}; use {', '.join(SCHEDULES)}")
    if t.max_staleness < 0:
        raise ValueError(f"trainer.max_staleness={t.max_staleness}; use >= 0")
    if t.stale_policy not in ("drop", "correct"):
        raise ValueError(f"trainer.stale_policy={t.stale_policy!r}; use drop or correct")
    if t.stale_policy == "correct" and cfg.algorithm.is_correction == "none":
        raise ValueError("trainer.stale_policy=correct keeps stale samples for importance-sampling correction, "
                         "but algorithm.is_correction=none; set it to tis or mis")
    if cfg.ray.temp_dir and len(str(cfg.ray.temp_dir)) > 50:
        raise ValueError(
            f"ray.temp_dir={cfg.ray.temp_dir!r} is {len(str(cfg.ray.temp_dir))} characters; Ray's socket "
            "paths under it must stay below 107 bytes, so use a shorter folder (at most 50 characters)"
        )
    c = cfg.checkpoint
    if c.every < 0 or c.keep_last < 0:
        raise ValueError(f"checkpoint.every={c.every} / checkpoint.keep_last={c.keep_last}: use >= 0 (0: off / keep all)")
    if cfg.logger.backend not in ("wandb", "console"):
        raise ValueError(f"logger.backend={cfg.logger.backend!r}; use wandb or console")


TRAIN_SEED_BLOCK = 1_000_003  # the training env seeds of `seed` are seed * TRAIN_SEED_BLOCK + n (rl/batches.py)


def validate_eval(cfg: TrainConfig) -> None:
    e = cfg.eval
    checks = [
        (e.every < 0, f"eval.every={e.every}: use >= 0 (0: no evaluation during training)"),
        (e.num_prompts < 1 or e.samples_per_prompt < 1, f"eval.num_prompts={e.num_prompts} / eval.samples_per_prompt="
         f"{e.samples_per_prompt}: use >= 1 each"),
        (e.temperature < 0, f"eval.temperature={e.temperature}: use >= 0 (0: greedy)"),
        (not 0 < e.top_p <= 1, f"eval.top_p={e.top_p}: use a value in (0, 1]"),
        (e.max_tokens is not None and e.max_tokens < 1, f"eval.max_tokens={e.max_tokens}: use >= 1 (null: rollout.max_tokens)"),
        (e.max_turns is not None and e.max_turns < 1, f"eval.max_turns={e.max_turns}: use >= 1 (null: rollout.max_turns)"),
        (e.seed_start < 0, f"eval.seed_start={e.seed_start}: env seeds must be >= 0"),
    ]
    for bad, msg in checks:
        if bad:
            raise ValueError(msg)
    lo, hi = cfg.seed * TRAIN_SEED_BLOCK, (cfg.seed + 1) * TRAIN_SEED_BLOCK
    if e.seed_start < hi and lo < e.seed_start + e.num_prompts:
        raise ValueError(f"eval.seed_start={e.seed_start} with eval.num_prompts={e.num_prompts} overlaps the training "
                         f"env seeds of seed={cfg.seed} ({lo}..{hi - 1}); held-out seeds must not be trained on: "
                         "change eval.seed_start (or seed)")


def validate_algorithm(cfg: TrainConfig) -> None:
    from rl.algorithms import (ADVANTAGE_ESTIMATORS, IS_MODES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES,
                               load_algorithm_plugins)

    load_algorithm_plugins()
    a = cfg.algorithm
    for key, val, reg in [("algorithm.advantage", a.advantage, ADVANTAGE_ESTIMATORS),
                          ("algorithm.policy_loss", a.policy_loss, POLICY_LOSSES),
                          ("algorithm.kl_estimator", a.kl_estimator, KL_ESTIMATORS),
                          ("algorithm.loss_agg", a.loss_agg, LOSS_AGGREGATIONS),
                          ("algorithm.is_correction", a.is_correction, IS_MODES)]:
        if val not in reg:
            raise ValueError(f"{key}={val!r} is unknown; available: {', '.join(sorted(reg))}")
    checks = [
        (a.clip_low < 0 or a.clip_high < 0 or a.clip_low >= 1, f"algorithm.clip_low={a.clip_low} / clip_high="
         f"{a.clip_high}: use 0 <= clip_low < 1 and clip_high >= 0"),
        (not 0 <= a.gamma <= 1 or not 0 <= a.lam <= 1, f"algorithm.gamma={a.gamma} / lam={a.lam}: use values in [0, 1]"),
        (a.kl_coef < 0, f"algorithm.kl_coef={a.kl_coef}: use >= 0 (0 disables the reference policy)"),
        (a.is_cap <= 1.0, f"algorithm.is_cap={a.is_cap}: use a value > 1"),
        (a.max_sample_rounds < 1, f"algorithm.max_sample_rounds={a.max_sample_rounds}: use >= 1"),
        (not 0 <= a.overlong_buffer_frac < 1, f"algorithm.overlong_buffer_frac={a.overlong_buffer_frac}: use [0, 1)"),
        (a.critic.warmup_steps < 0, f"algorithm.critic.warmup_steps={a.critic.warmup_steps}: use >= 0"),
    ]
    for bad, msg in checks:
        if bad:
            raise ValueError(msg)
