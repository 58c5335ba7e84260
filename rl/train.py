"""Entry point: `python -m rl.train [key=value ...]` (Hydra overrides, e.g. `learner.num_ranks=2 logger=console`)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.cli import compose, explain_config_error, fail, one_line

OVERRIDES_FILE = "overrides.json"  # a run's command-line overrides: `resume=` re-applies them


@hydra.main(config_path="pkg://conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from common.errors import RunError
    from rl.run import RunInterrupted, run_training

    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [o for o in HydraConfig.get().overrides.task if _key(o) != "resume"]
    (run_dir / OVERRIDES_FILE).write_text(json.dumps(overrides, indent=1))
    try:
        run_training(cfg, run_dir)
    except RunInterrupted as e:
        print(f"[qrl] {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except (FileNotFoundError, ValueError, LookupError, RunError, TypeError) as e:
        fail(one_line(e))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_args(args: list[str]) -> list[str]:
    """`resume=<run | checkpoint | latest>`: the run's own overrides (from its overrides.json), then
    the new ones (a key given again wins), with run_dir set to the run's folder."""
    from rl.checkpoint import resolve_resume, run_dir_of

    value = next(a.split("=", 1)[1] for a in args if _key(a) == "resume")
    ckpt = resolve_resume(value)
    run = run_dir_of(ckpt)
    saved = json.loads((run / OVERRIDES_FILE).read_text()) if (run / OVERRIDES_FILE).is_file() else []
    new_keys = {_key(a) for a in args}
    merged = [o for o in saved if _key(o) not in new_keys | {"run_dir"}]
    rest = [a for a in args if _key(a) not in ("resume", "run_dir")]
    return merged + rest + [f"run_dir={run}", f"resume={ckpt}"]


def main() -> None:
    args = sys.argv[1:]
    if any(_key(a) == "resume" for a in args) and not any(a.startswith("-") for a in args):
        try:
            args = resume_args(args)
        except FileNotFoundError as e:
            fail(one_line(e))
        sys.argv = sys.argv[:1] + args
    if not any(a.startswith("-") for a in args):  # plain overrides: pre-check for a one-line error
        try:
            compose(args)
        except Exception as e:  # noqa: BLE001 - any composition failure is a config error
            fail(explain_config_error(e))
    _hydra_main()


if __name__ == "__main__":
    main()
