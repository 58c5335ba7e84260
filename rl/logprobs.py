"""Token logprobs (and entropy) without materialising [tokens x vocab] logits for the whole batch.

The LM head is applied to `chunk_tokens` positions at a time; under autograd each chunk is
checkpointed so the backward pass also keeps only one chunk of logits alive (248K vocab traps).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False):
    logp = torch.log_softmax(head(h).float(), dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        return lp, -(logp.exp() * logp).sum(-1)
    return lp


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final hidden states of a *ForCausalLM (its decoder, without the LM head)."""
    return model.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def head_logprobs(head: torch.nn.Module, flat: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                  with_entropy: bool = False, fused: bool = False, keep_logits: bool = False):
    """logprob of `targets` [n] under head(flat [n, H]), `chunk_tokens` rows of logits at a time
    (and the entropy [n], differentiable when autograd is on). `fused`: use the Triton op of
    rl.fused_logprobs where it applies (CUDA, plain bias-free Linear head), else this path;
    `keep_logits`: the fused op keeps the logits for backward instead of recomputing them."""
    if fused:
        from rl.fused_logprobs import can_fuse, fused_head_logprobs

        if can_fuse(head, flat):
            return fused_head_logprobs(flat, head.weight, targets, chunk_tokens, with_entropy, keep_logits)
    n = flat.shape[0]
    pieces, ents = [], []
    for start in range(0, n, chunk_tokens):
        hc, tc = flat[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and n > chunk_tokens:
            out = checkpoint(_chunk_logprobs, head, hc, tc, with_entropy, use_reentrant=False)
        else:
            out = _chunk_logprobs(head, hc, tc, with_entropy)
        lp, ent = out if with_entropy else (out, None)
        pieces.append(lp)
        if with_entropy:
            ents.append(ent)
    lp = torch.cat(pieces) if pieces else flat.new_zeros(0)
    if with_entropy:
        return lp, (torch.cat(ents) if ents else flat.new_zeros(0))
    return lp


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 4096, with_entropy: bool = False,
    fused: bool = False, keep_logits: bool = False, **model_kwargs,
):
    """logprob of input_ids[:, t+1] given input_ids[:, :t+1]; returns [B, T-1] (and entropy [B, T-1],
    differentiable when autograd is on: the entropy bonus trains through it). `model_kwargs` go to
    the decoder (vision-language models: pixel_values, image_grid_thw, mm_token_type_ids)."""
    head = model.get_output_embeddings()
    h = hidden_states(model, input_ids, **model_kwargs)[:, :-1]
    B, T, H = h.shape
    res = head_logprobs(head, h.reshape(-1, H), input_ids[:, 1:].reshape(-1), chunk_tokens, with_entropy,
                        fused=fused, keep_logits=keep_logits)
    if with_entropy:
        return res[0].view(B, T), res[1].view(B, T)
    return res.view(B, T)
