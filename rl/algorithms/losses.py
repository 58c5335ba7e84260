"""Policy and value losses on token tensors [B, T] with a loss mask (1 = policy-generated token).

A policy loss returns a per-token loss matrix and statistics; `aggregate` turns a matrix into the
scalar that is back-propagated (token-mean, seq-mean-token-sum, seq-mean-token-mean, or
seq-mean-token-sum-norm), so every loss can be combined with every aggregation mode.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PolicyLossFn = Callable[..., "tuple[torch.Tensor, dict]"]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def register_policy_loss(name: str):
    """Register `fn(logprobs, old_logprobs, advantages, mask, clip_low, clip_high) -> (per_token, stats)`."""
    def wrap(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return wrap


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              num_tokens: Optional[float] = None, num_seqs: Optional[float] = None,
              norm_tokens: Optional[float] = None) -> torch.Tensor:
    """Scalar loss from a [B, T] matrix.

    token-mean:               Σ_i Σ_t x / N_tokens                 (DAPO's token-level loss)
    seq-mean-token-mean:      Σ_i (Σ_t x / n_i) / N_seqs           (original GRPO)
    seq-mean-token-sum:       Σ_i Σ_t x / N_seqs
    seq-mean-token-sum-norm:  Σ_i Σ_t x / (N_seqs · norm_tokens)  (Dr. GRPO: a constant length)

    `num_tokens` / `num_seqs` default to this batch's counts; pass the whole mini-batch's (over all
    micro-batches and ranks) to aggregate exactly across gradient accumulation.
    """
    m = mask.to(per_token.dtype)
    x = per_token * m
    n_seqs = float(mask.shape[0]) if num_seqs is None else float(num_seqs)
    if mode == "token-mean":
        n_tok = float(m.sum()) if num_tokens is None else float(num_tokens)
        return x.sum() / max(n_tok, 1.0)
    if mode == "seq-mean-token-mean":
        return (x.sum(1) / m.sum(1).clamp(min=1.0)).sum() / max(n_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return x.sum() / max(n_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        if not norm_tokens:
            raise ValueError("seq-mean-token-sum-norm needs norm_tokens (algorithm.loss_norm_tokens)")
        return x.sum() / (max(n_seqs, 1.0) * norm_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; available: {', '.join(LOSS_AGGREGATIONS)}")


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


def _clipped_surrogate(ratio, advantages, clip_low, clip_high, mask):
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped < unclipped).float(), mask),
                 "ratio_mean": masked_mean(ratio, mask)}  # 0-dim tensors: no GPU sync here
    return per_token, stats


@register_policy_loss("ppo_clip")
def ppo_clip(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2):
    """PPO-clip surrogate per token: -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A), ρ = π/π_old.
    Separate ε_low / ε_high give DAPO's clip-higher. advantages: [B] or [B, T]."""
    ratio = torch.exp(logprobs - old_logprobs)
    return _clipped_surrogate(ratio, _per_token(advantages, logprobs), clip_low, clip_high, mask)


@register_policy_loss("gspo")
def gspo(logprobs, old_logprobs, advantages, mask, clip_low: float = 3e-4, clip_high: float = 4e-4):
    """GSPO: one importance ratio per sequence, s_i = exp(mean_t (log π - log π_old)), clipped and
    applied to every token of the sequence (GSPO-token form: s_i,t = sg[s_i]·π_t/sg[π_t], whose
    gradient is s_i ∇log π_t). With one token per sequence this is PPO-clip."""
    m = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(1) / m.sum(1).clamp(min=1.0)
    log_ratio = seq_log_ratio.detach().unsqueeze(1) + logprobs - logprobs.detach()
    return _clipped_surrogate(torch.exp(log_ratio), _per_token(advantages, logprobs), clip_low, clip_high, mask)


def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2):
    """PPO-clip, token-mean over masked tokens: (scalar loss, stats)."""
    per_token, stats = ppo_clip(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    return aggregate(per_token, mask, "token-mean"), stats


def value_loss(values, old_values, returns, mask, clip: Optional[float] = 0.2):
    """Clipped value loss per token: ½·max((V - R)², (V_old + clip(V - V_old, ±c) - R)²);
    clip None/0 gives ½(V - R)². Returns (per_token, stats)."""
    err = (values - returns) ** 2
    if clip:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
        frac = masked_mean((err_clipped > err).float(), mask).item()
    else:
        per_token, frac = 0.5 * err, 0.0
    return per_token, {"value_clip_frac": frac}
