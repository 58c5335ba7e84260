"""PPO's critic: a value model (the policy's decoder + a scalar head) on its own DeepSpeed rank(s).

Values are token-aligned like logprobs: entry t of [B, T-1] is V of the state before token t+1 is
sampled (the hidden state at position t); only policy tokens (loss mask 1) are trained.
"""
from __future__ import annotations

import time

import torch

from rl.algorithms import value_objective
from rl.ds_worker import DeepSpeedWorker, LearnerSettings
from policies.vision import model_inputs as vision_inputs


class ValueModel(torch.nn.Module):
    """Decoder of a causal LM (its LM head dropped: no 248K-vocab logits) + a linear value head,
    zero-initialised so that the first values are 0."""

    def __init__(self, causal_lm: torch.nn.Module):
        super().__init__()
        self.backbone = causal_lm.model
        self.config = causal_lm.config
        hidden = getattr(self.config, "hidden_size", None) or self.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(self.backbone.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """model_kwargs: a VL backbone's images (policies/vision.py model_inputs)."""
        h = self.backbone(input_ids=input_ids, use_cache=False, **model_kwargs).last_hidden_state
        return self.value_head(h[:, :-1]).squeeze(-1).float()


class Critic(DeepSpeedWorker):
    def __init__(self, model_path: str, settings: LearnerSettings, value_clip: float | None = 0.2, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29501,
                 samples_per_step: int = 64):
        self.value_clip = value_clip
        self._setup(settings, rank, world_size, master_addr, master_port, samples_per_step)
        lm = self._load_causal_lm(model_path)
        self.model = ValueModel(lm)
        del lm
        self._initialize(self.model)

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """V for this rank's shard [b, T-1] (0 off the loss mask); the driver concatenates shards."""
        local = self._shard(batch)
        self.engine.module.eval()
        T = local["input_ids"].shape[1] - 1
        m = self.engine.module
        out = [self._pad_to(m(mb["input_ids"], **vision_inputs(m, mb)) * mb["loss_mask"], T)
               for mb in self._micro(local, self.s.micro_batch_size)]
        return torch.cat(out)

    def train(self, batch: dict) -> dict:
        """Regress V on the returns (batch["returns"]), clipped around the rollout-time values
        (batch["values"]), token-mean over each mini-batch's policy tokens."""
        t0 = time.perf_counter()
        local = self._shard(batch)
        self.engine.module.train()
        B = local["input_ids"].shape[0]
        mini = B // self.s.mini_batches
        loss_sum, clip_sum, err_sum, tokens = 0.0, 0.0, 0.0, 0.0
        for m in range(self.s.mini_batches):
            part = {k: v[m * mini : (m + 1) * mini] for k, v in local.items()}
            num_tokens, num_seqs = self._global_counts(part)
            for mb in self._micro(part, self.s.micro_batch_size):
                v = self.engine.module(mb["input_ids"], **vision_inputs(self.engine.module, mb))
                loss, st = value_objective(v, mb["values"], mb["returns"], mb["loss_mask"], clip=self.value_clip,
                                           num_tokens=num_tokens, num_seqs=num_seqs)
                self.engine.backward(loss * self.loss_scale)
                self.engine.step()
                n = float(mb["loss_mask"].sum())
                loss_sum += loss.item()
                clip_sum += st["value_clip_frac"] * n
                err_sum += float((((v.detach() - mb["returns"]) ** 2) * mb["loss_mask"]).sum())
                tokens += n
        loss_sum, clip_sum, err_sum, tokens = self._allreduce([loss_sum, clip_sum, err_sum, tokens])
        return {"critic/loss": loss_sum / self.s.mini_batches, "critic/value_clip_frac": clip_sum / max(tokens, 1.0),
                "critic/mse": err_sum / max(tokens, 1.0), "critic/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "timing/critic_update_s": time.perf_counter() - t0}
