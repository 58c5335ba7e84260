"""Training checkpoints: folder layout, RNG states, atomic writes, keep-last-K, and finding the
checkpoint to resume from.

    <run>/checkpoints/step_000010/       10 = steps completed
        trainer_state.json   step, policy version, env seeds drawn, monitor history, driver RNG
        learner/             DeepSpeed model + optimizer shards of every rank, rng_rank<r>.pt
        critic/              the same for PPO's value model (PPO only)
        hf/                  the policy as an HF folder (transformers, vLLM, `python -m rl.eval`)
        COMPLETE             written last: a folder without it is ignored (a crash mid-save)

A checkpoint is written into `step_XXXXXX.tmp` and renamed when complete, so a crash while
saving never leaves a half checkpoint that looks usable.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file() and (Path(folder) / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all) and leftover
    `.tmp` folders of interrupted saves; returns what was deleted."""
    removed = []
    for tmp in checkpoints_dir(run_dir).glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    done = list_checkpoints(run_dir)
    if keep_last > 0:
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def finish(tmp: Path, final: Path) -> Path:
    """Mark `tmp` complete and move it to `final` (replacing an older save of the same step)."""
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def rng_state() -> dict:
    """Every RNG a training process draws from: Python, NumPy, torch CPU (and CUDA)."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(value: str, search_root: str | Path = "outputs") -> Path:
    """The checkpoint folder `resume=` points at: a checkpoint folder itself, a run folder (its
    newest complete checkpoint), or `latest` (the newest checkpoint of any run under
    `search_root`, Hydra's default output folder). Errors name the path and what is accepted."""
    if value == "latest":
        root = Path(search_root)
        runs = [p.parent.parent for p in root.glob("**/checkpoints/step_*") if is_complete(p)] if root.is_dir() else []
        if not runs:
            raise FileNotFoundError(f"resume=latest: no run with a complete checkpoint under {root.resolve()}/; "
                                    "give the run folder instead: resume=<run folder>")
        newest = max(set(runs), key=lambda r: latest_checkpoint(r).stat().st_mtime)
        return latest_checkpoint(newest).resolve()
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume={value}: no such folder; give a run folder (with checkpoints/), "
                                "a checkpoint folder (checkpoints/step_XXXXXX) or resume=latest")
    if is_complete(path):
        return path.resolve()
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        partial = sorted(checkpoints_dir(path).glob("step_*")) if checkpoints_dir(path).is_dir() else []
        why = (f"; {', '.join(p.name for p in partial)} never finished saving (no {MARKER} file)" if partial
               else "; checkpoints are written every checkpoint.every steps, at the end and on Ctrl-C/SIGTERM")
        raise FileNotFoundError(f"resume={value}: no complete checkpoint in {path / 'checkpoints'}{why}")
    return ckpt.resolve()


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/step_X -> <run>."""
    return Path(checkpoint).resolve().parent.parent


def truncate_jsonl(path: Path, step: int) -> int:
    """Drop rows with `step` >= step (logged after the checkpoint a run resumes from, so a resumed
    run does not log those steps twice); returns how many rows were dropped."""
    if not path.is_file():
        return 0
    rows = path.read_text().splitlines()
    keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) < step]
    path.write_text("".join(r + "\n" for r in keep))
    return len([r for r in rows if r.strip()]) - len(keep)
