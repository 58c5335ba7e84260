"""Run logging: metrics.jsonl (one line per step), W&B (offline without an API key), progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

SAMPLES_KEY = "_rollout_samples"  # a metrics entry carrying rollout rows: samples.jsonl + W&B table
SAMPLE_COLUMNS = ["step", "group", "seed", "prompt", "response", "reward", "version", "finish_reason", "turns"]


class RunLogger:
    def __init__(self, run_dir: str | Path, backend: str = "console", project: str = "qrl",
                 run_name: str | None = None, mode: str = "auto", config: dict | None = None,
                 total_steps: int = 0, progress: bool = True, initial_step: int = 0, wandb_id: str | None = None):
        """initial_step / wandb_id: a resumed run's progress starts there and logs into the same W&B run."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._f = open(self.metrics_path, "a", buffering=1)
        self.wandb = None
        if backend == "wandb":
            import wandb

            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=project, name=run_name, dir=str(self.run_dir), mode=mode,
                                    config=config or {}, reinit="finish_previous", id=wandb_id,
                                    resume="allow" if wandb_id else None)
        self.run_id = self.wandb.id if self.wandb is not None else None
        self.bar = None
        self._progress, self._total, self._initial = progress, total_steps, initial_step

    def start_progress(self) -> None:
        """Show the progress bar (call once setup is done, so its rate reflects training steps)."""
        if self._progress and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self._total, initial=self._initial, desc="train", unit="step", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        samples = metrics.pop(SAMPLES_KEY, None)
        if samples:
            self.log_samples(samples, int(metrics.get("step", 0)))
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=int(clean.get("step", 0)))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({
                "reward": f"{clean.get('reward/mean', 0):.3f}",
                "tok/s": f"{clean.get('rollout/tokens_per_s', 0):.0f}",
                "v": clean.get("policy/version"),
            })

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Rollouts as rows: appended to samples.jsonl, and a W&B table `rollouts` at this step."""
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=SAMPLE_COLUMNS, data=[[r.get(c) for c in SAMPLE_COLUMNS] for r in rows])
            self.wandb.log({"rollouts": table}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._f.close()
        if self.wandb is not None:
            self.wandb.finish()


def append_env_errors(run_dir: str | Path, step: int, errors: list[dict], **extra) -> None:
    """Env failures (also retried ones) as rows of <run_dir>/env_errors.jsonl."""
    if errors:
        with open(Path(run_dir) / "env_errors.jsonl", "a") as f:
            for err in errors:
                f.write(json.dumps({"step": step, **extra, **err}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
