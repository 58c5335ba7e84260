"""Fused LM head -> token logprobs (+ entropy) with Triton kernels, light on memory and bandwidth.

Per chunk of rows the logits are one [chunk, V] buffer in the hidden states' dtype: kernel A reads it
once (online log-sum-exp and entropy), backward recomputes it and kernel B overwrites it in place with
d(loss)/d(logits), which two matmuls turn into the hidden and weight grads. No fp32 [n, V] tensor exists.
Runs on CUDA, or on CPU under Triton's interpreter (tests: TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: can_fuse() says no and the unfused path runs
    triton = tl = None

BLOCK_V = 4096  # vocab elements per program step (both kernels); tests use a small one
NUM_WARPS = 8


def _fwd_kernel(x_ptr, tgt_ptr, lse_ptr, lp_ptr, ent_ptr, V, stride,
                BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """One row of logits -> lse, lp = x[target] - lse and ent = lse - sum p x, in one pass (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    m = -1e30  # running max (finite, so the first rescale is exp(-huge) = 0, never inf - inf)
    s = 0.0  # sum exp(x - m)
    t = 0.0  # sum exp(x - m) * (x - m)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if WITH_ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(mask, x - m_new, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    tgt = tl.load(tgt_ptr + row)
    x_t = tl.load(x_row + tgt, mask=(tgt >= 0) & (tgt < V), other=float("nan")).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(lp_ptr + row, x_t - lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - t / s)


def _bwd_kernel(x_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, stride,
                BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """In place: logits -> g_lp (onehot - p) - g_ent p (log p + ent), in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    ptrs = x_ptr + row * stride + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    p = tl.exp(x - lse)
    tgt = tl.load(tgt_ptr + row)
    g = tl.load(glp_ptr + row) * (tl.where(cols == tgt, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        g -= tl.load(gent_ptr + row) * p * (x - lse + tl.load(ent_ptr + row))
    tl.store(ptrs, g.to(x_ptr.dtype.element_ty), mask=mask)


def _interpret() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs else os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:  # decorated at import: tests set TRITON_INTERPRET=1 before the process starts
    _fwd_kernel, _bwd_kernel = triton.jit(_fwd_kernel), triton.jit(_bwd_kernel)


def _chunks(n: int, chunk_tokens: int):
    for s in range(0, n, chunk_tokens):
        yield s, min(s + chunk_tokens, n)


class FusedHeadLogprobs(torch.autograd.Function):
    """(hidden [n, H], weight [V, H], targets [n], chunk_tokens, with_entropy) -> (lp [n], ent [n] or [0])."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, with_entropy: bool, keep_logits: bool = False):
        n, V = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        lse, lp, ent = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32)
        buf = hidden.new_empty(n if keep_logits else min(chunk_tokens, n), V)  # keep: all [n, V] for backward
        for s, e in _chunks(n, n if keep_logits else chunk_tokens):  # kept: one matmul into the [n, V] buffer
            x = torch.mm(hidden[s:e], weight.t(), out=buf[s:e] if keep_logits else buf[: e - s])
            _fwd_kernel[(e - s,)](x, targets[s:], lse[s:], lp[s:], ent[s:] if with_entropy else lp, V, x.stride(0),
                          BLOCK_V=BLOCK_V, WITH_ENTROPY=with_entropy, num_warps=NUM_WARPS)
        ctx.save_for_backward(hidden, weight, targets, lse, ent, buf if keep_logits else None)
        ctx.chunk_tokens, ctx.with_entropy = chunk_tokens, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ent, kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        n, V = hidden.shape[0], weight.shape[0]
        with_ent = ctx.with_entropy and g_ent is not None
        g_lp = lse.new_zeros(n) if g_lp is None else g_lp.float().contiguous()
        g_ent = g_ent.float().contiguous() if with_ent else g_lp

        def dlogits(G, s, e):  # G [e - s, V] logits -> d(loss)/d(logits), in place
            _bwd_kernel[(e - s, triton.cdiv(V, BLOCK_V))](G, targets[s:], lse[s:], ent[s:] if with_ent else lse,
                                                  g_lp[s:], g_ent[s:], V, G.stride(0), BLOCK_V=BLOCK_V,
                                                  WITH_ENTROPY=with_ent, num_warps=NUM_WARPS)
            return G

        if kept is not None:  # all logits kept: one kernel, then one matmul per gradient (fp32 accumulation inside)
            G = dlogits(kept, 0, n)
            return (G @ weight if need_h else None), (G.t() @ hidden if need_w else None), None, None, None, None
        chunk = ctx.chunk_tokens
        g_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and n > chunk else None
        buf = hidden.new_empty(min(chunk, n), V)
        for s, e in _chunks(n, chunk):
            hc = hidden[s:e]
            G = dlogits(torch.mm(hc, weight.t(), out=buf[: e - s]), s, e)  # logits recomputed, then d/dlogits
            if need_h:
                torch.mm(G, weight, out=g_h[s:e])
            if need_w and g_w is None:  # a single chunk: no fp32 accumulator needed
                g_w = G.t() @ hc
            elif need_w:
                _add_matmul_fp32(g_w, G.t(), hc)
        return g_h, (g_w.to(weight.dtype) if need_w else None), None, None, None, None


_FP32_EPILOGUE: list[bool] = []  # [works?] once tried: torch.addmm(..., out_dtype=float32) on this build


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for bf16/fp16 a, b: in cuBLAS's epilogue where torch has `addmm(out_dtype=)`
    (CUDA, torch >= 2.8), else through a product in a's dtype and a separate add."""
    if a.dtype != torch.float32 and acc.is_cuda and _FP32_EPILOGUE != [False]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_EPILOGUE[:] = [True]
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_EPILOGUE[:] = [False]
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def fused_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_tokens: int = 4096, with_entropy: bool = False, keep_logits: bool = False):
    """logprob of `targets` [n] under hidden [n, H] @ weight[V, H].T (and the entropy [n]), fp32,
    differentiable in hidden and weight; like `rl.logprobs.head_logprobs` for a bias-free Linear head.
    `keep_logits` (training only): keep all [n, V] logits for backward (n x V x 2 bytes in bf16)
    instead of recomputing the head matmul there."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_head_logprobs: need hidden [n, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_head_logprobs: targets {tuple(targets.shape)} must be [n] = [{hidden.shape[0]}]")
    if chunk_tokens < 1:
        raise ValueError(f"fused_head_logprobs: chunk_tokens must be >= 1, got {chunk_tokens}")
    keep = keep_logits and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lp, ent = FusedHeadLogprobs.apply(hidden, weight.contiguous(), targets.long().contiguous(), chunk_tokens,
                                      with_entropy, keep)
    return (lp, ent) if with_entropy else lp


def fuse_blocker(head: torch.nn.Module, hidden: torch.Tensor) -> str:
    """Why the fused op can't replace `head` on `hidden` ('' when it can)."""
    if triton is None:
        return "triton is not installed"
    if not (hidden.is_cuda or _interpret()):
        return "hidden states are not on CUDA (TRITON_INTERPRET=1 runs the kernels on CPU)"
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"the head is a {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None or head._forward_hooks or head._forward_pre_hooks:
        return "the head has a bias or forward hooks"
    w = head.weight
    if hasattr(w, "ds_id"):
        return "the head weight is a DeepSpeed ZeRO-3 parameter (partitioned)"
    if w.dtype != hidden.dtype or w.device != hidden.device:
        return f"head weight {w.dtype} on {w.device} vs hidden states {hidden.dtype} on {hidden.device}"
    return ""


def can_fuse(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """True when `fused_head_logprobs(hidden, head.weight, ...)` computes what the head would."""
    return not fuse_blocker(head, hidden)
