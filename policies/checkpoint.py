"""Qwen3.5 checkpoint layouts: the names weights have on disk, in the learner and on their way to vLLM.

In memory (transformers 5, `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`) the text model is
`model.*` + `lm_head.weight`, and an MoE layer keeps its routed experts fused:
`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
`model.layers.N.mlp.experts.down_proj` [E, H, I] (no `.weight` suffix).

Published checkpoints are saved by the multimodal class (`*ForConditionalGeneration`), so their text
weights sit under `model.language_model.*` next to `model.visual.*` and `mtp.*`. Routed experts are
stored either fused, as in memory (Qwen/Qwen3.5-35B-A3B bf16), or one tensor per expert,
`...mlp.experts.{i}.{gate,up,down}_proj.weight` (the -FP8 checkpoints, many fine-tunes, and what
transformers' `save_pretrained` writes). `Layout` names one such combination; `to_checkpoint_names`
maps one in-memory (name, tensor) to that layout, for saving and for weight sync alike.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_PREFIX = "model.language_model."
EXPERT_LAYOUTS = ("fused", "per_expert")
_FUSED = re.compile(r"^(?P<base>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
# Weights a causal-LM learner is expected not to load from a published checkpoint.
_NOT_LOADED = (r"^model\.visual\.", r"^mtp\.")


@dataclass(frozen=True)
class Layout:
    """prefixed: text weights under `model.language_model.` (multimodal checkpoints and the engines
    that run them); experts: `fused` ([E, ...] tensors, as in memory) or `per_expert`."""
    prefixed: bool = False
    experts: str = "fused"

    def __post_init__(self):
        if self.experts not in EXPERT_LAYOUTS:
            raise ValueError(f"experts={self.experts!r}; use one of {', '.join(EXPERT_LAYOUTS)}")


def to_checkpoint_names(name: str, tensor: torch.Tensor | None, layout: Layout) -> list[tuple[str, torch.Tensor | None]]:
    """One in-memory (transformers) weight as the (name, tensor) pairs `layout` stores it under.
    Pure: per-expert pieces are views of `tensor` (copy them before `tensor` is freed or, under
    ZeRO-3, re-partitioned). `tensor=None` (non-zero ranks) maps the names only when no split is
    needed and otherwise yields a single (name, None)."""
    if layout.prefixed and name.startswith("model.") and not name.startswith(("model.visual.", TEXT_PREFIX)):
        name = TEXT_PREFIX + name[len("model."):]
    m = _FUSED.match(name)
    if m is None or layout.experts == "fused" or tensor is None:
        return [(name, tensor)]
    if tensor.dim() != 3:
        raise ValueError(f"{name}: expected a fused [experts, out, in] tensor, got shape {tuple(tensor.shape)}")
    base = m["base"]
    if m["proj"] == "down_proj":
        return [(f"{base}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    if tensor.shape[1] % 2:
        raise ValueError(f"{name}: gate_up_proj rows {tensor.shape[1]} are not gate + up halves")
    gate, up = tensor.chunk(2, dim=1)
    out = []
    for e in range(tensor.shape[0]):
        out += [(f"{base}.{e}.gate_proj.weight", gate[e]), (f"{base}.{e}.up_proj.weight", up[e])]
    return out


def checkpoint_state_dict(named, layout: Layout) -> dict[str, torch.Tensor]:
    """A whole in-memory state dict (or (name, tensor) iterable) in `layout`."""
    items = named.items() if isinstance(named, dict) else named
    return {k: v for n, t in items for k, v in to_checkpoint_names(n, t, layout)}


# -- which layout an engine expects -------------------------------------------------------------
def _config_dict(path: str) -> dict:
    f = Path(path) / "config.json"
    if f.exists():
        return json.loads(f.read_text())
    from transformers import AutoConfig  # a hub id

    return AutoConfig.from_pretrained(path).to_dict()


def engine_layout(path: str) -> Layout:
    """The names a vLLM engine started from checkpoint `path` accepts for the learner's weights.
    A multimodal Qwen3.5 checkpoint (`*ForConditionalGeneration`) runs as vLLM's multimodal class,
    which needs `model.language_model.*`; the text classes take either prefix. vLLM's Qwen3.5 MoE
    loader takes fused experts as they are (measured: bit-identical to per-expert tensors)."""
    cfg = _config_dict(path)
    multimodal = any(a.endswith("ForConditionalGeneration") for a in cfg.get("architectures") or [])
    return Layout(prefixed=multimodal and str(cfg.get("model_type", "")).startswith("qwen3_5"))


def layout_of(folder: str | Path) -> Layout:
    """The layout a checkpoint folder's safetensors are stored in (by their names)."""
    names = [n for n in saved_names(folder) if not n.startswith(("mtp.", "model.visual."))]
    prefixed = any(n.startswith(TEXT_PREFIX) for n in names)
    per_expert = any(re.search(r"\.mlp\.experts\.\d+\.", n) for n in names)
    return Layout(prefixed=prefixed, experts="per_expert" if per_expert else "fused")


