"""The learner's scalar objectives, composed from the registered pieces: policy loss + KL loss +
entropy bonus (policy), clipped value loss (critic), each aggregated by one mode."""
from __future__ import annotations

from typing import Optional

import torch

from rl.algorithms.kl import kl_estimate
from rl.algorithms.losses import POLICY_LOSSES, aggregate, masked_mean, value_loss


def policy_objective(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    policy_loss: str = "ppo_clip", clip_low: float = 0.2, clip_high: float = 0.2, loss_agg: str = "token-mean",
    num_tokens: Optional[float] = None, num_seqs: Optional[float] = None, norm_tokens: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
    entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0, is_weights: Optional[torch.Tensor] = None,
    tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict]:
    """loss = agg(policy_loss) + kl_coef·agg(KL(π‖π_ref)) - entropy_coef·agg(H). The KL term is only
    added when `ref_logprobs` is given (KL as a loss; KL as a reward penalty enters the advantages
    instead). `is_weights` [B, T] (off-policy correction, rl/algorithms/importance.py) multiply the
    policy loss per token. Returns (loss, stats) with stats as floats (`tensor_stats`: detached 0-dim
    tensors, so a GPU learner reads them once per step instead of syncing per micro-batch)."""
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy_loss!r}; available: {', '.join(sorted(POLICY_LOSSES))}")
    agg = dict(mode=loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_tokens=norm_tokens)
    per_token, st = POLICY_LOSSES[policy_loss](logprobs, old_logprobs, advantages, mask,
                                                clip_low=clip_low, clip_high=clip_high)
    if is_weights is not None:
        per_token = per_token * is_weights
    pg = aggregate(per_token, mask, **agg)
    loss = pg
    stats = {"pg_loss": pg.detach(), **st}
    if ref_logprobs is not None and kl_coef:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
        loss = loss + kl_coef * aggregate(kl, mask, **agg)
        stats["kl_ref"] = masked_mean(kl.detach(), mask)
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy, mask, **agg)
    if not tensor_stats:
        stats = {k: float(v) for k, v in stats.items()}
    return loss, stats


def value_objective(values, old_values, returns, mask, *, clip: Optional[float] = 0.2, loss_agg: str = "token-mean",
                    num_tokens: Optional[float] = None, num_seqs: Optional[float] = None,
                    norm_tokens: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    per_token, st = value_loss(values, old_values, returns, mask, clip)
    loss = aggregate(per_token, mask, loss_agg, num_tokens, num_seqs, norm_tokens)
    return loss, {"value_loss": loss.item(), **st}
