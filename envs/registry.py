"""Environment registry: Python entry points (group `rl.envs`), built-ins, or a dotted `_target_` path."""
from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "rl.envs"

BUILTINS = {
    "copy_digits": "envs.builtin.copy_digits:CopyDigitsEnv",
    "guess_number": "envs.builtin.guess_number:GuessNumberEnv",
    "arithmetic": "envs.builtin.arithmetic:ArithmeticEnv",
    "countdown": "envs.builtin.countdown:CountdownEnv",
    "calculator": "envs.builtin.calculator:CalculatorEnv",
    "code_tests": "envs.builtin.code_tests:CodeTestsEnv",
    "color_patch": "envs.builtin.color_patch:ColorPatchEnv",
}


class EnvRegistryError(LookupError):
    pass


def available_envs() -> dict[str, str]:
    return {**BUILTINS, **_plugin_envs()}


@functools.lru_cache(maxsize=1)
def _plugin_envs() -> dict[str, str]:
    """Installed plugins (scanning entry points costs ~10 ms, so once per process)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_target(target: str, what: str):
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - report any import failure with its cause
        raise EnvRegistryError(
            f"env {what} could not be imported: module {module_name!r} raised "
            f"{type(e).__name__}: {e}. Fix the plugin's import error or `pip install` its package"
        ) from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EnvRegistryError(f"env {what}: module {module_name!r} has no attribute {attr!r}") from None


def resolve_env_class(name: str | None = None, target: str | None = None):
    if target:
        return _import_target(target, f"_target_={target!r}")
    envs = available_envs()
    if name not in envs:
        raise EnvRegistryError(
            f"unknown env {name!r}; available: {', '.join(sorted(envs))}. "
            f"Install a plugin that registers it under the {ENTRY_POINT_GROUP!r} entry-point group, "
            "or set env._target_=package.module.ClassName"
        )
    return _import_target(envs[name], f"{name!r} ({envs[name]})")


def make_env(name: str | None = None, target: str | None = None, kwargs: dict[str, Any] | None = None):
    cls = resolve_env_class(name, target)
    label = target or name  # `_target_` wins over `name`
    try:
        return cls(**(kwargs or {}))
    except TypeError as e:
        raise EnvRegistryError(f"env {label!r} rejected its kwargs {kwargs}: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. a data file named in env.kwargs is missing
        raise EnvRegistryError(
            f"env {label!r} could not be created with env.kwargs={dict(kwargs or {})}: "
            f"{type(e).__name__}: {e}. Fix env.kwargs (e.g. a file path) or the env's __init__") from e
