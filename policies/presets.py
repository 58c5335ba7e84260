"""Published Qwen3.5 dense checkpoint shapes (`policy=qwen3_5_0_8b|2b|4b|9b`): one home for the
shapes, their published parameter counts and sources, a meta-device model builder for benches, and
the start-up check that a checkpoint folder matches the preset that names it.

Sources (no model hub here; values read from public code that transcribes the config.json files):
  [slime]    THUDM/slime scripts/models/qwen3.5-0.8B.sh; radixark/miles scripts/models/qwen3.5-{4B,9B}.sh;
             K1XE/BPM scripts/models/qwen3.5-2B.sh (Megatron args: layers, hidden, ffn, heads, kv heads,
             kv-channels 256, rotary-percent 0.25, rotary-base 1e7, untied embeddings only for 9B)
  [omegalax] p-doom/omegalax omegalax/models/qwen3_5/config.py (per size: text shape,
             linear_num_value_heads, tie_word_embeddings, vision_config)
  [fixtures] Qwen3.5-9B config.json (text_config + vision_config + index total_size 19,306,216,416 B)
             and Qwen3.5-2B(-Base) config.json transcribed as test fixtures in public repos:
             linear key heads 16, linear head dims 128, conv 4, max_position_embeddings 262144,
             rope_parameters {rope_theta 1e7, partial_rotary_factor 0.25, mrope_section [11, 11, 10],
             mrope_interleaved true}
  [gguf]     llama.cpp `llama-bench` params of the official checkpoints' GGUF (text tower, no vision,
             no MTP): 752.39 M, 1.88 B, 4.21 B; 8.95 B for the 9B (llama.cpp metadata)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ModelShape:
    """The text model's architecture, as in config.json (`text_config`). Size-specific fields have no
    default; the others default to the values every dense Qwen3.5 size shares."""
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    intermediate_size: int = MISSING
    linear_num_value_heads: int = MISSING
    tie_word_embeddings: bool = MISSING
    full_attention_interval: int = 4  # layer_types: every 4th layer full attention, the rest Gated DeltaNet
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    vocab_size: int = 248320
    max_position_embeddings: int = 262144
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: List[int] = field(default_factory=lambda: [11, 11, 10])

    def layer_types(self) -> List[str]:
        k = self.full_attention_interval
        return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(self.num_hidden_layers)]

    def text_config(self):
        """A transformers `Qwen3_5TextConfig` with these shapes."""
        from transformers import Qwen3_5TextConfig

        skip = {"rope_theta", "partial_rotary_factor", "mrope_section"}
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": list(self.mrope_section), "mrope_interleaved": True}
        return Qwen3_5TextConfig(layer_types=self.layer_types(), rope_parameters=rope, **kw)


@dataclass(frozen=True)
class VisionShape:
    """The vision tower (config.json `vision_config`); recorded for reference, not checked at start."""
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # = the text hidden size
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304


@dataclass(frozen=True)
class Preset:
    hub_id: str
    shape: ModelShape
    vision: VisionShape
    text_params: int  # published parameter count of the text model (no vision tower, no MTP head) [gguf]
    sources: str


PRESETS: Dict[str, Preset] = {
    "qwen3_5_0_8b": Preset(
        "Qwen/Qwen3.5-0.8B",
        ModelShape(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=3584, linear_num_value_heads=16, tie_word_embeddings=True),
        VisionShape(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024),
        text_params=752_390_000, sources="slime, omegalax, fixtures, gguf"),
    "qwen3_5_2b": Preset(
        "Qwen/Qwen3.5-2B",
        ModelShape(hidden_size=2048, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=6144, linear_num_value_heads=16, tie_word_embeddings=True),
        VisionShape(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048),
        text_params=1_880_000_000, sources="slime (K1XE/BPM), omegalax, fixtures (2B-Base config.json), gguf"),
    "qwen3_5_4b": Preset(
        "Qwen/Qwen3.5-4B",
        ModelShape(hidden_size=2560, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=9216, linear_num_value_heads=32, tie_word_embeddings=True),
        VisionShape(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560),
        text_params=4_210_000_000, sources="slime (radixark/miles), omegalax, gguf"),
    "qwen3_5_9b": Preset(
        "Qwen/Qwen3.5-9B",
        ModelShape(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=12288, linear_num_value_heads=32, tie_word_embeddings=False),
        VisionShape(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096),
        text_params=8_950_000_000, sources="slime (radixark/miles), omegalax, fixtures (9B config.json), gguf"),
}
# The 9B checkpoint's safetensors index: 19,306,216,416 bytes of bf16 = text + vision + one MTP layer.
QWEN3_5_9B_CHECKPOINT_PARAMS = 19_306_216_416 // 2


def meta_model(shape: ModelShape | str, vision: bool = False):
    """A meta-device (no memory) transformers model of `shape` or a preset name: `Qwen3_5ForCausalLM`,
    or with `vision` the full `Qwen3_5ForConditionalGeneration` (preset names only). For benches."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    preset = PRESETS[shape] if isinstance(shape, str) else None
    s = preset.shape if preset else shape
    with torch.device("meta"):
        if not vision:
            return Qwen3_5ForCausalLM(s.text_config())
        if preset is None:
            raise ValueError("meta_model(vision=True) needs a preset name (the vision shape lives in PRESETS)")
        v = {k: getattr(preset.vision, k) for k in preset.vision.__dataclass_fields__}
        cfg = Qwen3_5Config(text_config=s.text_config().to_dict(), vision_config=v, tie_word_embeddings=s.tie_word_embeddings)
        return Qwen3_5ForConditionalGeneration(cfg)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- start-up check
