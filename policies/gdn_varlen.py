"""Packed-sequence (varlen) forward for Qwen3.5's Gated DeltaNet layers.

transformers' Gated DeltaNet takes `cu_seq_lens_q` from the model kwargs, but its PyTorch fallbacks
(`causal_conv1d_fn`, `torch_chunk_gated_delta_rule`) ignore it: on a packed row the causal conv and
the recurrent state run straight across sample boundaries, so sample k+1 sees sample k's state (the
leak prime-rl measured at ~0.23 mismatch KL). `install_varlen(model)` wraps every Gated DeltaNet
module so that, when `cu_seq_lens_q` is passed, each sample starts from a zero conv history and a
zero recurrent state:

- conv: one depthwise conv over the whole row, then the first (kernel-1) outputs of each sample are
  recomputed from that sample's own tokens; on CUDA with fla's conv (`learner.kernels`), q, k and v are
  projected and convolved per part by fla's varlen kernel (`fast_projected_conv`);
- delta rule: fla's varlen kernel (`cu_seqlens`) when it is installed and the tensors are on CUDA;
  otherwise the samples are re-batched right-padded ([S, max_len]) for the PyTorch chunked rule
  (right padding cannot affect earlier positions: the rule is causal).

Projections, norms and the output projection run on the packed row. Without `cu_seq_lens_q`, or with
a cache (generation), the original forward runs unchanged.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

_MARK = "_qrl_varlen_installed"


def is_gated_deltanet(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("GatedDeltaNet")


def install_varlen(model: torch.nn.Module) -> int:
    """Wrap the forward of every Gated DeltaNet module in `model`; returns how many were wrapped."""
    n = 0
    for module in model.modules():
        if is_gated_deltanet(module) and not getattr(module, _MARK, False):
            original = module.forward

            def forward(self, hidden_states, cache_params=None, attention_mask=None, _orig=original, **kwargs):
                cu = kwargs.get("cu_seq_lens_q")
                if cu is None or cache_params is not None:
                    return _orig(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
                return varlen_forward(self, hidden_states, cu)

            module.forward = types.MethodType(forward, module)
            setattr(module, _MARK, True)
            n += 1
    return n


def segment_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the `total` packed positions: the sample it belongs to and its position in it
    (the indices that re-batch a packed row as [samples, max_len], right-padded)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)
    return seg, torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seg]


def varlen_causal_conv(x: torch.Tensor, weight: torch.Tensor, bias, activation: str | None,
                       cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv of a packed row x [C, N] where every sample starts from zero history:
    one conv over the whole row, then the first (kernel-1) outputs of every sample are recomputed
    from that sample's own tokens only (a few [C, samples] gathers in fp32; no copy of the row, no
    host sync)."""
    C, N = x.shape
    k = weight.shape[-1]
    y = F.conv1d(x.unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), bias, padding=k - 1, groups=C)[0, :, :N]
    starts, ends = cu_seqlens[1:-1].long(), cu_seqlens[2:].long()
    if starts.numel():
        rows = torch.arange(C, device=y.device).unsqueeze(1)
        w = weight.float()
        for p in range(k - 1):  # the p-th position of every sample but the first
            t = starts + p
            inside = (t < ends).unsqueeze(0)  # a sample shorter than p+1 tokens has no p-th position
            t = t.clamp(max=N - 1)
            fixed = bias.float().unsqueeze(1).expand(C, len(t)) if bias is not None else 0.0
            for j in range(p + 1):  # lags that stay inside the sample
                fixed = fixed + w[:, k - 1 - j].unsqueeze(1) * x[:, t - j].float()
            # t is strictly increasing over samples, so no two samples write the same position
            y = y.index_put((rows, t.unsqueeze(0)), torch.where(inside, fixed.to(y.dtype), y[:, t]))
    if activation is not None:
        from transformers.activations import ACT2FN

        y = ACT2FN[activation](y)
    return y.to(x.dtype)


def _fla_chunk_rule():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 - fla missing or unusable here: PyTorch path
        return None
    return chunk_gated_delta_rule


def pytorch_rule(fn):
    """transformers swaps fla's kernels in for its PyTorch delta rules when fla is installed; the
    PyTorch function stays reachable as `__wrapped__`."""
    return getattr(fn, "__wrapped__", fn)


