"""DeepSpeed learner: one instance per rank (a Ray actor in runs, a plain object in unit tests).

Scores batches (old-policy logprobs, entropy, engine/learner mismatch), applies the policy update
with the configured loss (it does not know how advantages were made), and streams its weights to the
rollout engines in size-capped buckets (gathered per module under ZeRO-3, so no rank ever holds
the whole model for the sync).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from policies.checkpoint import engine_layout, to_checkpoint_names
from rl.algorithms import kl_estimate, policy_objective
from rl.ds_worker import DeepSpeedWorker, LearnerSettings, ds_config, register_zero3_external_params  # noqa: F401
from rl.logprobs import token_logprobs
from policies.vision import model_inputs as vision_inputs
from rl.packing import packed_token_logprobs, supports_packing
from rl.packing import prepare as prepare_packing
from sync import bucket_bytes, get_transport


@dataclass
class AlgoSettings:
    """What the learner needs to know of the algorithm: the policy loss and its terms (built from
    `algorithm.*` by rl/settings.py)."""
    policy_loss: str
    clip_low: float
    clip_high: float
    loss_agg: str
    loss_norm_tokens: float | None
    kl_coef: float  # KL as a loss term (only when the batch carries ref_logprobs)
    kl_estimator: str
    entropy_coef: float


def _out(p, copy: bool):
    return p.data.detach().to("cpu", copy=True) if copy else p.data.detach()


class Learner(DeepSpeedWorker):
    def __init__(self, model_path: str, settings: LearnerSettings, algo: AlgoSettings, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 samples_per_step: int = 64):
        self.algo = algo
        self._setup(settings, rank, world_size, master_addr, master_port, samples_per_step)
        self.model = self._load_causal_lm(model_path)
        self.lora = self._apply_lora(self.model) if settings.lora.rank > 0 else None
        self.packing = settings.packing and self._enable_packing(self.model)
        self.kernels = self._enable_kernels(self.model)
        self._initialize(self.model)
        if self.cuda and settings.fused_logprobs and self.rank == 0:
            from rl.fused_logprobs import fuse_blocker

            probe = torch.empty(1, 1, dtype=torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32,
                                device=self.device)
            why = fuse_blocker(self.engine.module.get_output_embeddings(), probe)
            print("learner.fused_logprobs: " + (f"off ({why})" if why else "on (Triton LM head -> logprobs)"), flush=True)
        self.version = 0
        self.engine_layout = engine_layout(model_path)  # the names engines started from model_path load
        self.transport = get_transport(settings.sync_transport)(self.device, bucket_bytes(settings.sync_bucket_mb))

    def _apply_lora(self, model) -> list[str]:
        """LoRA adapters (policies/lora.py): only they train; the optimizer gets only them."""
        from policies.lora import apply_lora, num_params

        names = apply_lora(model, self.s.lora)
        if self.rank == 0:
            n = num_params(model)
            print(f"learner.lora: rank {self.s.lora.rank} on {len(names)} modules, {n['trainable']:,} trainable of "
                  f"{n['total']:,} parameters", flush=True)
        return names

    def _enable_packing(self, model) -> bool:
        ok, why = supports_packing(model)
        if not ok:
            if self.rank == 0:
                print(f"learner.packing: off for this model ({why}); micro-batches are padded instead", flush=True)
            return False
        prepare_packing(model)
        return True

    def _enable_kernels(self, model) -> dict:
        """`learner.kernels=auto`: fla's fused norms / SwiGLU / packed conv on CUDA (policies/fast_kernels.py)."""
        from policies.fast_kernels import describe, fla_problem, gdn_problem, install_fast_kernels, parse_kernels

        kinds = parse_kernels(self.s.kernels)
        if not self.cuda:
            return {}
        counts = install_fast_kernels(model, kinds)
        if self.rank == 0:
            gdn_why = gdn_problem() if "gdn" in kinds else None
            if gdn_why:
                print(f"learner.kernels: Gated DeltaNet on the PyTorch delta rule (slow): {gdn_why}", flush=True)
            why = fla_problem()
            print(f"learner.kernels: {describe(counts)}" if counts else
                  f"learner.kernels: PyTorch ops ({why or 'learner.kernels=' + self.s.kernels})", flush=True)
        return counts

    def _logprobs(self, model, mb: dict, with_entropy: bool):
        """Token logprobs [b, T-1] (and entropy) of a micro-batch, packed or padded."""
        if self.packing:
            return packed_token_logprobs(model, mb["input_ids"], mb["lengths_cpu"], self.s.logprob_chunk_tokens,
                                         with_entropy, fused=self.s.fused_logprobs, keep_logits=self.s.keep_head_logits)
        return token_logprobs(model, mb["input_ids"], self.s.logprob_chunk_tokens, with_entropy,
                              fused=self.s.fused_logprobs, keep_logits=self.s.keep_head_logits,
                              **vision_inputs(model, mb))  # VL policy: images merged in ({} for text)

    @torch.no_grad()
    def _score(self, model, batch: dict, with_entropy: bool):
        out_lp, out_ent = [], []
        model.eval()
        T = batch["input_ids"].shape[1] - 1
        for mb in self._micro(batch, self.s.micro_batch_size):
            res = self._logprobs(model, mb, with_entropy)
            lp, ent = res if with_entropy else (res, None)
            out_lp.append(self._pad_to(lp, T))
            if with_entropy:
                out_ent.append(self._pad_to(ent, T))
        return torch.cat(out_lp), (torch.cat(out_ent) if with_entropy else None)

    # -- public API ------------------------------------------------------------------------
    def compute_logprobs(self, batch: dict) -> torch.Tensor:
        """Logprobs of this rank's shard (all ranks must call; used by tests and probes)."""
        return self._score(self.engine.module, self._shard(batch), False)[0]

    def score(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Old-policy logprobs of this rank's shard [b, T-1] (the driver concatenates the ranks'
        shards) and batch-wide stats: entropy and the engine/learner mismatch on sampled tokens."""
        local = self._shard(batch)
        old_lp, entropy = self._score(self.engine.module, local, with_entropy=True)
        mask = local["loss_mask"]
        beh = local["behaviour_logprobs"]
        mm_kl = kl_estimate(beh, old_lp, "k3")  # KL(engine || learner), k3 estimate
        absdiff = (beh - old_lp).abs() * mask
        sums = self._allreduce([float((mm_kl * mask).sum()), float(absdiff.sum()), float((entropy * mask).sum()),
                                float(mask.sum())])
        (max_diff,) = self._allreduce([float(absdiff.max()) if absdiff.numel() else 0.0], "max")
        n_tok = max(sums[3], 1.0)
        return old_lp, {"mismatch/kl": sums[0] / n_tok, "mismatch/abs_logprob_diff": sums[1] / n_tok,
                        "mismatch/max_abs_logprob_diff": max_diff, "policy/entropy": sums[2] / n_tok,
                        "train/policy_tokens": sums[3]}

    def train(self, batch: dict) -> dict:
        """One rollout batch (carrying old_logprobs and per-token advantages, optionally ref_logprobs):
        `mini_batches` optimizer steps; each loss is aggregated over its whole mini-batch (all
        micro-batches and ranks), so gradient accumulation does not change the objective."""
        t0 = time.perf_counter()
        local = self._shard(batch)
        if "old_logprobs" not in local:  # on-policy default when the caller did not score the batch
            local["old_logprobs"] = self._score(self.engine.module, local, with_entropy=False)[0]
        a = self.algo
        with_ent = a.entropy_coef > 0
        self.engine.module.train()
        B = local["input_ids"].shape[0]
        mini = B // self.s.mini_batches
        totals: dict[str, float] = {}
        for m in range(self.s.mini_batches):
            part = {k: v[m * mini : (m + 1) * mini] for k, v in local.items()}
            num_tokens, num_seqs = self._global_counts(part)
            for mb in self._micro(part, self.s.micro_batch_size):
                res = self._logprobs(self.engine.module, mb, with_ent)
                lp, ent = res if with_ent else (res, None)
                loss, st = policy_objective(
                    lp.float(), mb["old_logprobs"], mb["advantages"], mb["loss_mask"], policy_loss=a.policy_loss,
                    clip_low=a.clip_low, clip_high=a.clip_high, loss_agg=a.loss_agg, num_tokens=num_tokens,
                    num_seqs=num_seqs, norm_tokens=a.loss_norm_tokens, ref_logprobs=mb.get("ref_logprobs"),
                    kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                    entropy=ent.float() if ent is not None else None, entropy_coef=a.entropy_coef,
                    is_weights=mb.get("is_weights"), tensor_stats=True)
                self.engine.backward(loss * self.loss_scale)
                self.engine.step()
                n = mb["num_policy_tokens"]  # counted on the host: no GPU sync per micro-batch
                totals["loss"] = totals.get("loss", 0.0) + loss.detach()
                for k in ("clip_frac", "kl_ref"):
                    if k in st:  # token-weighted means
                        totals[k] = totals.get(k, 0.0) + st[k] * n
                totals["tokens"] = totals.get("tokens", 0.0) + n
        issued = time.perf_counter() - t0  # host time to queue the step's GPU work (before its one sync)
        totals = {k: float(v) for k, v in totals.items()}  # one sync per step
        keys = sorted(totals)
        summed = dict(zip(keys, self._allreduce([totals[k] for k in keys])))
        self.version += 1
        stats = {"train/loss": summed["loss"] / self.s.mini_batches,
                 "train/clip_frac": summed.get("clip_frac", 0.0) / max(summed["tokens"], 1.0),
                 "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                 "train/lr": self.s.lr, "timing/learner_update_s": time.perf_counter() - t0,
                 "timing/learner_issue_s": issued}
        if "kl_ref" in summed:
            stats["train/kl_ref"] = summed["kl_ref"] / max(summed["tokens"], 1.0)
        return stats

    def iter_hf_weights(self, copy: bool = True, sync: bool = False):
        """(name, tensor) in HF checkpoint names; every rank must iterate (ZeRO-3 gathers are
        collective); tensors are returned on rank 0 only (others yield None). copy=False yields the
        (gathered) parameter itself, valid only until the next item: consume it at once. With LoRA:
        merged weights, and for `sync` only the adapted modules (with their vLLM-fused siblings)."""
        module = self.engine.module
        if self.lora:
            from policies.lora import iter_hf_weights as lora_hf_weights

            yield from lora_hf_weights(module, self._zero3_gather, self.rank == 0, sync_only=sync, copy=copy)
            return
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
                        yield full, (_out(p, copy) if self.rank == 0 else None)
        else:
            for n, p in module.named_parameters():
                yield n, (_out(p, copy) if self.rank == 0 else None)

    def iter_engine_weights(self, complete: bool = False):
        """`iter_hf_weights(copy=False, sync=not complete)` under the names the engines load
        (policies/checkpoint.py): `model.language_model.*` for engines running a multimodal Qwen3.5
        checkpoint. Each tensor is valid only until the next item (the transport copies it)."""
        for name, t in self.iter_hf_weights(copy=False, sync=not complete):
            yield from to_checkpoint_names(name, t, self.engine_layout)

    def _zero3_gather(self, params: list):
        import contextlib

        if self.s.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def connect_engines(self, engines: list) -> bool:
        """Once, on every rank, after the engines are ready: rank 0 sets up the weight-sync transport
        to them (`learner.sync_transport`; broadcast forms its process group, the object store has
        nothing to set up)."""
        if self.rank == 0:
            self.transport.connect(engines)
        return True

    def push_weights(self, engines: list, version: int, interrupt: bool = False, complete: bool = False) -> dict:
        """Send the weights to `engines` through the transport (sync/), in buckets of at most
        `learner.sync_bucket_mb` MiB, then have them load the weights and adopt `version`: once their
        in-flight requests finish, or (interrupt) between two engine steps while those continue on
        the new weights. Every rank calls (ZeRO-3 gathers are collective); rank 0 sends and returns
        the stats, the others {}. Tensors travel in the learner's dtype and vLLM casts them:
        pre-casting fp32 to bf16 would round parameters the engine keeps in fp32 (e.g. GDN's A_log).
        complete: every weight, also those LoRA never changes (for engines holding another run's)."""
        import ray

        t0 = time.perf_counter()
        weights = self.iter_engine_weights(complete)
        if self.rank != 0:
            for _ in weights:  # take part in the gathers
                pass
            return {}
        sent = self.transport.send(weights, engines, version)
        commits = ray.get([e.commit_weights.remote(version, interrupt) for e in engines])
        return {**sent, "sync/engine_load_s": max(c["load_s"] for c in commits),
                "sync/inflight_requests": sum(c["inflight_at_commit"] for c in commits),
                "sync/s": time.perf_counter() - t0}

    def hf_state_dict(self) -> dict:
        return {n: t for n, t in self.iter_hf_weights() if t is not None}

    def save_hf(self, folder: str, tokenizer_path: str | None = None) -> str | None:
        """Export an HF checkpoint folder of the current weights (all ranks call)."""
        sd = self.hf_state_dict()
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cfg = self.engine.module.config
        vl = getattr(cfg, "vision_config", None) is not None  # e.g. Qwen3_5ForConditionalGeneration
        model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if "lm_head" not in k]
        if bad or unexpected:
            raise RuntimeError(f"export: missing {bad} unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer_path:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
            if vl:  # the image processor too
                from policies.build import load_processor

                load_processor(tokenizer_path).save_pretrained(folder)
        return folder

    def get_version(self) -> int:
        return self.version

    def _client_state(self) -> dict:
        return {"version": self.version}

    def _restore_client_state(self, state: dict) -> None:
        self.version = int(state.get("version", self.version))

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
