"""DeepSpeed learner: one instance per rank (a Ray actor in runs, a plain object in unit tests).

Computes old/ref logprobs, applies the policy-gradient update, and streams its weights to the
rollout engines in size-capped buckets (gathered per module under ZeRO-3, so no rank ever holds
the whole model for the sync).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from rl.algorithms import POLICY_LOSSES, kl_estimate, masked_mean
from rl.logprobs import token_logprobs


@dataclass
class LearnerSettings:
    zero_stage: int = 2
    dtype: str = "float32"  # float32 on CPU; bfloat16 on GPU
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    mini_batches: int = 1  # optimizer steps per rollout batch
    logprob_chunk_tokens: int = 4096
    gradient_checkpointing: bool = False
    num_threads: int = 1
    seed: int = 0
    ds_extra: dict = field(default_factory=dict)


@dataclass
class AlgoSettings:
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


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


class Learner:
    def __init__(self, model_path: str, settings: LearnerSettings, algo: AlgoSettings, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 samples_per_step: int = 64):
        self.s, self.algo, self.rank, self.world = settings, algo, rank, world_size
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
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

        per_rank = samples_per_step // (world_size * settings.mini_batches)
        self.grad_accum = max(per_rank // settings.micro_batch_size, 1)
        self.ds_cfg = ds_config(settings, world_size, self.grad_accum)
        self.model = self._load_model(model_path, trainable=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.betas))
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=opt, config=self.ds_cfg)
        self.ref = None
        if algo.kl_coef > 0:
            self.ref = self._load_model(model_path, trainable=False, plain=True)
        self.version = 0

    def _load_model(self, path: str, trainable: bool, plain: bool = False):
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        dtype = torch.bfloat16 if self.s.dtype == "bfloat16" else torch.float32
        keep = None
        if self.s.zero_stage == 3 and not plain:
            keep = HfDeepSpeedConfig(self.ds_cfg)  # noqa: F841 - must stay alive during from_pretrained
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        del keep
        if self.s.zero_stage == 3 and not plain:
            register_zero3_external_params(model)
        if plain:
            model.to(self.device).eval().requires_grad_(False)
        elif self.s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    # -- helpers ---------------------------------------------------------------------------
    def _shard(self, batch: dict) -> dict:
        B = batch["input_ids"].shape[0]
        per = B // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return {k: v[sl] for k, v in batch.items()}

    def _micro(self, batch: dict, size: int):
        B = batch["input_ids"].shape[0]
        for start in range(0, B, size):
            mb = {k: v[start : start + size] for k, v in batch.items()}
            T = int(mb["lengths"].max())
            for k in ("input_ids",):
                mb[k] = mb[k][:, :T]
            for k in ("loss_mask", "behaviour_logprobs", "versions", "old_logprobs", "ref_logprobs"):
                if k in mb:
                    mb[k] = mb[k][:, : T - 1]
            yield {k: v.to(self.device) for k, v in mb.items()}

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return t.tolist()

    @torch.no_grad()
    def _score(self, model, batch: dict, with_entropy: bool):
        out_lp, out_ent = [], []
        model.eval()
        for mb in self._micro(batch, self.s.micro_batch_size):
            res = token_logprobs(model, mb["input_ids"], self.s.logprob_chunk_tokens, with_entropy)
            lp, ent = res if with_entropy else (res, None)
            T = batch["input_ids"].shape[1] - 1
            out_lp.append(torch.nn.functional.pad(lp.float().cpu(), (0, T - lp.shape[1])))
            if with_entropy:
                out_ent.append(torch.nn.functional.pad(ent.float().cpu(), (0, T - ent.shape[1])))
        return torch.cat(out_lp), (torch.cat(out_ent) if with_entropy else None)

    # -- public API ------------------------------------------------------------------------
    def compute_logprobs(self, batch: dict) -> torch.Tensor:
        """Logprobs of this rank's shard (all ranks must call; used by tests and probes)."""
        return self._score(self.engine.module, self._shard(batch), False)[0]

    def train(self, batch: dict) -> dict:
        """One rollout batch: old/ref logprobs, mismatch stats, `mini_batches` optimizer steps."""
        t0 = time.perf_counter()
        local = self._shard(batch)
        old_lp, entropy = self._score(self.engine.module, local, with_entropy=True)
        local["old_logprobs"] = old_lp
        mask = local["loss_mask"]
        if self.ref is not None:
            local["ref_logprobs"] = self._score(self.ref, local, False)[0]
        # engine vs learner on the same sampled tokens: KL(engine || learner), k3 estimate
        beh = local["behaviour_logprobs"]
        mm_kl = kl_estimate(beh, old_lp, "k3")
        absdiff = (beh - old_lp).abs() * mask
        sums = self._allreduce([float((mm_kl * mask).sum()), float(absdiff.sum()), float((entropy * mask).sum()),
                                float(mask.sum())])
        (max_diff,) = self._allreduce([float(absdiff.max()) if absdiff.numel() else 0.0], "max")
        n_tok = max(sums[3], 1.0)
        stats = {"mismatch/kl": sums[0] / n_tok, "mismatch/abs_logprob_diff": sums[1] / n_tok,
                 "mismatch/max_abs_logprob_diff": max_diff, "policy/entropy": sums[2] / n_tok,
                 "train/policy_tokens": sums[3]}
        score_s = time.perf_counter() - t0

        loss_fn = POLICY_LOSSES[self.algo.policy_loss]
        self.engine.module.train()
        B = local["input_ids"].shape[0]
        mini = B // self.s.mini_batches
        losses, clip_fracs, kls = [], [], []
        for m in range(self.s.mini_batches):
            part = {k: v[m * mini : (m + 1) * mini] for k, v in local.items()}
            for mb in self._micro(part, self.s.micro_batch_size):
                lp = token_logprobs(self.engine.module, mb["input_ids"], self.s.logprob_chunk_tokens)
                loss, st = loss_fn(lp.float(), mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
                                   clip_low=self.algo.clip_low, clip_high=self.algo.clip_high)
                if self.ref is not None:
                    kl = masked_mean(kl_estimate(lp.float(), mb["ref_logprobs"], self.algo.kl_estimator), mb["loss_mask"])
                    loss = loss + self.algo.kl_coef * kl
                    kls.append(kl.item())
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.item())
                clip_fracs.append(st["clip_frac"])
        self.version += 1
        stats.update({
            "train/loss": sum(losses) / len(losses), "train/clip_frac": sum(clip_fracs) / len(clip_fracs),
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "train/lr": self.s.lr, "timing/score_s": score_s,
        })
        if kls:
            stats["train/kl_ref"] = sum(kls) / len(kls)
        return stats

    def iter_hf_weights(self):
        """(name, tensor) in HF checkpoint names; every rank must iterate (ZeRO-3 gathers are
        collective); tensors are returned on rank 0 only (others yield None)."""
        module = self.engine.module
        if self.s.zero_stage == 3:
            import deepspeed

            seen = set()
            for mod_name, mod in module.named_modules():
                params = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
                if not params:
                    continue
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                    for n, p in params:
                        seen.add(id(p))
                        full = f"{mod_name}.{n}" if mod_name else n
                        yield full, (p.data.detach().to("cpu", copy=True) if self.rank == 0 else None)
        else:
            for n, p in module.named_parameters():
                yield n, (p.data.detach().to("cpu", copy=True) if self.rank == 0 else None)

    def push_weights(self, engines: list, version: int, bucket_mb: float = 64.0) -> dict:
        """Stream weights to every engine in buckets of at most `bucket_mb` MiB, then commit.
        Tensors travel in the learner's dtype and vLLM casts them: pre-casting fp32 to bf16 would
        round parameters the engine keeps in fp32 (e.g. GDN's A_log)."""
        import ray

        t0 = time.perf_counter()
        cap = int(bucket_mb * (1 << 20))
        bucket, size, refs, n_buckets, total = [], 0, [], 0, 0

        def flush():
            nonlocal bucket, size, n_buckets
            if bucket:
                ref = ray.put(bucket)
                refs.extend(e.receive_bucket.remote(ref, version) for e in engines)
                n_buckets += 1
            bucket, size = [], 0

        for name, t in self.iter_hf_weights():
            if self.rank != 0:
                continue
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap:
                flush()
            bucket.append((name, t))
            size += nbytes
            total += nbytes
        if self.rank != 0:
            return {}
        flush()
        ray.get(refs)
        commits = ray.get([e.commit_weights.remote(version) for e in engines])
        return {"sync/bytes": total, "sync/buckets": n_buckets, "sync/engine_load_s": max(c["load_s"] for c in commits),
                "sync/s": time.perf_counter() - t0}

    def hf_state_dict(self) -> dict:
        return {n: t for n, t in self.iter_hf_weights() if t is not None}

    def save_hf(self, folder: str, tokenizer_path: str | None = None) -> str | None:
        """Export an HF checkpoint folder of the current weights (all ranks call)."""
        sd = self.hf_state_dict()
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM

        cfg = self.engine.module.config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if "lm_head" not in k]
        if bad or unexpected:
            raise RuntimeError(f"export: missing {bad} unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer_path:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
        return folder

    def get_version(self) -> int:
        return self.version

    def set_weights(self, named: dict) -> None:
        """Overwrite weights (ZeRO-2 / stage 0-1 only); used by tests to perturb the policy."""
        if self.s.zero_stage == 3:
            raise NotImplementedError("set_weights is only supported below ZeRO-3")
        with torch.no_grad():
            for n, p in self.engine.module.named_parameters():
                if n in named:
                    p.copy_(named[n].to(p.dtype))
        opt = self.engine.optimizer
        if hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()
