"""What `rl.train` and `rl.eval` share on the command line: composing the Hydra config from
overrides, and one-line `error:` messages for bad config input."""
from __future__ import annotations

import re
import sys

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


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
