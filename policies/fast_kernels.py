"""Fused GPU kernels for Qwen3.5's memory-bound modules (`learner.kernels=auto`, CUDA + fla installed).

transformers runs Qwen3.5's norms, SwiGLU and the Gated DeltaNet causal conv as chains of PyTorch
elementwise ops (several fp32 passes over every activation, forward and backward). With
flash-linear-attention (fla) installed, `install_fast_kernels(model)` switches each of them to one
fused Triton kernel per direction:

- `Qwen3_5RMSNorm` (zero-centred, `x * (1 + w)`, fp32 math) -> fla `rms_norm` with weight `1 + w` in fp32;
- `Qwen3_5RMSNormGated` (`norm(x) * w * silu(z)`) -> fla `rms_norm_gated`;
- the MLP's `silu(gate) * up` -> fla `swiglu` (recomputed in backward: no saved product);
- the Gated DeltaNet causal conv on packed rows -> fla `causal_conv1d` with `cu_seqlens` (fresh
  history per sample in the kernel; `policies/gdn_varlen.py` uses it when the module is marked).

Each patched forward falls back to the original on CPU tensors, so a model stays usable anywhere.
The Gated DeltaNet recurrence itself goes through fla's chunk kernel whenever fla is importable
(`policies/gdn_varlen.py`), independent of this switch.
"""
from __future__ import annotations

import types

import torch

FAST_CONV = "_qrl_fast_conv"
_MARK = "_qrl_fast_kernel"


def fla_problem() -> str | None:
    """None when fla's fused modules import and a GPU is present; else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from fla.modules.activations import swiglu  # noqa: F401
        from fla.modules.causal_conv1d import causal_conv1d  # noqa: F401
        from fla.modules.norm.fused_norm_gate import rms_norm_gated  # noqa: F401
        from fla.modules.norm.layernorm import rms_norm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: stay on PyTorch
        return (f"flash-linear-attention is not usable ({type(err).__name__}: {err}); "
                "install it with `pip install flash-linear-attention` (see docs/gpu.md)")
    return None


def gdn_problem() -> str | None:
    """None when fla's gated delta-rule kernels can train here; else why not. fla refuses the backward
    on Hopper with Triton 3.4 to 3.7.0 (wrong results, fla #640) unless tilelang is installed."""
    problem = fla_problem()
    if problem:
        return problem
    from fla import utils

    if getattr(utils, "IS_NVIDIA_HOPPER", False) and getattr(utils, "TRITON_ABOVE_3_4_0", False) \
            and not getattr(utils, "TRITON_ABOVE_3_7_1", True):
        try:
            import tilelang  # noqa: F401
        except Exception:  # noqa: BLE001
            import triton

            return (f"fla's gated delta-rule backward refuses Hopper GPUs with Triton {triton.__version__} "
                    "(fla #640); install tilelang (`pip install tilelang`) or Triton >= 3.7.1 (docs/gpu.md)")
    return None


def _patch(module: torch.nn.Module, fast) -> None:
    original = module.forward

    def forward(self, *args, _orig=original, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if not x.is_cuda:
            return _orig(*args, **kwargs)
        return fast(self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)
    setattr(module, _MARK, True)


def _rms_norm(self, x):
    from fla.modules.norm.layernorm import rms_norm

    return rms_norm(x, 1.0 + self.weight.float(), None, eps=self.eps)


def _rms_norm_gated(self, hidden_states, gate):
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(hidden_states, gate, self.weight, None, activation="swish", eps=self.variance_epsilon)


def _swiglu_mlp(self, x):
    from fla.modules.activations import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _kind(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    if not name.startswith("Qwen3_5") or getattr(module, _MARK, False):
        return None
    if name.endswith("RMSNormGated"):
        return "rms_norm_gated"
    if name.endswith("RMSNorm") and hasattr(module, "eps"):
        return "rms_norm"
    if name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(module.config, "hidden_act", "silu")
        return "swiglu" if act in ("silu", "swish") else None
    if name.endswith("GatedDeltaNet") and getattr(module, "activation", None) in ("silu", "swish"):
        return "causal_conv"
    return None


KINDS = ("gdn", "rms_norm", "rms_norm_gated", "swiglu", "causal_conv")  # `auto`


def parse_kernels(value: str) -> set[str]:
    """`learner.kernels`: auto (all of KINDS), torch (none: PyTorch ops and the PyTorch delta rule),
    or a comma-separated subset of KINDS (ablations; `gdn` is fla's delta-rule kernel)."""
    if value == "auto":
        return set(KINDS)
    if value == "torch":
        return set()
    kinds = {k.strip() for k in value.split(",") if k.strip()}
    bad = sorted(kinds - set(KINDS))
    if bad or not kinds:
        raise ValueError(f"learner.kernels={value!r}: unknown {bad or 'empty list'}; use auto, torch or a comma-separated "
                         f"subset of {', '.join(KINDS)}")
    return kinds


def install_fast_kernels(model: torch.nn.Module, kinds=KINDS) -> dict[str, int]:
    """Switch `model`'s Qwen3.5 norms, SwiGLU MLPs and packed GDN convs (those of `kinds`) to fla's
    fused kernels; without `gdn` in `kinds` packed rows use the PyTorch delta rule. Returns how many
    modules of each kind were switched (empty when fla or CUDA is missing)."""
    if "gdn" in kinds and gdn_problem() is not None:
        kinds = set(kinds) - {"gdn"}
    if "gdn" not in kinds:
        for module in model.modules():
            if type(module).__name__.endswith("GatedDeltaNet"):
                module._qrl_torch_rule = True
    if fla_problem() is not None:
        return {}
    fast = {"rms_norm": _rms_norm, "rms_norm_gated": _rms_norm_gated, "swiglu": _swiglu_mlp}
    counts: dict[str, int] = {"gdn": sum(1 for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))} \
        if "gdn" in kinds else {}
    for module in model.modules():
        kind = _kind(module)
        if kind is None or kind not in kinds:
            continue
        if kind == "causal_conv":  # read by policies/gdn_varlen.varlen_forward
            setattr(module, FAST_CONV, True)
            setattr(module, _MARK, True)
        else:
            _patch(module, fast[kind])
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
