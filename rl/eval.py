"""Evaluation on held-out env seeds.

During training (`eval.every`, rl/controller.py) an `Evaluator` runs `eval.num_prompts` x
`eval.samples_per_prompt` episodes on the training engines and env pool, right after a weight sync,
and returns `eval/*` metrics for that step's row. The seeds (`eval.seed_start` ...) are the same at
every evaluation and in every run, lie outside the training seeds, and draw nothing from the
training seed sequence.

    python -m rl.eval checkpoint=<folder> env=<name> [eval.num_prompts=64 eval.temperature=0 out=<folder> ...]

evaluates an exported policy with Ray, the env pool and vLLM engine(s) (no learner): prints a short
table and writes `<out>/eval.json` (metrics, config, one row per episode). Every key of `rl.train`'s
config works (`env=`, `rollout.*`, `eval.*`). `checkpoint`: an HF model folder (config.json +
weights + tokenizer, e.g. a run's `final/`), a run folder (its `final/`, else its newest
`checkpoints/step_*/hf`), or a training checkpoint folder (its `hf/`). `out` defaults to
`<checkpoint>/eval`.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rl.logger import append_env_errors
from rl.settings import engine_config, eval_rollout_settings
from rollout.episodes import EpisodeRunner

ACCEPTS = ("give an HF model folder (config.json + weights + tokenizer, e.g. <run>/final), a run folder (its "
           "final/ or newest checkpoints/step_*/hf) or a training checkpoint folder (its hf/)")


def eval_seeds(cfg) -> list[int]:
    """The held-out env seeds: the same at every evaluation, whatever the run's `seed`."""
    return list(range(cfg.eval.seed_start, cfg.eval.seed_start + cfg.eval.num_prompts))


def summarize(trajs: list) -> dict:
    """eval/* metrics; failed episodes are counted and left out of the means (NaN if all failed)."""
    ok = [t for t in trajs if not t.error]
    rewards = [float(t.reward) for t in ok]

    def mean(xs):
        xs = list(xs)
        return statistics.mean(xs) if xs else math.nan

    m = {
        "eval/num_episodes": len(trajs),
        "eval/failed_episodes": len(trajs) - len(ok),
        "eval/reward_mean": mean(rewards),
        "eval/reward_std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        "eval/response_tokens": mean(t.num_policy_tokens for t in ok),
        "eval/truncated_frac": mean(t.finish_reason in ("length", "context") for t in ok),
        "eval/policy_version": max((v for t in ok for v in t.versions), default=-1),
    }
    if any("exact" in t.info for t in ok):
        m["eval/exact_frac"] = mean(float(t.info.get("exact", 0)) for t in ok)
    return m


def episode_rows(trajs: list, tokenizer) -> list[dict]:
    dec = tokenizer.decode
    return [{"seed": t.seed, "prompt": dec(t.prompt_ids), "response": dec(t.response_ids), "reward": float(t.reward),
             "exact": t.info.get("exact"), "finish_reason": t.finish_reason, "turns": t.turns,
             "version": t.min_version, "error": t.error} for t in trajs]


