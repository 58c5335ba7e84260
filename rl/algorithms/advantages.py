"""Advantage estimators. Each takes `AdvantageInputs` (episode rewards, the policy-token mask, and
optionally per-token rewards and critic values) and returns per-token advantages [B, T] and, for
estimators that train a critic, returns [B, T] (else None).

Samples of one prompt are contiguous (`group_size` of them). Token tensors are masked: only
policy-sampled tokens (mask 1) are timesteps; env/tool tokens in multi-turn episodes are skipped
(they carry no reward, value or advantage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rl.algorithms.losses import masked_mean


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # [B] episode rewards (after shaping, e.g. overlong penalty)
    mask: torch.Tensor  # [B, T] 1 = policy token
    group_size: int
    token_rewards: Optional[torch.Tensor] = None  # [B, T] extra per-token rewards (e.g. -β·KL)
    values: Optional[torch.Tensor] = None  # [B, T] critic values V(s_t) (gae only)


@dataclass
class AdvantageParams:
    gamma: float = 1.0
    lam: float = 1.0  # GAE λ
    normalize_std: bool = True  # grpo: divide by the group's std (False = Dr. GRPO)
    whiten: bool = False  # gae: normalise advantages over the batch's policy tokens
    eps: float = 1e-6


AdvantageFn = Callable[[AdvantageInputs, AdvantageParams], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
NEEDS_CRITIC: set[str] = set()


def register_advantage(name: str, needs_critic: bool = False):
    """Register `fn(inputs, params) -> (advantages [B,T], returns [B,T] | None)` under `name`."""
    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        if needs_critic:
            NEEDS_CRITIC.add(name)
        return fn
    return wrap


# -- building blocks ---------------------------------------------------------------------------
def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO per-sample score: (r - mean_group) / (std_group + eps); unbiased sample std (as in the
    GRPO paper / OpenRLHF). A group whose rewards are all equal gets zero."""
    r = _groups(rewards, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j  ( = G/(G-1) · (r_i - mean_group) )."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    r = _groups(rewards, group_size)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1)


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sample's scalar on its last policy token: [B] -> [B, T]."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    T = mask.shape[1]
    has = mask.sum(1) > 0
    last = T - 1 - torch.flip(mask, dims=[1]).float().argmax(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    out[rows, last[has]] = scores.float()[has]
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go over policy tokens: G_t = r_t + γ G_{t'} (t' = next policy token); 0 off-mask."""
    B, T = token_rewards.shape
    ret = torch.zeros(B, T, device=token_rewards.device)
    running = torch.zeros(B, device=token_rewards.device)
    m = mask.bool()
    for t in reversed(range(T)):
        running = torch.where(m[:, t], token_rewards[:, t] + gamma * running, running)
        ret[:, t] = torch.where(m[:, t], running, torch.zeros(()))
    return ret


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over policy tokens (env tokens are skipped: the next state
    of a policy token is the next policy token; after the last one V = 0). Returns (adv, returns)."""
    B, T = token_rewards.shape
    dev = token_rewards.device
    adv = torch.zeros(B, T, device=dev)
    m = mask.bool()
    last_gae = torch.zeros(B, device=dev)
    next_value = torch.zeros(B, device=dev)
    for t in reversed(range(T)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        g = delta + gamma * lam * last_gae
        adv[:, t] = torch.where(m[:, t], g, torch.zeros(()))
        last_gae = torch.where(m[:, t], g, last_gae)
        next_value = torch.where(m[:, t], values[:, t].float(), next_value)
    returns = (adv + values.float()) * mask
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; 0 off-mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def _with_token_rewards(scores: torch.Tensor, inp: AdvantageInputs, gamma: float) -> torch.Tensor:
    """Per-sample scores broadcast over policy tokens; with per-token rewards (KL penalty), the
    reward-to-go of (score at the last token + token rewards)."""
    if inp.token_rewards is None:
        return scores.float().unsqueeze(1) * inp.mask
    return discounted_returns(last_token_rewards(scores, inp.mask) + inp.token_rewards * inp.mask, inp.mask, gamma)


# -- registered estimators ---------------------------------------------------------------------
@register_advantage("grpo")
def grpo(inp: AdvantageInputs, p: AdvantageParams):
    """Group-normalised outcome advantage (normalize_std=False gives Dr. GRPO's unbiased version)."""
    scores = group_normalized_advantages(inp.rewards, inp.group_size, p.normalize_std, p.eps)
    return _with_token_rewards(scores, inp, p.gamma), None


@register_advantage("rloo")
def rloo(inp: AdvantageInputs, p: AdvantageParams):
    """REINFORCE Leave-One-Out: each sample's baseline is the mean of the other samples of its prompt."""
    return _with_token_rewards(leave_one_out_advantages(inp.rewards, inp.group_size), inp, p.gamma), None


@register_advantage("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs, p: AdvantageParams):
    """REINFORCE++: reward-to-go of (outcome at the last token + per-token rewards), whitened over
    the whole batch (global normalisation instead of a critic or per-group baseline)."""
    tok = last_token_rewards(inp.rewards, inp.mask)
    if inp.token_rewards is not None:
        tok = tok + inp.token_rewards * inp.mask
    return whiten(discounted_returns(tok, inp.mask, p.gamma), inp.mask), None


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(inp: AdvantageInputs, p: AdvantageParams):
    """REINFORCE++-baseline: subtract the group mean reward first, then as REINFORCE++."""
    r = _groups(inp.rewards, inp.group_size)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)
    return reinforce_pp(AdvantageInputs(centred, inp.mask, inp.group_size, inp.token_rewards), p)


@register_advantage("gae", needs_critic=True)
def gae_advantages(inp: AdvantageInputs, p: AdvantageParams):
    """PPO's GAE(γ, λ) from critic values; returns are the critic's regression targets."""
    if inp.values is None:
        raise ValueError("the gae advantage needs critic values (algorithm=ppo starts a critic)")
    tok = last_token_rewards(inp.rewards, inp.mask)
    if inp.token_rewards is not None:
        tok = tok + inp.token_rewards * inp.mask
    adv, returns = gae(tok, inp.values.float(), inp.mask, p.gamma, p.lam)
    if p.whiten:
        adv = whiten(adv, inp.mask)
    return adv, returns
