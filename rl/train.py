"""Entry point: `python -m rl.train [key=value ...]` (Hydra overrides, e.g. `learner.num_ranks=2 logger=console`)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.config import register_configs

register_configs()

CONFIG_MODULE = "conf"


def explain_config_error(e: BaseException) -> str:
    """One line naming the bad input and the fix, from Hydra/OmegaConf's multi-line errors."""
    chain, cur = [], e
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        full_key = getattr(err, "full_key", None)
        msg = str(err)
        if full_key and ("not in struct" in msg or "Key" in msg):
            parent, _, leaf = full_key.rpartition(".")
            valid = _valid_keys(parent)
            hint = f"; valid keys under '{parent or '<root>'}': {', '.join(valid)}" if valid else ""
            return f"unknown config key '{full_key}'{hint}. Fix the spelling (`python -m rl.train --cfg job` prints the full config)"
        m = re.search(r"Could not find '([^']+)'.*?Available options in '([^']+)':\s*(.*)", msg, re.S)
        if m:
            opts = ", ".join(m.group(3).split("Config search path")[0].split())
            return f"unknown config option '{m.group(1)}'; available in '{m.group(2)}': {opts}"
        if "Value '" in msg and "could not be converted" in msg:
            first = msg.splitlines()[0]
            return f"bad config value: {first} (key {full_key})" if full_key else f"bad config value: {first}"
    return " ".join(str(e).split())


def _valid_keys(parent: str) -> list[str]:
    from omegaconf import OmegaConf

    from rl.config import TrainConfig

    node = OmegaConf.structured(TrainConfig)
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
        if node is None:
            return []
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return hcompose(config_name="config", overrides=overrides)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


OVERRIDES_FILE = "overrides.json"  # a run's command-line overrides: `resume=` re-applies them


@hydra.main(config_path="pkg://conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from rl.controller import RunError, RunInterrupted, run_training

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
        fail(" ".join(str(e).split()))


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
            fail(" ".join(str(e).split()))
        sys.argv = sys.argv[:1] + args
    if not any(a.startswith("-") for a in args):  # plain overrides: pre-check for a one-line error
        try:
            compose(args)
        except Exception as e:  # noqa: BLE001 - any composition failure is a config error
            fail(explain_config_error(e))
    _hydra_main()


if __name__ == "__main__":
    main()
