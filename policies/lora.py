"""LoRA for the learner (peft): adapters on the decoder's linear layers, and the weights the rollout
engines get instead of adapters: merged W + scale·B·A under the base model's HF checkpoint names.

vLLM reloads weights layer by layer and fuses some HF modules into one layer (q/k/v -> qkv_proj,
gate/up -> gate_up_proj, GDN in_proj_qkv/in_proj_z -> in_proj_qkvz, in_proj_b/in_proj_a ->
in_proj_ba). A layer that gets only some of its checkpoint tensors is rebuilt from uninitialised
memory for the rest, so a sync sends every adapted module together with its fused siblings
(`PACKED`), and nothing else: the frozen rest of the engine keeps its weights.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

ADAPTER = "default"  # peft's adapter name

# target_modules=null: these, where the model has them: every linear layer of both Qwen3.5 layer
# types (Gated DeltaNet, full attention) and the MLP (so Qwen3 gets its attention + MLP ones).
# GDN's in_proj_b / in_proj_a (one output per value head) are valid targets too, but rarely useful.
DEFAULT_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj"]

# vLLM layer -> the HF modules loaded into it (as in vLLM's `packed_modules_mapping` for Qwen3 and
# Qwen3.5; tests/test_lora.py checks this against vLLM's).
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"), "in_proj_ba": ("in_proj_b", "in_proj_a")}
_SIBLINGS = {m: group for group in PACKED.values() for m in group}


@dataclass
class LoraConfig:
    """`learner.lora`: rank 0 trains the full model; rank > 0 trains only LoRA adapters."""
    rank: int = 0
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # module names, e.g. [q_proj, in_proj_qkv]; null: DEFAULT_TARGETS


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Full name -> nn.Linear for every linear layer of the text decoder (not the LM head, not a
    vision tower)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    out = {}
    for name, mod in decoder.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[f"{prefix}.{name}" if prefix else name] = mod
    return out


def resolve_targets(model: torch.nn.Module, targets: list[str] | None) -> list[str]:
    """Full module names of the decoder's linear layers named in `targets` (last name component,
    e.g. "q_proj"; None: those of DEFAULT_TARGETS the model has); an unknown name raises with the
    valid ones."""
    linears = _decoder_linears(model)
    valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if targets is None:
        targets = [t for t in DEFAULT_TARGETS if t in valid]
    bad = [t for t in targets if t not in valid]
    if bad or not targets:
        raise ValueError(f"learner.lora.target_modules={list(targets)}: {bad or 'empty'} not among this model's "
                         f"linear layers; valid names: {', '.join(valid)}")
    return [n for n in linears if n.rsplit(".", 1)[-1] in targets]


def check_targets(model_path: str, targets: list[str] | None) -> None:
    """Fail fast (before Ray starts) on target names the checkpoint's decoder does not have."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    resolve_targets(model, targets)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA adapters into `model` in place (it keeps its class, so `model.model(...)` and
    `get_output_embeddings()` work as before) and freeze everything else. Returns the adapted
    module names."""
    if cfg.rank <= 0:
        raise ValueError(f"learner.lora.rank={cfg.rank}: use a positive rank (0 turns LoRA off)")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = resolve_targets(model, None if cfg.target_modules is None else list(cfg.target_modules))
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                              bias="none")
    get_peft_model(model, peft_cfg)  # injects into `model` itself; the PeftModel wrapper is not needed
    for n, p in model.named_parameters():
        if p.requires_grad != ("lora_" in n):
            raise RuntimeError(f"LoRA: parameter {n} has requires_grad={p.requires_grad}")
    return names


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def num_params(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (ZeRO-3 aware)."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    return {"trainable": sum(numel(p) for p in model.parameters() if p.requires_grad),
            "total": sum(numel(p) for p in model.parameters())}


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + scale·B·A of one LoRA layer, computed in fp32 and returned in W's dtype."""
    if layer.fan_in_fan_out or layer.use_dora.get(ADAPTER, False):
        raise NotImplementedError("LoRA sync supports plain LoRA on nn.Linear (no DoRA, no fan_in_fan_out)")
    w = layer.get_base_layer().weight
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    return (w.float() + (b.float() @ a.float()) * layer.scaling[ADAPTER]).to(w.dtype)


def sync_modules(model: torch.nn.Module) -> list[str]:
    """HF module names a sync sends: every adapted module and its vLLM-fused siblings."""
    linears = set(lora_layers(model)) | set(_decoder_linears_unwrapped(model))
    out = []
    for name in lora_layers(model):
        parent, leaf = name.rsplit(".", 1)
        for sib in _SIBLINGS.get(leaf, (leaf,)):
            full = f"{parent}.{sib}"
            if full in linears and full not in out:
                out.append(full)
    return out


def _decoder_linears_unwrapped(model: torch.nn.Module) -> list[str]:
    """Decoder linear layers that are not LoRA internals (base_layer / lora_A / lora_B)."""
    return [n for n in _decoder_linears(model) if not re.search(r"\.(base_layer|lora_[AB]\.\w+)$", n)]


def iter_hf_weights(model: torch.nn.Module, gather: Callable | None = None, emit: bool = True,
                    sync_only: bool = False, copy: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(HF checkpoint name, tensor) of a LoRA-injected model: adapted modules merged, no peft names.
    `sync_only`: only what a weight sync sends (`sync_modules`); else the whole model (for export).
    `gather(params)` is a context manager that makes them whole (ZeRO-3); every rank must iterate,
    and only ranks with `emit` get tensors (others get None). copy=False: tensors stay on their
    device and may be the (gathered) parameter itself: consume each before the next."""

    def out(t):
        return t.detach().to("cpu", copy=True) if copy else t.detach()

    gather = gather or (lambda params: nullcontext())
    layers = lora_layers(model)
    wanted = set(sync_modules(model)) if sync_only else None
    inside = tuple(f"{n}." for n in layers)
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(inside):
            continue  # base_layer / lora_A / lora_B of a LoRA layer: handled with the layer
        if mod_name in layers:
            if wanted is not None and mod_name not in wanted:
                continue
            base = mod.get_base_layer()
            with gather(list(mod.parameters())):
                yield f"{mod_name}.weight", (out(merged_weight(mod)) if emit else None)
                if base.bias is not None:
                    yield f"{mod_name}.bias", (out(base.bias) if emit else None)
            continue
        if wanted is not None and mod_name not in wanted:
            continue
        params = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        with gather([p for _, p in params]):
            for n, p in params:
                seen.add(id(p))
                yield (f"{mod_name}.{n}" if mod_name else n), (out(p) if emit else None)
