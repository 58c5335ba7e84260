"""Run report: `report.png` (reward, KL, engine/learner mismatch, entropy, response length, step-time
breakdown over steps) and a short `report.md`, from a run folder's metrics.jsonl.

Written at the end of every run; for any run folder (also one still running or one that crashed):

    python -m rl.report <run folder>
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from rl.logger import read_metrics

PANELS = [  # (title, [(metric, label)], log scale)
    ("reward", [("reward/mean", "mean"), ("reward/exact_frac", "exact (=1) fraction"),
                ("eval/reward_mean", "eval mean (held-out seeds)")], False),
    ("KL", [("train/kl_ref", "KL to reference"), ("mismatch/kl", "engine||learner KL")], True),
    ("engine/learner mismatch", [("mismatch/abs_logprob_diff", "mean |Δlogprob|"),
                                 ("mismatch/max_abs_logprob_diff", "max |Δlogprob|")], True),
    ("policy entropy", [("policy/entropy", "nats/token")], False),
    ("response length", [("response/mean_tokens", "mean tokens"), ("response/truncated_frac", "truncated fraction")],
     False),
    ("step time (s)", [("timing/step_s", "step"), ("timing/rollout_s", "rollout (wait)"), ("timing/learn_s", "learn"),
                       ("timing/sync_s", "weight sync")], False),
]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(r.get("step", i)))
            ys.append(float(v))
    return xs, ys


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def summary(rows: list[dict], window: int = 4) -> dict:
    """First/last-`window`-step means of the headline metrics, and counts of warnings."""
    out = {"steps": len(rows)}
    for key in ("reward/mean", "reward/exact_frac", "policy/entropy", "response/mean_tokens", "mismatch/kl",
                "timing/step_s"):
        _, ys = _series(rows, key)
        out[key] = (_mean(ys[:window]), _mean(ys[-window:]))
    _, rewards = _series(rows, "reward/mean")
    out["best_reward"] = max(rewards) if rewards else None
    out["mismatch_jumps"] = int(sum(r.get("mismatch/jump") or 0 for r in rows))
    out["env_errors"] = int(sum(r.get("env/errors") or 0 for r in rows))
    return out


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `report.png` and `report.md` into `run_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} does not exist: give a run folder (the one a run prints at start)")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics} has no steps yet: the run has not finished its first step")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (title, keys, log) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in keys:
            xs, ys = _series(rows, key)
            if ys:
                ax.plot(xs, ys, marker="." if len(ys) < 50 else None, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
            if log and all(y > 0 for key, _ in keys for y in _series(rows, key)[1]):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{run_dir.name}: {len(rows)} steps")
    png = run_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    s = summary(rows)
    lines = [f"# Run report: {run_dir}", "", f"{s['steps']} steps. Plots: `report.png`.", "",
             "| metric | first 4 steps | last 4 steps |", "|---|---|---|"]
    for key in ("reward/mean", "reward/exact_frac", "policy/entropy", "response/mean_tokens", "mismatch/kl",
                "timing/step_s"):
        first, last = s[key]
        lines.append(f"| {key} | {_fmt(first)} | {_fmt(last)} |")
    lines += ["", f"Best mean reward: {_fmt(s['best_reward'])}. Mismatch jumps: {s['mismatch_jumps']}. "
              f"Env errors: {s['env_errors']}."]
    steps, evals = _series(rows, "eval/reward_mean")
    if evals:
        lines.append(f"Eval (held-out seeds) mean reward: {_fmt(evals[0])} after step {steps[0]:.0f} -> "
                     f"{_fmt(evals[-1])} after step {steps[-1]:.0f} ({len(evals)} evaluations).")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return png, md


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m rl.report <run folder>", file=sys.stderr)
        raise SystemExit(2)
    try:
        png, md = write_report(args[0])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"[qrl] report: {png}  {md}")


if __name__ == "__main__":
    main()
