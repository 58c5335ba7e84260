"""Off-policy correction between the policy that sampled the tokens (the engine's behaviour
logprobs, possibly several versions old, and numerically different from the learner) and the
learner's old policy (its logprobs at the start of the update, the PPO ratio's denominator).

Per policy token, w = π_old / π_behaviour = exp(old - behaviour):
  tis: truncated importance sampling, w' = min(w, cap)            (Yao et al. 2025, "TIS")
  mis: masked importance sampling, w' = w where w <= cap, else 0  (the token leaves the loss)
  none: w' = 1
The policy loss of each token is multiplied by w' (decoupled PPO: the clip acts on π_θ / π_old).
"""
from __future__ import annotations

import torch

from rl.algorithms.losses import masked_mean

IS_MODES = ("none", "tis", "mis")


def importance_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str = "tis", cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Returns (weights [B, T] (0 off the mask), stats: is/mean, is/max, is/clipped_frac)."""
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; available: {', '.join(IS_MODES)}")
    m = mask.float()
    w = torch.exp((old_logprobs - behaviour_logprobs).clamp(max=20.0)) * m
    over = (w > cap).float() * m
    if mode == "tis":
        out = torch.minimum(w, torch.full_like(w, cap))
    elif mode == "mis":
        out = w * (1.0 - over)
    else:
        out = m.clone()
    stats = {"is/mean": float(masked_mean(w, m)), "is/max": float((w * m).max()) if m.any() else 0.0,
             "is/clipped_frac": float(masked_mean(over, m)) if mode != "none" else 0.0}
    return out.detach(), stats