def local_config_json(path: str) -> Optional[Path]:
    """config.json of a checkpoint folder, or of a hub id already in the local HF cache; else None."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    if path.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 - an odd cache or id just means "not available locally"
            return None
        return Path(hit) if isinstance(hit, str) else None
    return None


def checkpoint_shape(config_json: Path) -> Dict[str, object]:
    """The ModelShape fields as the checkpoint's config.json sets them (transformers fills defaults;
    multimodal configs are read through their `text_config`). Fields it lacks are absent."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(config_json.parent))
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad json: report, don't crash on it
        raw = json.loads(config_json.read_text())
        return {"model_type": raw.get("model_type", f"<unreadable: {e}>")}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    out: Dict[str, object] = {"model_type": getattr(text, "model_type", None)}
    for f in fields(ModelShape):
        if hasattr(text, f.name):
            out[f.name] = getattr(text, f.name)
    out["tie_word_embeddings"] = getattr(cfg, "tie_word_embeddings", out.get("tie_word_embeddings"))
    rope = getattr(text, "rope_parameters", None) or {}
    for k in ("rope_theta", "partial_rotary_factor", "mrope_section"):
        if k in rope:
            out[k] = rope[k]
    types = getattr(text, "layer_types", None)
    if isinstance(types, (list, tuple)):
        out["layer_types"] = list(types)
        if "full_attention_interval" not in out:  # transformers keeps only layer_types: derive the interval
            k = types.index("full_attention") + 1 if "full_attention" in types else 0
            periodic = k and all((t == "full_attention") == ((i + 1) % k == 0) for i, t in enumerate(types))
            out["full_attention_interval"] = k if periodic else "irregular"
    return out


def shape_mismatches(shape: ModelShape, ckpt: Dict[str, object]) -> List[str]:
    """'field: preset X, checkpoint Y' for every field where the checkpoint differs from `shape`."""
    out = []
    if ckpt.get("model_type") != "qwen3_5_text":
        out.append(f"model_type: preset qwen3_5_text (dense Qwen3.5), checkpoint {ckpt.get('model_type')}")
    for f in fields(ModelShape):
        want, got = getattr(shape, f.name), ckpt.get(f.name, "<missing>")
        if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
            same = abs(want - got) <= 1e-9 * max(1.0, abs(want))
        else:
            same = (list(want) == list(got)) if isinstance(want, list) and isinstance(got, (list, tuple)) else want == got
        if not same:
            out.append(f"{f.name}: preset {want}, checkpoint {got}")
    if "layer_types" in ckpt and ckpt["layer_types"] != shape.layer_types():
        n_full = sum(t == "full_attention" for t in ckpt["layer_types"])
        out.append(f"layer_types: preset {shape.num_hidden_layers - shape.num_hidden_layers // shape.full_attention_interval} "
                   f"linear / {shape.num_hidden_layers // shape.full_attention_interval} full, checkpoint "
                   f"{len(ckpt['layer_types']) - n_full} linear / {n_full} full")
    return out


def matching_preset(ckpt: Dict[str, object]) -> Optional[str]:
    return next((name for name, p in PRESETS.items() if not shape_mismatches(p.shape, ckpt)), None)


def check_checkpoint_shape(path: str, shape: Optional[ModelShape]) -> None:
    """Fail when `policy.shape` is set and the checkpoint's config.json (available locally) differs,
    naming every mismatching field and the preset that would match. Hub ids not yet downloaded are
    not checked (no network here)."""
    if shape is None:
        return
    cj = local_config_json(path)
    if cj is None:
        return
    ckpt = checkpoint_shape(cj)
    bad = shape_mismatches(shape, ckpt)
    if not bad:
        return
    name = next((n for n, p in PRESETS.items() if p.shape == shape), None)
    fits = matching_preset(ckpt)
    fixes = [f"use policy={fits} (it matches this checkpoint)"] if fits else []
    fixes.append(f"point policy.path at {PRESETS[name].hub_id} or a folder of it" if name else
                 "point policy.path at a checkpoint of that shape")
    raise ValueError(
        f"policy.path={path!r} does not match {'policy=' + name if name else 'policy.shape'}: "
        f"{len(bad)} field(s) differ ({'; '.join(bad)}). Fix: {', or '.join(fixes)}, "
        "or set policy.shape=null to skip this check"
    )
