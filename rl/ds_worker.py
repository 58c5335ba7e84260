"""What the policy learner and the critic share: one DeepSpeed rank (torch.distributed setup, the
DeepSpeed config, model loading, batch sharding and micro-batching, collective sums)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from policies.lora import LoraConfig


@dataclass
class LearnerSettings:
    """One DeepSpeed rank's settings, built from `learner.*` by rl/settings.py (defaults live there)."""
    zero_stage: int
    dtype: str  # float32 on CPU; bfloat16 on GPU
    lr: float
    weight_decay: float
    betas: tuple
    grad_clip: float
    micro_batch_size: int
    mini_batches: int  # optimizer steps per rollout batch
    logprob_chunk_tokens: int
    packing: bool  # micro-batches as one packed row (per-sample boundaries, no padding)
    gradient_checkpointing: bool
    kernels: str  # auto: fused fla kernels for norms/SwiGLU/conv on CUDA when installed; torch: PyTorch ops
    fused_logprobs: bool  # CUDA: LM head -> logprobs in Triton kernels (no fp32 logits; rl/fused_logprobs.py)
    fused_optimizer: bool  # CUDA: torch's fused AdamW (one kernel for all parameters)
    keep_head_logits: bool  # fused logprobs: keep a micro-batch's bf16 logits for backward (no head recompute)
    num_threads: int
    cpus: str | None  # CPU cores for this rank on CPU machines (e.g. "1"); None: no pinning
    seed: int
    ds_extra: dict
    lora: LoraConfig  # policy learner only; rank 0: off
    sync_transport: str  # weight-sync transport to the engines (sync/)
    sync_bucket_mb: float


def ds_config(s: LearnerSettings, world_size: int, grad_accum: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": s.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": s.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": s.zero_stage},
        "bf16": {"enabled": s.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if s.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True})
    for k, v in s.ds_extra.items():
        cfg[k] = v
    return cfg


def register_zero3_external_params(model) -> list[str]:
    """Gated DeltaNet reads `self.conv1d.weight` directly instead of calling `conv1d`, so ZeRO-3's
    per-module hooks never gather it. Register it as an external parameter of the GDN block, so it
    is gathered whenever the block runs (forward and backward). Returns the registered names."""
    from deepspeed.runtime.zero import register_external_parameter

    names = []
    for name, mod in model.named_modules():
        conv = getattr(mod, "conv1d", None)
        if type(mod).__name__.endswith("GatedDeltaNet") and conv is not None:
            register_external_parameter(mod, conv.weight)
            names.append(f"{name}.conv1d.weight")
    return names


def drop_startup_adam_state(optimizer) -> None:
    """DeepSpeed's stage-0 low-precision wrapper (FP16_UnfusedOptimizer, what bf16 on one GPU rank runs)
    creates the Adam state at start-up with one step on zero gradients, which Adam's bias correction counts
    (the first real update would be ~0.74 lr): the state is dropped, the first real step rebuilds it."""
    optimizer.optimizer.state.clear()


def fix_unfused_optimizer(optimizer) -> None:
    """Fixes to DeepSpeed's stage-0 low-precision wrapper: `drop_startup_adam_state` (correctness), and for
    speed: its inf/NaN check before each step reads every gradient's sum on the host (one GPU sync per
    parameter, 320 for Qwen3.5-0.8B): replaced by one check over all gradient norms (same verdict, one sync).
    Its step runs as `lean_unfused_step` (multi-tensor ops, same math) where no model/expert parallelism
    is involved."""
    import types

    drop_startup_adam_state(optimizer)

    def has_overflow_serial(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all())

    optimizer.overflow_checker.has_overflow_serial = types.MethodType(has_overflow_serial, optimizer.overflow_checker)
    params = [p for group in optimizer.fp16_groups for p in group]
    if optimizer.mpu is None and not optimizer.fused_lamb_legacy and not any(getattr(p, "allreduce", True) is False
                                                                             for p in params):  # no MoE params
        optimizer.step = types.MethodType(lean_unfused_step, optimizer)


