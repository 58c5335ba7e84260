"""Tiny random-weight Qwen3.5 (hybrid Gated DeltaNet), Qwen3.5 vision-language and Qwen3 models, saved
as HF checkpoint folders.

Shapes respect vLLM CPU's limits: linear-attention head dims 64, full-attention head dim 32/64.
The vision-language family (`qwen3_5_vl`, `Qwen3_5ForConditionalGeneration`) also saves what vLLM and
transformers need to process images: the processor (image/video processor configs) and the tokenizer
with Qwen's vision tokens and an image-aware chat template.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from policies.tokenizer import save_tokenizer


@dataclass
class TinySpec:
    family: str = "qwen3_5"  # qwen3_5 | qwen3_5_moe | qwen3_5_vl (vision-language) | qwen3
    tokenizer: str = "char"  # char (small action space, for learning tests) | byte
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 1
    linear_num_value_heads: int = 2
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    full_attention_interval: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.1
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # any other config.json fields
    vision: Dict[str, Any] = field(default_factory=dict)  # qwen3_5_vl: overrides of VISION_DEFAULTS
    # qwen3_5_moe: every layer's MLP is a sparse MoE block (softmax top-k over routed experts, plus one
    # shared expert behind a sigmoid gate), as in Qwen3.5-35B-A3B (256 experts, top-8, 512 and 512)
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32

    def fingerprint(self) -> str:
        from policies.tokenizer import TOKENIZER_VERSION

        d = asdict(self)
        if not d["vision"]:  # text families: the same cache key as before the field existed
            del d["vision"]
        if self.family != "qwen3_5_moe":  # likewise for the MoE fields
            for k in MOE_FIELDS:
                del d[k]
        return json.dumps({**d, "tokenizer_version": TOKENIZER_VERSION}, sort_keys=True)


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")

# Tiny vision tower: 8-pixel patches, 2x2 merge, so a 32x32 image is 4 tokens. Keys are
# Qwen3_5VisionConfig fields, plus the image processor's pixel bounds (min/max_pixels).
VISION_DEFAULTS: Dict[str, Any] = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, temporal_patch_size=2,
    spatial_merge_size=2, num_position_embeddings=64, min_pixels=16 * 16, max_pixels=64 * 64,
)


def make_config(spec: TinySpec, vocab_size: int, eos_id: int, pad_id: int, vision_token_ids: dict | None = None):
    """`vision_token_ids` (qwen3_5_vl only): the tokenizer's id of each of VISION_TOKENS."""
    if spec.family == "qwen3_5_vl" and not vision_token_ids:
        raise ValueError("the qwen3_5_vl family needs vision_token_ids (the tokenizer's ids of VISION_TOKENS)")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        **spec.extra,
    )
    if spec.family == "qwen3_5_vl":
        return _vl_config(spec, common, vision_token_ids)
    if spec.family in ("qwen3_5", "qwen3_5_moe"):
        from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

        n = spec.num_hidden_layers
        k = spec.full_attention_interval
        layer_types = ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
        moe = spec.family == "qwen3_5_moe"
        if moe:
            del common["intermediate_size"]  # no dense MLP: experts only
            common.update({f: getattr(spec, f) for f in MOE_FIELDS})
        cfg = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(
            layer_types=layer_types,
            linear_num_key_heads=spec.linear_num_key_heads,
            linear_num_value_heads=spec.linear_num_value_heads,
            linear_key_head_dim=spec.linear_key_head_dim,
            linear_value_head_dim=spec.linear_value_head_dim,
            full_attention_interval=k,
            **common,
        )
        cfg.architectures = ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"]
    elif spec.family == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(**common)
        cfg.architectures = ["Qwen3ForCausalLM"]
    else:
        raise ValueError(f"unknown tiny model family {spec.family!r}; use 'qwen3_5', 'qwen3_5_moe', 'qwen3_5_vl' or 'qwen3'")
    return cfg


def _mrope_section(rotary_dim: int) -> list[int]:
    """Split rotary_dim/2 frequencies over (t, h, w) as Qwen does (64 -> [11, 11, 10])."""
    n = rotary_dim // 2
    base, rem = divmod(n, 3)
    return [base + (rem > 0), base + (rem > 1), base]


def _vision_settings(spec: TinySpec) -> dict:
    unknown = set(spec.vision) - set(VISION_DEFAULTS)
    if unknown:
        raise ValueError(f"policy.tiny.vision has unknown keys {sorted(unknown)}; known: {sorted(VISION_DEFAULTS)}")
    return {**VISION_DEFAULTS, **spec.vision}


def _vl_config(spec: TinySpec, common: dict, ids: dict):
    """Qwen3_5Config: the Qwen3.5 text stack with interleaved multimodal RoPE, plus a tiny vision tower."""
    from policies.tokenizer import VISION_TOKENS
    from transformers import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig

    n, k = spec.num_hidden_layers, spec.full_attention_interval
    partial = 0.25
    text = Qwen3_5TextConfig(
        layer_types=["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)],
        linear_num_key_heads=spec.linear_num_key_heads, linear_num_value_heads=spec.linear_num_value_heads,
        linear_key_head_dim=spec.linear_key_head_dim, linear_value_head_dim=spec.linear_value_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": partial,
                         "mrope_section": _mrope_section(int(spec.head_dim * partial)), "mrope_interleaved": True},
        **common,
    )
    v = {key: val for key, val in _vision_settings(spec).items() if key not in ("min_pixels", "max_pixels")}
    vision = Qwen3_5VisionConfig(out_hidden_size=spec.hidden_size, initializer_range=spec.initializer_range, **v)
    cfg = Qwen3_5Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=spec.tie_word_embeddings,
        **dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   (ids[t] for t in VISION_TOKENS))),
    )
    cfg.architectures = ["Qwen3_5ForConditionalGeneration"]
    return cfg


def save_processor(folder: str | Path, spec: TinySpec, tokenizer) -> None:
    """Qwen3-VL processor (Qwen2-VL image processor + Qwen3-VL video processor + the tokenizer), as
    vLLM and transformers load it for Qwen3.5 (AutoProcessor of model_type qwen3_5)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    v = _vision_settings(spec)
    shape = dict(patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                 merge_size=v["spatial_merge_size"])
    size = {"shortest_edge": v["min_pixels"], "longest_edge": v["max_pixels"]}
    image = Qwen2VLImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3, **shape)
    video = Qwen3VLVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3, **shape)
    proc = Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=tokenizer.chat_template)
    proc.save_pretrained(str(folder))


def build_tiny_checkpoint(folder: str | Path, spec: TinySpec | None = None) -> Path:
    """Write tokenizer + random-init model (fp32 safetensors) + config into `folder`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    spec = spec or TinySpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vl = spec.family == "qwen3_5_vl"
    tok = save_tokenizer(folder, spec.tokenizer, vision=vl)
    if vl:
        from policies.tokenizer import VISION_TOKENS

        cfg = make_config(spec, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          vision_token_ids={t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS})
        save_processor(folder, spec, tok)
    else:
        cfg = make_config(spec, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    torch.manual_seed(spec.seed)
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "tiny_spec.json").write_text(spec.fingerprint())
    return folder