def saved_names(folder: str | Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    return names


# -- learner loading ---------------------------------------------------------------------------
def check_loading_info(path: str, info: dict, model) -> None:
    """Fail naming the weights a load left at their random init (missing) or could not place
    (unexpected, shape-mismatched): transformers only logs them. `info` is from_pretrained's
    `output_loading_info`. A multimodal checkpoint's vision tower and MTP head are expected leftovers."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not any(re.match(p, k) for p in _NOT_LOADED))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        def head(keys):
            return f"{len(keys)} [{', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}]"

        raise ValueError(
            f"loading {path!r} into {type(model).__name__} would leave weights at random init: missing {head(missing)}, "
            f"unexpected {head(unexpected)}, shape-mismatched {head(mismatched)}. The checkpoint's tensor names do not "
            "match the model: check config.json (architectures, model_type) against the safetensors names; the "
            "supported layouts are in docs/qwen3_5.md (Checkpoint layouts)"
        )


# -- saving (tests and conversions) ------------------------------------------------------------
def save_in_layout(model, folder: str | Path, layout: Layout, *, multimodal: bool = False, mtp: bool = False,
                   tokenizer=None) -> Path:
    """Save a transformers causal LM (Qwen3.5 dense or MoE) as a published checkpoint would be:
    text weights in `layout`; `multimodal`: the multimodal config.json (`*ForConditionalGeneration`,
    text_config + a tiny vision_config) and `model.visual.*` weights of a random tiny vision tower;
    `mtp`: a few `mtp.*` tensors (multi-token prediction head), which loaders must skip."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))}
    out = checkpoint_state_dict(sd, layout)
    cfg = model.config
    if multimodal:
        cfg, visual = _multimodal_config_and_vision(model)
        out.update({f"model.visual.{k}": v for k, v in visual.items()})
    if mtp:
        out.update(_mtp_weights(model.config, layout))
    out = {k: v.detach().contiguous().clone() for k, v in out.items()}
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in out.values())},
         "weight_map": {k: "model.safetensors" for k in sorted(out)}}, indent=1))
    cfg.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def _multimodal_config_and_vision(model):
    """The multimodal config wrapping `model.config` as text_config, and a tiny vision tower's weights."""
    import transformers

    text = model.config
    moe = "moe" in text.model_type
    stem = "Qwen3_5Moe" if moe else "Qwen3_5"
    vision_cfg = getattr(transformers, f"{stem}VisionConfig")(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=64, out_hidden_size=text.hidden_size)
    cfg = getattr(transformers, f"{stem}Config")(
        text_config=text.to_dict(), vision_config=vision_cfg.to_dict(), tie_word_embeddings=text.tie_word_embeddings)
    cfg.architectures = [f"{stem}ForConditionalGeneration"]
    torch.manual_seed(0)
    vision = getattr(transformers, f"{stem}VisionModel")._from_config(vision_cfg, dtype=torch.float32)
    return cfg, vision.state_dict()


def _mtp_weights(cfg, layout: Layout) -> dict[str, torch.Tensor]:
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    out = {"mtp.fc.weight": torch.randn(h, 2 * h, generator=g), "mtp.norm.weight": torch.zeros(h),
           "mtp.pre_fc_norm_hidden.weight": torch.zeros(h), "mtp.pre_fc_norm_embedding.weight": torch.zeros(h)}
    if getattr(cfg, "num_experts", 0):  # Qwen3.5 MoE's MTP layer stores its experts per expert
        i = cfg.moe_intermediate_size
        for e in range(cfg.num_experts):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                out[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g)
    return out
