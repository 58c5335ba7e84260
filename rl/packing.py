"""Sequence packing for the learner: the samples of a micro-batch are laid end to end in one row
(no padding), with positions restarting at 0 and `cu_seq_lens` marking the boundaries.

Full attention runs per sample (re-batched causal SDPA, `policies/packed_attention.py`; without it
transformers would build an [N x N] block-diagonal mask from the restarting positions), flash-attention
kernels get `cu_seq_lens_*`, and Qwen3.5's Gated DeltaNet layers get
a fresh conv history and recurrent state per sample (`policies/gdn_varlen.py`): no state crosses a
sample boundary, so packed logprobs equal unpacked ones.
"""
from __future__ import annotations

import torch

from policies.gdn_varlen import install_varlen, is_gated_deltanet
from policies.packed_attention import NAME as PACKED_ATTENTION
from policies.packed_attention import use_packed_attention
from rl.logprobs import head_logprobs, hidden_states


def supports_packing(model: torch.nn.Module) -> tuple[bool, str]:
    """(True, "") when packed rows are exact for this model; else (False, why)."""
    cfg = model.config
    if getattr(cfg, "vision_config", None) is not None:
        return False, "vision-language models use multimodal (mrope) positions; packing is text-only"
    if any(type(m).__name__.endswith(("Mamba", "MambaMixer")) for m in model.modules()):
        return False, "state-space layers other than Gated DeltaNet have no varlen path here"
    return True, ""


def prepare(model: torch.nn.Module) -> int:
    """Make `model` packing-safe and fast: wraps its Gated DeltaNet layers (returns how many) and runs
    full attention per sample (`policies/packed_attention.py`) instead of under an [N x N] mask."""
    use_packed_attention(model)
    return install_varlen(model)


_TAKES_MASK_DICT: dict[type, bool] = {}


def no_masks(model: torch.nn.Module) -> dict | None:
    """`{layer type: None}` for a packed row, where the attention kernels take the sample boundaries from
    `cu_seq_lens_*` (packed SDPA, flash-attention): transformers then builds no block-diagonal [N x N]
    mask from the restarting positions (a GPU sync and three N x N passes per forward). None when this
    model's attention needs the mask or its decoder does not take per-layer-type masks."""
    cfg = model.config
    impl, types = str(getattr(cfg, "_attn_implementation", None)), getattr(cfg, "layer_types", None)
    if not types or not (impl == PACKED_ATTENTION or impl.startswith("flash")):
        return None
    decoder = type(getattr(model, "model", model))
    if decoder not in _TAKES_MASK_DICT:
        import inspect

        try:
            _TAKES_MASK_DICT[decoder] = "isinstance(causal_mask_mapping := attention_mask, dict)" in \
                inspect.getsource(decoder.forward)
        except (OSError, TypeError):
            _TAKES_MASK_DICT[decoder] = False
    return {t: None for t in set(types)} if _TAKES_MASK_DICT[decoder] else None


def pack(input_ids: torch.Tensor, lengths: torch.Tensor):
    """input_ids [B, T] right-padded, lengths [B] -> (ids [1, N], position_ids [1, N], cu_seqlens [B+1] int32).
    Indices are built on the host from `lengths` (pass a CPU tensor: no GPU sync) and copied over."""
    lengths = lengths.to(torch.long).cpu()
    B, T = input_ids.shape
    dev = input_ids.device
    keep = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
    ids = input_ids.reshape(-1)[flat.to(dev, non_blocking=True)].unsqueeze(0)
    positions_cpu = torch.arange(T).unsqueeze(0).expand(B, T)[keep].unsqueeze(0)
    positions = positions_cpu.to(dev, non_blocking=True)
    positions._qrl_cpu = positions_cpu
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    cu_dev = cu.to(dev, non_blocking=True)
    cu_dev._qrl_cpu = cu  # host copy: GPU kernels read the boundaries without a device sync
    return ids, positions, cu_dev


def packed_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                          chunk_tokens: int = 4096, with_entropy: bool = False, fused: bool = False,
                          keep_logits: bool = False):
    """Same result as `rl.logprobs.token_logprobs(model, input_ids)` on the valid positions
    ([B, T-1], zeros past each sample's end), computed on one packed row. `lengths` on the host
    keeps the whole call free of GPU syncs."""
    B, T = input_ids.shape
    lengths = lengths.to(torch.long).cpu()
    ids, positions, cu = pack(input_ids, lengths)
    L = int(lengths.max())
    masks = {} if (none := no_masks(model)) is None else {"attention_mask": none}
    h = hidden_states(model, ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=L, max_length_k=L, **masks)[0]  # [N, H]
    N = ids.shape[1]
    dev = ids.device
    # every position except each sample's last predicts the next packed token (indices built on the host)
    is_last = torch.zeros(N, dtype=torch.bool)
    is_last[(cu._qrl_cpu[1:] - 1).long()] = True
    src_cpu = torch.nonzero(~is_last).squeeze(1)
    src = src_cpu.to(dev, non_blocking=True)
    res = head_logprobs(model.get_output_embeddings(), h[src], ids[0, src + 1], chunk_tokens, with_entropy,
                        fused=fused, keep_logits=keep_logits)
    row = torch.repeat_interleave(torch.arange(B), (lengths - 1).clamp(min=0)).to(dev, non_blocking=True)
    col = positions._qrl_cpu[0, src_cpu].to(dev, non_blocking=True)

    def unpack(x):
        out = x.new_zeros(B, T - 1)
        return out.index_put((row, col), x)

    if with_entropy:
        return unpack(res[0]), unpack(res[1])
    return unpack(res)


def count_gated_deltanet(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if is_gated_deltanet(m))
