"""Tiny Qwen3.5 MoE (`policy=tiny_qwen3_5_moe`): the model is a real Qwen3_5MoeForCausalLM, and a
training run goes end to end through the CLI (vLLM CPU bf16 engine, DeepSpeed learner, weight sync)."""
import math
from dataclasses import asdict

import torch
import yaml

from policies.tiny import TinySpec
from tests.conftest import REPO


def test_tiny_moe_is_a_qwen3_5_moe_with_shared_expert(tmp_path):
    from transformers import AutoModelForCausalLM

    from policies.build import resolve_policy_path

    tiny = yaml.safe_load((REPO / "conf" / "policy" / "tiny_qwen3_5_moe.yaml").read_text())["tiny"]
    spec = TinySpec(**tiny)
    model = AutoModelForCausalLM.from_pretrained(resolve_policy_path("tiny:default", asdict(spec), tmp_path),
                                                 dtype=torch.float32)
    cfg = model.config
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM" and cfg.model_type == "qwen3_5_moe_text"
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.linear_key_head_dim, cfg.linear_value_head_dim) == (4, 2, 64, 64)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for i in range(4):  # every layer's MLP is the sparse block, routed experts fused in memory
        assert shapes[f"model.layers.{i}.mlp.experts.gate_up_proj"] == (4, 2 * 32, 64)
        assert shapes[f"model.layers.{i}.mlp.experts.down_proj"] == (4, 64, 32)
        assert shapes[f"model.layers.{i}.mlp.gate.weight"] == (4, 64)
        assert shapes[f"model.layers.{i}.mlp.shared_expert.up_proj.weight"] == (32, 64)
        assert shapes[f"model.layers.{i}.mlp.shared_expert_gate.weight"] == (1, 64)
    # the MoE fields do not enter other families' cache keys
    assert TinySpec().fingerprint() == TinySpec(num_experts=8).fingerprint()
    assert spec.fingerprint() != TinySpec(**{**tiny, "num_experts": 8}).fingerprint()


def test_tiny_moe_trains_end_to_end(train):
    """2 steps: finite reward and loss, gradients flow, and after each sync the engine's sampling
    logprobs agree with the learner's (a broken expert sync showed mismatch/kl 0.33 here)."""
    metrics = train("policy=tiny_qwen3_5_moe", "steps=2", "rollout.prompts_per_step=8", "rollout.group_size=4",
                    "learner.micro_batch_size=32", "eval.every=0")
    assert [m["policy/version"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["reward/mean"]) and math.isfinite(m["train/loss"]), m
        assert m["train/grad_norm"] > 0 and m["train/policy_tokens"] > 0
        assert m["sync/bytes"] > 0 and m["env/failed_episodes"] == 0
        assert m["mismatch/kl"] < 0.05, m  # engine (bf16) vs learner (fp32) on the same weights
