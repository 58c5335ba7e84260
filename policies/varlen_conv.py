"""Gated DeltaNet's short causal conv (depthwise, kernel 4, SiLU) over a packed row, in Triton.

Same function as `policies/gdn_varlen.varlen_causal_conv` (every sample starts from zero history),
channels-last ([N, C], the layout `in_proj_qkv` produces, no transposes). Forward: one pass;
backward: ds = dy * silu'(s) with s recomputed, then dx and per-block partial dw/db sums. Each pass
reads or writes every [N, C] element about once, where fla 0.6's conv backward measured 6x that
(bench/results/learner_gpu_h200_tuned.md: 68 ms of a 1.06 s step). Opt-in kernel kind `qrl_conv`
(`learner.kernels`) until it is measured on a GPU; runs on CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch conv is used
    triton = tl = None

BT, BC = 32, 128  # rows x channels per program


def _conv_tile(x, w, b, start, t, c, N, C, K: tl.constexpr, HAS_B: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The pre-activation s [BT, BC] of rows t, channels c (fp32; zero history before each sample's start)."""
    tm, cm = t < N, c < C
    st = tl.load(start + t, mask=tm, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        r = (t - j).to(tl.int64)
        m = ((r >= st) & tm)[:, None] & cm[None, :]
        xv = tl.load(x + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w + c * K + (K - 1 - j), mask=cm, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if HAS_B:
        acc += tl.load(b + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    return acc


def _fwd(x, w, b, y, start, N, C, K: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
         BT: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    acc = _conv_tile(x, w, b, start, t, c, N, C, K, HAS_B, BT, BC)
    if ACT:
        acc = acc * tl.sigmoid(acc)
    out = t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(y + out, acc.to(y.dtype.element_ty), mask=(t < N)[:, None] & (c < C)[None, :])


def _bwd_ds(x, w, b, dy, ds, start, N, C, K: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
            BT: tl.constexpr, BC: tl.constexpr):
    """ds = dy * d silu(s) / ds, s (the pre-activation) recomputed; fp32."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    out = t.to(tl.int64)[:, None] * C + c[None, :]
    mask = (t < N)[:, None] & (c < C)[None, :]
    g = tl.load(dy + out, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        s = _conv_tile(x, w, b, start, t, c, N, C, K, HAS_B, BT, BC)
        sig = tl.sigmoid(s)
        g = g * sig * (1.0 + s * (1.0 - sig))
    tl.store(ds + out, g, mask=mask)


def _bwd_dx(x, w, ds, dx, dw_part, db_part, start, end, N, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx[t] = sum_j w[K-1-j] ds[t+j] (same sample); this block's partial dw and db sums."""
    pid_t = tl.program_id(0)
    t = pid_t * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    tm, cm = t < N, c < C
    st = tl.load(start + t, mask=tm, other=0)
    en = tl.load(end + t, mask=tm, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        r = (t + j).to(tl.int64)
        m = ((r < en) & tm)[:, None] & cm[None, :]
        dv = tl.load(ds + r[:, None] * C + c[None, :], mask=m, other=0.0)
        wv = tl.load(w + c * K + (K - 1 - j), mask=cm, other=0.0).to(tl.float32)
        acc += dv * wv[None, :]
    mask = tm[:, None] & cm[None, :]
    out = t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(dx + out, acc.to(dx.dtype.element_ty), mask=mask)
    d0 = tl.load(ds + out, mask=mask, other=0.0)
    for j in tl.static_range(K):
        r = (t - j).to(tl.int64)
        m = ((r >= st) & tm)[:, None] & cm[None, :]
        xv = tl.load(x + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dw_part + (pid_t * K + (K - 1 - j)) * C + c, tl.sum(d0 * xv, 0), mask=cm)
    tl.store(db_part + pid_t * C + c, tl.sum(d0, 0), mask=cm)


if triton is not None:  # decorated at import: tests set TRITON_INTERPRET=1 before the process starts
    _conv_tile, _fwd, _bwd_ds, _bwd_dx = (triton.jit(f) for f in (_conv_tile, _fwd, _bwd_ds, _bwd_dx))


def sample_bounds(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [n] start and end of the sample each packed position belongs to (cached on the tensor)."""
    cached = getattr(cu_seqlens, "_qrl_bounds", None)
    if cached is None:
        from policies.gdn_varlen import segment_positions

        seg, _ = segment_positions(cu_seqlens, n)
        cu = cu_seqlens.to(torch.int32)
        cached = (cu[seg].contiguous(), cu[seg + 1].contiguous())
        cu_seqlens._qrl_bounds = cached
    return cached


class VarlenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, start, end, act: bool):
        N, C = x.shape
        K = weight.shape[1]
        y = torch.empty_like(x)
        grid = (triton.cdiv(N, BT), triton.cdiv(C, BC))
        _fwd[grid](x, weight, bias if bias is not None else weight, y, start, N, C, K=K, HAS_B=bias is not None,
                  ACT=act, BT=BT, BC=BC, num_warps=4)
        ctx.save_for_backward(x, weight, bias, start, end)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, start, end = ctx.saved_tensors
        N, C = x.shape
        K = weight.shape[1]
        nt = triton.cdiv(N, BT)
        grid = (nt, triton.cdiv(C, BC))
        ds = torch.empty(N, C, dtype=torch.float32, device=x.device)
        _bwd_ds[grid](x, weight, bias if bias is not None else weight, dy.contiguous(), ds, start, N, C, K=K,
                     HAS_B=bias is not None, ACT=ctx.act, BT=BT, BC=BC, num_warps=4)
        dx = torch.empty_like(x)
        dw_part = torch.empty(nt, K, C, dtype=torch.float32, device=x.device)
        db_part = torch.empty(nt, C, dtype=torch.float32, device=x.device)
        _bwd_dx[grid](x, weight, ds, dx, dw_part, db_part, start, end, N, C, K=K, BT=BT, BC=BC, num_warps=4)
        dw = dw_part.sum(0).t().to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None, None, None


def varlen_conv(x: torch.Tensor, weight: torch.Tensor, bias, activation: str | None,
                cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x [1, N, C] packed row, weight [C, K], bias [C] or None, activation silu/swish or None ->
    [1, N, C]: the depthwise causal conv with zero history at every sample start."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"varlen_conv: activation {activation!r} is not supported (silu, swish or None)")
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"varlen_conv: x must be one packed row [1, N, C], got {tuple(x.shape)}")
    N = x.shape[1]
    start, end = sample_bounds(cu_seqlens, N)
    return VarlenConv.apply(x[0].contiguous(), weight.contiguous(), bias, start, end, activation is not None).unsqueeze(0)
