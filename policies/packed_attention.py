"""Attention for packed rows without an [N x N] mask: the samples of the row are re-batched
right-padded ([S, heads, max_len, dim]; by views alone when all samples have the same length) and run
through causal SDPA (flash/cuDNN kernels on GPU), so attention costs what it costs per sample, never N²
across the row. Right padding is exact for the valid positions (causal). Without `cu_seq_lens_q` in the call it is plain SDPA.

Registered with transformers as the attention implementation "qrl_packed_sdpa".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "qrl_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from policies.gdn_varlen import segment_positions

    _, Hq, N, D = query.shape
    lengths = (cu[1:] - cu[:-1]).long()
    S = len(lengths)
    L = int(kwargs.get("max_length_q") or lengths.max())  # passed by rl/packing.py: no host sync per layer
    if S * L == N:  # every sample is L long: the row is [S, L] already, re-batched by views (no copies)
        def batch(x):  # [1, h, N, d] -> [S, h, L, d]
            return x[0].unflatten(1, (S, L)).transpose(0, 1)

        def unbatch(out):  # [S, h, L, d] -> [1, N, h, d]
            return out.transpose(1, 2).reshape(1, N, out.shape[1], out.shape[3])
    else:
        seg, pos = segment_positions(cu, N)

        def batch(x):  # [1, h, N, d] -> [S, h, L, d], right-padded with zeros
            out = x.new_zeros(S, x.shape[1], L, x.shape[3])
            out[seg, :, pos] = x[0].transpose(0, 1)
            return out

        def unbatch(out):
            return out[seg, :, pos].unsqueeze(0)

    q, k, v = batch(query), batch(key), batch(value)
    if k.shape[1] != Hq:  # grouped-query attention: repeat kv heads
        k = k.repeat_interleave(Hq // k.shape[1], dim=1)
        v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    return unbatch(out), None  # [1, N, h, d], as transformers' attention functions return


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_sdpa)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA/eager model to packed SDPA; flash-attention models already take `cu_seq_lens_*`."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager", NAME):
        return False
    model.set_attn_implementation(register())
    return True