def lean_unfused_step(self, closure=None):
    """FP16_UnfusedOptimizer.step with multi-tensor ops, same math: one norm over all gradients (the step's
    one GPU sync; inf/NaN skips the step as before), then the fp32 gradient copies, the clip and the copy of
    the updated fp32 weights into the bf16 ones as one foreach call each, where DeepSpeed launches ~2,300
    kernels per step for Qwen3.5-0.8B (a cast, a norm and a scale per parameter)."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    self.overflow = False
    pairs = [(p32, p16) for g32, g16 in zip(self.fp32_groups, self.fp16_groups) for p32, p16 in zip(g32, g16)]
    g16 = [p16.grad for _, p16 in pairs if p16.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g16, 2, dtype=torch.float32))) if g16 else 0.0
    self._global_grad_norm = float(norm)
    if is_invalid_grad_norm(self._global_grad_norm):
        return self._skip_invalid_grad_norm()
    g32 = []
    for p32, p16 in pairs:
        p32.grad = torch.zeros_like(p32) if p16.grad is None else torch.empty_like(p32)
        if p16.grad is not None:
            g32.append(p32.grad)
    torch._foreach_copy_(g32, g16)
    self._update_scale(False)
    combined = self.unscale_and_clip_grads(self._global_grad_norm, apply_scale=False)
    if combined != 1.0:
        torch._foreach_mul_([p32.grad for p32, _ in pairs], 1.0 / combined)
    self.optimizer.step()
    for p32, _ in pairs:
        p32.grad = None
    torch._foreach_copy_([p16.data for _, p16 in pairs], [p32.data for p32, _ in pairs])
    return self.overflow


class DeepSpeedWorker:
    """Base of one DeepSpeed rank. Subclasses build `self.engine` with `_initialize`."""

    def _setup(self, settings: LearnerSettings, rank: int, world_size: int, master_addr: str, master_port: int,
               samples_per_step: int) -> None:
        self.s, self.rank, self.world = settings, rank, world_size
        from rl.algorithms import load_algorithm_plugins

        load_algorithm_plugins()  # plugin policy losses must be registered in this process too
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        if settings.cpus and not torch.cuda.is_available():
            from common.cpus import pin_to_cpus

            pin_to_cpus(settings.cpus)
        torch.set_num_threads(settings.num_threads)
        torch.manual_seed(settings.seed)
        import deepspeed
        import deepspeed.ops

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid an ~80 s JIT build
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", auto_mpi_discovery=False)
        self.device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        if self.cuda and world_size == 1 and settings.dtype == "bfloat16" and settings.zero_stage in (1, 2):
            # one GPU: ZeRO-1/2 partition nothing, but their gradient buckets cost ~0.1 s per step on an
            # H200 (bench/results/learner_gpu_h200.md); DeepSpeed's bf16 optimizer keeps the same fp32
            # master weights and Adam state
            from dataclasses import replace

            if rank == 0:
                print(f"learner: one GPU rank, ZeRO stage {settings.zero_stage} would partition nothing: "
                      "running stage 0 (bf16 optimizer, fp32 master weights)", flush=True)
            self.s = settings = replace(settings, zero_stage=0)
        per_rank = samples_per_step // (world_size * settings.mini_batches)
        self.grad_accum = max(per_rank // settings.micro_batch_size, 1)
        self.ds_cfg = ds_config(settings, world_size, self.grad_accum)

    def _initialize(self, model: torch.nn.Module) -> None:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.cuda and self.s.fused_optimizer else {}
        opt = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=self.s.weight_decay, betas=tuple(self.s.betas), **fused)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_cfg)
        if type(self.engine.optimizer).__name__ == "FP16_UnfusedOptimizer":  # stage 0 in bf16 (one GPU rank)
            fix_unfused_optimizer(self.engine.optimizer)
        if self.world == 1 and self.s.zero_stage == 0:
            # nothing to average over: skip the flatten / all-reduce / copy-back of every gradient per step
            self.engine.enable_backward_allreduce = False

    def _load_causal_lm(self, path: str, plain: bool = False):
        """A transformers causal LM; under ZeRO-3 (unless `plain`) partitioned while it loads."""
        from transformers.integrations import HfDeepSpeedConfig

        from policies.build import auto_model_class
        from policies.checkpoint import check_loading_info

        dtype = torch.bfloat16 if self.s.dtype == "bfloat16" else torch.float32
        zero3 = self.s.zero_stage == 3 and not plain
        keep = HfDeepSpeedConfig(self.ds_cfg) if zero3 else None  # noqa: F841 - alive during from_pretrained
        model, info = auto_model_class(path).from_pretrained(path, dtype=dtype, output_loading_info=True)  # VL: + vision tower
        del keep
        check_loading_info(path, info, model)  # names any weight left at random init (transformers only logs it)
        if zero3:
            register_zero3_external_params(model)
        if plain:
            model.to(self.device).eval().requires_grad_(False)
        elif self.s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    # -- checkpoints (rl/checkpoint.py) ------------------------------------------------------
    def _client_state(self) -> dict:
        return {}

    def _restore_client_state(self, state: dict) -> None:
        pass

    def save_checkpoint(self, folder: str) -> str:
        """DeepSpeed model + optimizer state (each rank writes its own shards; ranks on several
        nodes need a shared filesystem) and this rank's RNG states. All ranks call."""
        from rl.checkpoint import rng_state

        self.engine.save_checkpoint(folder, tag="ds", client_state=self._client_state(), save_latest=False)
        torch.save(rng_state(), os.path.join(folder, f"rng_rank{self.rank}.pt"))
        return folder

    def load_checkpoint(self, folder: str) -> None:
        """Restore what save_checkpoint wrote (the same number of ranks and ZeRO stage). All ranks call."""
        from rl.checkpoint import set_rng_state

        rng_file = os.path.join(folder, f"rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"{rng_file} is missing: the checkpoint in {folder} was saved with fewer ranks; "
                                    "resume with the learner.num_ranks it was saved with")
        path, client = self.engine.load_checkpoint(folder, tag="ds", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}/ds")
        self._restore_client_state(client or {})
        set_rng_state(torch.load(rng_file, weights_only=False))

    # -- batches ---------------------------------------------------------------------------
    def _shard(self, batch: dict) -> dict:
        B = batch["input_ids"].shape[0]
        per = B // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return {k: v[sl] for k, v in batch.items()}

    def _micro(self, batch: dict, size: int):
        """Micro-batches trimmed to their longest sequence. Token-aligned tensors ([B, T-1]) are
        trimmed with input_ids ([B, T])."""
        B, T_full = batch["input_ids"].shape
        for start in range(0, B, size):
            mb = {k: v[start : start + size] for k, v in batch.items()}
            T = int(mb["lengths"].max())
            for k, v in mb.items():
                if v.dim() == 2 and v.shape[1] == T_full:
                    mb[k] = v[:, :T]
                elif v.dim() == 2 and v.shape[1] == T_full - 1:
                    mb[k] = v[:, : T - 1]
            out = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}  # pageable: staged, no sync
            out["lengths_cpu"] = mb["lengths"]  # host copies: packing and counts need no GPU sync
            out["num_policy_tokens"] = float(mb["loss_mask"].sum()) if "loss_mask" in mb else 0.0
            yield out

    def _pad_to(self, x: torch.Tensor, T: int) -> torch.Tensor:
        return torch.nn.functional.pad(x.float().cpu(), (0, T - x.shape[1]))

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return t.tolist()

    def _global_counts(self, part: dict) -> tuple[float, float]:
        """(policy tokens, sequences) of a mini-batch over all ranks, for exact loss aggregation."""
        tokens, seqs = self._allreduce([float(part["loss_mask"].sum()), float(part["loss_mask"].shape[0])])
        return tokens, seqs

    @property
    def loss_scale(self) -> float:
        """DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients
        over ranks; losses aggregated over the whole mini-batch are multiplied back by this."""
        return float(self.grad_accum * self.world)
