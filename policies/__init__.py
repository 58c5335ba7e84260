"""Policies: model/tokenizer building (tiny test models, Qwen3.5 presets, real checkpoints)."""
from policies.build import resolve_policy_path, load_tokenizer

__all__ = ["resolve_policy_path", "load_tokenizer"]