def fla_cu_seqlens(cu_seqlens: torch.Tensor) -> dict:
    """`cu_seqlens` (int64, as fla wants it) and its host copy for fla's kernels. Both are cached on the
    tensor, so every layer passes the same objects: fla then builds its chunk indices once per row
    and never syncs the GPU to read the boundaries (rl/packing.py attaches the host copy)."""
    cached = getattr(cu_seqlens, "_qrl_fla", None)
    if cached is None:
        host = getattr(cu_seqlens, "_qrl_cpu", None)
        cached = {"cu_seqlens": cu_seqlens.long(), "cu_seqlens_cpu": host.long() if host is not None else None}
        cu_seqlens._qrl_fla = cached
    return cached


def varlen_delta_rule(module, q, k, v, g, beta, cu_seqlens):
    """Gated delta rule over a packed row (tensors [1, N, heads, dim]) with a fresh state per sample."""
    fla_rule = _fla_chunk_rule() if q.is_cuda and not getattr(module, "_qrl_torch_rule", False) else None
    if fla_rule is not None:
        out, _ = fla_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True, **fla_cu_seqlens(cu_seqlens))
        return out
    rule = pytorch_rule(sys.modules[type(module).__module__].torch_chunk_gated_delta_rule)
    N = q.shape[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S, L = len(lengths), int(lengths.max())
    seg, pos = segment_positions(cu_seqlens, N)

    def batch(x):  # [1, N, ...] -> [S, L, ...], right-padded with zeros
        out = x.new_zeros((S, L) + tuple(x.shape[2:]))
        out[seg, pos] = x[0]
        return out

    out, _ = rule(batch(q), batch(k), batch(v), g=batch(g), beta=batch(beta), initial_state=None,
                  output_final_state=False, use_qk_l2norm_in_kernel=True)
    return out[seg, pos].unsqueeze(0)


def fast_projected_conv(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor):
    """q, k, v [1, N, dim] of a packed row, each contiguous: `in_proj_qkv` and fla's varlen conv run per part
    (row blocks of the same weights), so the delta-rule kernel gets contiguous inputs and no [N, C] copy or
    concatenation is made in either direction (splitting one [N, C] conv output costs three copies forward
    and a concatenation backward)."""
    from fla.modules.causal_conv1d import causal_conv1d

    sizes = [self.key_dim, self.key_dim, self.value_dim]
    proj, conv = self.in_proj_qkv, self.conv1d
    if hasattr(proj.weight, "ds_id"):  # ZeRO-3: only the module's own call gathers its weight; one conv, then split
        mixed, _ = causal_conv1d(proj(hidden_states), conv.weight.squeeze(1), conv.bias, activation=self.activation,
                                 **fla_cu_seqlens(cu_seqlens))
        return torch.split(mixed, sizes, dim=-1)
    biases = proj.bias.split(sizes) if proj.bias is not None else (None,) * 3
    conv_biases = conv.bias.split(sizes) if conv.bias is not None else (None,) * 3
    parts = zip(proj.weight.split(sizes), biases, conv.weight.squeeze(1).split(sizes), conv_biases)
    return [causal_conv1d(F.linear(hidden_states, w, b), cw, cb, activation=self.activation,
                          **fla_cu_seqlens(cu_seqlens))[0] for w, b, cw, cb in parts]


def varlen_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The Gated DeltaNet forward of transformers' Qwen3.5 (no cache) on one packed row [1, N, H]."""
    if hidden_states.shape[0] != 1:
        raise ValueError(f"packed Gated DeltaNet input must be one row [1, N, H], got {tuple(hidden_states.shape)}")
    _, N, _ = hidden_states.shape
    z = self.in_proj_z(hidden_states).reshape(1, N, -1, self.head_v_dim)
    b = self.in_proj_b(hidden_states)
    a = self.in_proj_a(hidden_states)
    if getattr(self, "_qrl_fast_conv", False) and hidden_states.is_cuda:  # policies/fast_kernels.py
        query, key, value = fast_projected_conv(self, hidden_states, cu_seqlens)
    else:
        mixed_qkv = self.in_proj_qkv(hidden_states)[0].transpose(0, 1)  # [C, N]
        mixed_qkv = varlen_causal_conv(mixed_qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation,
                                       cu_seqlens).transpose(0, 1).unsqueeze(0)  # [1, N, C]
        query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(1, N, -1, self.head_k_dim)
    key = key.reshape(1, N, -1, self.head_k_dim)
    value = value.reshape(1, N, -1, self.head_v_dim)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    if self.num_v_heads // self.num_k_heads > 1:
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        key = key.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
    core = varlen_delta_rule(self, query, key, value, g, beta, cu_seqlens)
    core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(core.reshape(1, N, -1))
