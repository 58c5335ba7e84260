"""LoRA (learner.lora) vs full fine-tuning: trainable parameters, weight-sync bytes, learner step time.

Step time: the DeepSpeed learner (ZeRO-2, fp32, 1 rank, in-process) trains on a synthetic batch
shaped like the default run's (256 sequences, 36 prompt + 4 policy tokens; 64 for the ~25M model);
median of the steps after the first. Sync bytes: what `push_weights` sends (tiny: measured from the
learner; Qwen3.5-0.8B shape: computed on a meta-device model in bf16, the GPU learner's dtype).

    .venv/bin/python bench/lora.py            # writes bench/results/lora.{json,md}
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.build import resolve_policy_path  # noqa: E402
from policies.lora import LoraConfig, apply_lora, num_params, sync_modules  # noqa: E402
from policies.tiny import TinySpec  # noqa: E402
from common.net import free_port  # noqa: E402
from rl.learner import Learner  # noqa: E402
from rl.settings import algo_settings, learner_settings
from rollout.trajectory import Trajectory, collate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RANK = 8
CASES = {  # name: (TinySpec overrides, sequences, timed steps)
    "tiny (default config)": ({}, 256, 6),
    "qwen3_5 ~25M params": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                 head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                                 initializer_range=0.02), 64, 3),
}


def batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for _ in range(n):
        t = Trajectory(prompt_ids=torch.randint(3, 60, (36,), generator=g).tolist())
        t.add_policy_tokens(torch.randint(3, 60, (4,), generator=g).tolist(), [0.0] * 4, 0)
        trajs.append(t)
    b = collate(trajs, 0)
    b["advantages"] = torch.randn(b["loss_mask"].shape, generator=g) * b["loss_mask"]
    return b


def measure(path: str, n: int, steps: int) -> dict:
    """Full fine-tuning and LoRA learners on the same batch, their steps interleaved (this machine's
    load varies: other processes share its 2 cores)."""
    learners = {name: Learner(path, learner_settings(micro_batch_size=64, lr=1e-3, zero_stage=2, lora=lora),
                              algo_settings(), 0, 1, "127.0.0.1", free_port(), n)
                for name, lora in [("full", LoraConfig()), ("lora", LoraConfig(rank=RANK))]}
    b = batch(n)
    times = {name: [] for name in learners}
    for _ in range(steps + 1):
        for name, learner in learners.items():
            t0 = time.perf_counter()
            learner.train(b)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, learner in learners.items():
        sync = [t for _, t in learner.iter_hf_weights(sync=True)]
        out[name] = {"train_step_s": min(times[name][1:]), "median_step_s": statistics.median(times[name][1:]),
                     "step_times_s": times[name][1:],
                     "trainable": num_params(learner.engine.module)["trainable"],
                     "sync_bytes": sum(t.numel() * t.element_size() for t in sync), "sync_tensors": len(sync)}
    return out


ATTN_ONLY = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def qwen3_5_0_8b(targets: list[str] | None = None) -> dict:
    """Counts for the Qwen3.5-0.8B text shape (bench/gpu_broadcast.py), LoRA rank 8 (default targets)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                            linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                            tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    full = sum(p.numel() for p in model.parameters()) * 2
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoraConfig(rank=RANK, **({"target_modules": targets} if targets else {})))
    mods = dict(model.named_modules())
    sent = sum(mods[m].get_base_layer().weight.numel() if hasattr(mods[m], "get_base_layer") else mods[m].weight.numel()
               for m in sync_modules(model))
    return {"params": total, "trainable": num_params(model)["trainable"], "full_sync_bytes": full,
            "lora_sync_bytes": sent * 2, "sync_tensors": len(sync_modules(model))}


def main() -> None:
    out = {"rank": RANK, "cases": {}}
    with tempfile.TemporaryDirectory() as cache:
        for name, (over, n, steps) in CASES.items():
            path = resolve_policy_path("tiny:default", asdict(TinySpec(**over)), cache)
            out["cases"][name] = {"sequences": n, **measure(path, n, steps)}
            print(name, out["cases"][name], flush=True)
    out["qwen3_5_0_8b"] = q = qwen3_5_0_8b()
    out["qwen3_5_0_8b_attention_only"] = qa = qwen3_5_0_8b(ATTN_ONLY)
    print("0.8B", q, qa)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(out, indent=1))
    write_md(out)


def write_md(out: dict) -> None:
    q, qa = out["qwen3_5_0_8b"], out["qwen3_5_0_8b_attention_only"]
    rows = ["# LoRA vs full fine-tuning (rank 8, alpha 16, default target modules)", "",
            "Command: `.venv/bin/python bench/lora.py` (2-core CPU, DeepSpeed ZeRO-2 fp32, 1 rank)", "",
            "| model | trainable full | trainable LoRA | learner step full s (min / median) | learner step LoRA s (min / median) | sync MB full | sync MB LoRA |",
            "|---|---|---|---|---|---|---|"]
    for name, c in out["cases"].items():
        f, l = c["full"], c["lora"]
        rows.append(f"| {name}, {c['sequences']} seqs | {f['trainable']:,} | {l['trainable']:,} | "
                    f"{f['train_step_s']:.2f} / {f['median_step_s']:.2f} | {l['train_step_s']:.2f} / {l['median_step_s']:.2f} | "
                    f"{f['sync_bytes'] / 1e6:.2f} | {l['sync_bytes'] / 1e6:.2f} |")
    rows.append(f"| Qwen3.5-0.8B shape (computed, bf16) | {q['params']:,} | {q['trainable']:,} | - | - | "
                f"{q['full_sync_bytes'] / 1e6:.0f} | {q['lora_sync_bytes'] / 1e6:.0f} |")
    rows.append(f"| Qwen3.5-0.8B shape, attention + GDN projections only | {qa['params']:,} | {qa['trainable']:,} | - | - | "
                f"{qa['full_sync_bytes'] / 1e6:.0f} | {qa['lora_sync_bytes'] / 1e6:.0f} |")
    rows += ["", "Learner step: forward + backward + optimizer over the batch, the two learners' steps interleaved; min and "
             "median of the steps after the first (the machine was shared: load average 4-7 on 2 cores, so expect "
             "+-20%); "
             "sync MB: what one `push_weights` sends (learner dtype: fp32 here, bf16 for the 0.8B rows).",
             "", "LoRA syncs send merged W + (alpha/rank)·B·A for the adapted modules and their vLLM-fused siblings "
             "only; embeddings, norms, conv1d, A_log/dt_bias and GDN's in_proj_b/in_proj_a stay as loaded."]
    (RESULTS / "lora.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
