"""Asynchronous training against synchronous, same run, same seed: wall-clock for the same number
of samples, and for reaching the same reward (copy_digits).

Engine and learner are pinned to one core each (`rollout.engine_cpus=0 learner.cpus=1`), as they
would sit on separate GPUs; the driver and env actors share the machine. Modes:
  sync          rollout -> update -> sync
  one_step_off  the rollout of step k+1 (policy version k) overlaps the update of step k
  async         rollouts stream continuously, weights land mid-flight, max_staleness=1
The gain is bounded by (rollout + update) / max(rollout, update): two workloads show both ends,
tiny Qwen3 with 8-token answers (rollout and update of similar cost) and the default tiny Qwen3.5
(on CPU its update, with the PyTorch Gated DeltaNet fallback, costs ~4x its rollout).

    .venv/bin/python bench/async_training.py [--steps 20]   # -> bench/results/async_training.{json,md}
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
MODES = {"sync": ["trainer.mode=sync"], "one_step_off": ["trainer.mode=one_step_off"],
         "async": ["trainer.mode=async", "trainer.max_staleness=1"]}
WORKLOADS = {
    "qwen3_balanced": ["policy=tiny_qwen3", "rollout.max_tokens=8"],
    "qwen3_5_default": [],
}
PINNED = ["rollout.engine_cpus=0", "learner.cpus=1"]
WINDOW = 3


def run(name: str, overrides: list[str], steps: int, tmp: Path) -> list[dict]:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "rl.train", *overrides, *PINNED, f"steps={steps}", "logger=console",
           "logger.progress=false", f"run_dir={run_dir}", f"cache_dir={tmp / 'cache'}",
           f"ray.temp_dir={tempfile.mkdtemp(prefix='qra', dir='/tmp')}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp))
    with open(tmp / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def time_to(ms: list[dict], target: float) -> float | None:
    """Wall-clock (sum of step times) until the mean reward of the last WINDOW steps reaches target."""
    elapsed = 0.0
    for i, m in enumerate(ms):
        elapsed += m["timing/step_s"]
        window = [x["reward/mean"] for x in ms[max(0, i - WINDOW + 1): i + 1]]
        if len(window) == WINDOW and statistics.mean(window) >= target:
            return elapsed
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qrl-bench-async-"))
    out: dict = {"command": f"python bench/async_training.py --steps {args.steps}", "steps": args.steps,
                 "pinning": PINNED, "workloads": {}}
    for wl in args.workloads.split(","):
        runs = {}
        for mode, mo in MODES.items():
            print(f"[bench] {wl} {mode} ...", flush=True)
            ms = run(f"{wl}-{mode}", WORKLOADS[wl] + mo, args.steps, tmp)
            runs[mode] = {
                "wall_s": sum(m["timing/step_s"] for m in ms),
                "step_s_median": statistics.median(m["timing/step_s"] for m in ms[1:]),
                "rollout_wait_s_median": statistics.median(m["timing/rollout_s"] for m in ms[1:]),
                "learn_s_median": statistics.median(m["timing/learn_s"] for m in ms[1:]),
                "sync_s_median": statistics.median(m["timing/sync_s"] for m in ms[1:]),
                "reward_first": statistics.mean(m["reward/mean"] for m in ms[:WINDOW]),
                "reward_last": statistics.mean(m["reward/mean"] for m in ms[-WINDOW:]),
                "staleness_max": max(m["async/staleness_max"] for m in ms),
                "is_clipped_frac_mean": statistics.mean(m.get("is/clipped_frac", 0.0) for m in ms),
                "rewards": [round(m["reward/mean"], 4) for m in ms],
                "step_times": [round(m["timing/step_s"], 3) for m in ms],
            }
            print(f"[bench] {wl} {mode}: {runs[mode]['wall_s']:.1f} s, reward {runs[mode]['reward_first']:.3f} -> "
                  f"{runs[mode]['reward_last']:.3f}", flush=True)
        base = runs["sync"]
        target = base["reward_first"] + 0.8 * (base["reward_last"] - base["reward_first"])
        for mode, r in runs.items():
            r["speedup_same_samples"] = base["wall_s"] / r["wall_s"]
        for mode, r in runs.items():
            ms_rewards = [{"reward/mean": x, "timing/step_s": s} for x, s in zip(r["rewards"], r["step_times"])]
            r["time_to_target_s"] = time_to(ms_rewards, target)
        for mode, r in runs.items():
            t, tb = r["time_to_target_s"], base["time_to_target_s"]
            r["speedup_same_reward"] = (tb / t) if (t and tb) else None
        out["workloads"][wl] = {"target_reward": target, "modes": runs}
    best = out["workloads"].get("qwen3_balanced", next(iter(out["workloads"].values())))["modes"]
    out["speedup"] = max(best["async"]["speedup_same_samples"], best["one_step_off"]["speedup_same_samples"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_training.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Asynchronous vs synchronous training ({args.steps} steps each, one run per mode, same seed, 2-core CPU)",
             "", f"Command: `.venv/bin/python bench/async_training.py --steps {args.steps}`", "",
             "Engine pinned to core 0, learner to core 1. `wall` = sum of step times (setup excluded). "
             f"Target reward = sync's first-{WINDOW}-step mean + 80% of its gain; time to target = wall-clock until the "
             f"{WINDOW}-step mean reaches it.", "",
             f"**speedup (best overlapped mode, balanced workload, same samples): {out['speedup']:.2f}x**", ""]
    for wl, w in out["workloads"].items():
        lines += [f"## {wl} ({' '.join(WORKLOADS[wl]) or 'default config'})", "",
                  f"target reward {w['target_reward']:.3f}", "",
                  "| mode | wall s | speedup (same samples) | time to target s | speedup (same reward) | step s | waiting for rollout s | learn s | sync s | reward first -> last | max staleness | IS clipped frac |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, r in w["modes"].items():
            ttt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] else "not reached"
            ssr = f"{r['speedup_same_reward']:.2f}x" if r["speedup_same_reward"] else "-"
            lines.append(f"| {mode} | {r['wall_s']:.1f} | {r['speedup_same_samples']:.2f}x | {ttt} | {ssr} | "
                         f"{r['step_s_median']:.2f} | {r['rollout_wait_s_median']:.2f} | {r['learn_s_median']:.2f} | "
                         f"{r['sync_s_median']:.3f} | {r['reward_first']:.3f} -> {r['reward_last']:.3f} | "
                         f"{r['staleness_max']} | {r['is_clipped_frac_mean']:.3f} |")
        lines.append("")
    (RESULTS / "async_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
