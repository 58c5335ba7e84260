"""Tiny random-weight Qwen3.5 (hybrid Gated DeltaNet) and Qwen3 models, saved as HF checkpoint folders.

Shapes respect vLLM CPU's limits: linear-attention head dims 64, full-attention head dim 32/64.
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
    family: str = "qwen3_5"  # qwen3_5 | qwen3_5_moe | qwen3
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
    # qwen3_5_moe: every layer's MLP is a sparse MoE block (softmax top-k over routed experts, plus one
    # shared expert behind a sigmoid gate), as in Qwen3.5-35B-A3B (256 experts, top-8, 512 and 512)
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32

    def fingerprint(self) -> str:
        from policies.tokenizer import TOKENIZER_VERSION

        d = asdict(self)
        if self.family != "qwen3_5_moe":  # the MoE fields: not in other families' cache keys
            for k in MOE_FIELDS:
                del d[k]
        return json.dumps({**d, "tokenizer_version": TOKENIZER_VERSION}, sort_keys=True)


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def make_config(spec: TinySpec, vocab_size: int, eos_id: int, pad_id: int):
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
        raise ValueError(f"unknown tiny model family {spec.family!r}; use 'qwen3_5', 'qwen3_5_moe' or 'qwen3'")
    return cfg


def build_tiny_checkpoint(folder: str | Path, spec: TinySpec | None = None) -> Path:
    """Write tokenizer + random-init model (fp32 safetensors) + config into `folder`."""
    from transformers import AutoModelForCausalLM

    spec = spec or TinySpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(folder, spec.tokenizer)
    cfg = make_config(spec, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "tiny_spec.json").write_text(spec.fingerprint())
    return folder
