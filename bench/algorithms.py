"""Every `algorithm=` preset on the default task (tiny Qwen3.5, copy_digits, 32 prompts x 8 samples),
same seed, one after another in this run: reward reached and cost per step, GRPO as the baseline.

    .venv/bin/python bench/algorithms.py [--steps 30] [--only ppo,dapo]
        # writes bench/results/algorithms.{json,md}

Rollouts are not bit-reproducible (continuous batching depends on timing), so a single run per
algorithm is one sample, not a ranking; the step-time ratios are the robust part.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ALGORITHMS = ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo"]
WINDOW = 4


def run(algo: str, steps: int, tmp: Path) -> dict:
    run_dir = tmp / algo
    ray_tmp = tempfile.mkdtemp(prefix="qrb", dir="/tmp")
    cmd = [sys.executable, "-m", "rl.train", f"algorithm={algo}", f"steps={steps}", "logger=console",
           "logger.progress=false", f"run_dir={run_dir}", f"cache_dir={tmp / 'cache'}", f"ray.temp_dir={ray_tmp}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp))
    with open(tmp / f"{algo}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    ms = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward/mean"] for m in ms]
    after_first = ms[1:] or ms
    return {
        "reward_first": statistics.mean(rewards[:WINDOW]), "reward_last": statistics.mean(rewards[-WINDOW:]),
        "reward_max": max(rewards), "stop_frac_last": statistics.mean(m["response/stop_frac"] for m in ms[-WINDOW:]),
        "step_s": statistics.median(m["timing/step_s"] for m in after_first),
        "rollout_s": statistics.median(m["timing/rollout_s"] for m in after_first),
        "score_s": statistics.median(m["timing/score_s"] for m in after_first),
        "update_s": statistics.median(m["timing/update_s"] for m in after_first),
        "episodes_per_step": statistics.mean(m["rollout/episodes"] for m in ms),
        "rewards": [round(r, 4) for r in rewards],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default=",".join(ALGORITHMS))
    args = ap.parse_args()
    algos = args.only.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="qrl-bench-algos-"))
    rows = {}
    for a in algos:
        print(f"[bench] {a} ...", flush=True)
        rows[a] = run(a, args.steps, tmp)
        print(f"[bench] {a}: reward {rows[a]['reward_first']:.3f} -> {rows[a]['reward_last']:.3f}, "
              f"{rows[a]['step_s']:.2f} s/step", flush=True)
    base = rows.get("grpo")
    for r in rows.values():
        if base:
            r["step_time_vs_grpo"] = r["step_s"] / base["step_s"]
            r["reward_gain_vs_grpo"] = (r["reward_last"] - r["reward_first"]) - (base["reward_last"] - base["reward_first"])
    command = f"python bench/algorithms.py --steps {args.steps}" + ("" if algos == ALGORITHMS else f" --only {args.only}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "algorithms.json").write_text(json.dumps({"command": command, "steps": args.steps, "window": WINDOW,
                                                          "results": rows}, indent=2))
    lines = [f"# Algorithms on the default task ({args.steps} steps, 2-core CPU, one run each, same seed)", "",
             f"Command: `.venv/bin/python {command.split(' ', 1)[1]}`", "",
             f"Reward = mean `reward/mean` (every sampled episode) of the first / last {WINDOW} steps. "
             "Step times are medians after the first step; ratios are against GRPO in the same run.", "",
             "| algorithm | reward first | reward last | gain vs GRPO | stop frac (last) | s/step | vs GRPO | rollout s | score s | update s | episodes/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, r in rows.items():
        lines.append(f"| {a} | {r['reward_first']:.3f} | {r['reward_last']:.3f} | {r.get('reward_gain_vs_grpo', 0):+.3f} | "
                     f"{r['stop_frac_last']:.2f} | {r['step_s']:.2f} | {r.get('step_time_vs_grpo', 1):.2f}x | "
                     f"{r['rollout_s']:.2f} | {r['score_s']:.2f} | {r['update_s']:.2f} | {r['episodes_per_step']:.0f} |")
    (RESULTS / "algorithms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