class Evaluator:
    """Evaluation during training, on the training runner's env pool, engines and event loop."""

    def __init__(self, cfg, runner: EpisodeRunner, run_dir: str | Path | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.runner = runner.with_settings(eval_rollout_settings(cfg))
        self.seeds = eval_seeds(cfg)

    def due(self, step: int) -> bool:
        """After steps 0, every, 2*every, ... and (eval.at_end) after the last one."""
        e = self.cfg.eval
        return e.every > 0 and (step % e.every == 0 or (e.at_end and step == self.cfg.steps - 1))

    def run(self, step: int) -> dict:
        """Run the eval episodes now (the engines must hold the policy to evaluate); env failures go
        to <run_dir>/env_errors.jsonl marked "phase": "eval"."""
        trajs = self.runner.run(self.seeds)
        if self.run_dir is not None:
            append_env_errors(self.run_dir, step, self.runner.errors, phase="eval")
        return summarize(trajs)


# -- python -m rl.eval ---------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> Path:
    """The HF model folder to load for `checkpoint=path` (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint={path} does not exist; {ACCEPTS}")
    from rl.checkpoint import latest_checkpoint

    newest = latest_checkpoint(p)  # complete checkpoints only, never a half-written .tmp save
    for folder in [p, p / "hf", p / "final", *([newest / "hf"] if newest else [])]:
        if (folder / "config.json").is_file():
            return folder.resolve()
    raise FileNotFoundError(f"checkpoint={path} has no config.json (nor hf/, final/ or checkpoints/step_*/hf/ "
                            f"with one); {ACCEPTS}")


def evaluate_checkpoint(cfg, checkpoint: Path, out: Path) -> dict:
    """Evaluate the model folder `checkpoint` on cfg's env; writes and returns <out>/eval.json's content."""
    import shutil
    import tempfile

    import ray

    from envs.registry import resolve_env_class
    from policies.build import default_cache_dir, load_processor, load_tokenizer
    from rl.cluster import start_env_pool, start_ray
    from rollout.engine import engine_actor

    resolve_env_class(cfg.env.name, cfg.env._target_)  # bad env: fail before anything starts
    tokenizer, processor = load_tokenizer(str(checkpoint)), load_processor(str(checkpoint))
    cfg.policy.path = str(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qrl-eval-"))
    owns_ray = start_ray(cfg, tmp, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    r, e = cfg.rollout, cfg.env
    pool, engines = None, []
    try:
        pool = start_env_pool(e)
        engines = [engine_actor(r.engine_num_cpus).remote(engine_config(cfg, str(checkpoint), i))
                   for i in range(r.num_engines)]
        ray.get([x.ready.remote() for x in engines])
        runner = EpisodeRunner(pool, engines, tokenizer, eval_rollout_settings(cfg), processor=processor)
        t0 = time.perf_counter()
        trajs = runner.run(eval_seeds(cfg))
        metrics = {**summarize(trajs), "timing/eval_s": time.perf_counter() - t0}
        metrics.pop("eval/policy_version")  # a fresh engine's counter (0), not the checkpoint's training step
        errors = runner.errors
    finally:
        for x in engines:
            ray.kill(x)
        if pool is not None:
            pool.shutdown()
        if owns_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    result = {"checkpoint": str(checkpoint), "env": e._target_ or e.name, "metrics": metrics,
              "config": asdict(cfg), "episodes": episode_rows(trajs, tokenizer), "env_errors": errors}
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def table(result: dict) -> str:
    m, ev = result["metrics"], result["config"]["eval"]
    how = "greedy" if ev["temperature"] == 0 else f"temperature {ev['temperature']}, top_p {ev['top_p']}"
    rows = [("episodes", f"{m['eval/num_episodes']} ({ev['num_prompts']} prompts x {ev['samples_per_prompt']}, {how})"),
            ("failed", m["eval/failed_episodes"]), ("reward mean", m["eval/reward_mean"]),
            ("reward std", m["eval/reward_std"]), ("exact frac", m.get("eval/exact_frac", "-")),
            ("response tokens", m["eval/response_tokens"]), ("truncated frac", m["eval/truncated_frac"])]
    lines = [f"eval of {result['checkpoint']} on {result['env']}:"]
    lines += [f"  {k:<16}{v:.4g}" if isinstance(v, float) else f"  {k:<16}{'-' if v is None else v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from rl.config import validate
    from common.errors import RunError
    from rl.cli import compose, explain_config_error, fail, one_line

    args = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") for a in args):
        print(__doc__)
        raise SystemExit(0 if set(args) <= {"-h", "--help"} else 2)
    own = {"checkpoint": None, "out": None}
    overrides = []
    for a in args:
        key, sep, val = a.partition("=")
        if sep and key in own:
            own[key] = val
        else:
            overrides.append(a)
    if not own["checkpoint"]:
        fail(f"checkpoint=<folder> is required; {ACCEPTS}")
    try:
        cfg = OmegaConf.to_object(compose(overrides))
    except Exception as e:  # noqa: BLE001 - any composition failure is a config error
        fail(explain_config_error(e))
    try:
        validate(cfg)
        checkpoint = resolve_checkpoint(own["checkpoint"])
        out = Path(own["out"]) if own["out"] else Path(own["checkpoint"]).expanduser() / "eval"
        result = evaluate_checkpoint(cfg, checkpoint, out)
    except (OSError, ValueError, LookupError, RunError, TypeError) as e:  # OSError: missing/unwritable folders, env placement
        fail(one_line(e))
    print(table(result))
    print(f"[qrl] eval written to {(out / 'eval.json').resolve()}", flush=True)


if __name__ == "__main__":
    main()
