"""The environment API: a `gymnasium.Env` whose actions are the policy's text.

    reset(seed=None, options=None) -> (obs, info)
    step(action: str)              -> (obs, reward, terminated, truncated, info)

`obs` is the prompt text or a list of chat messages ({"role": ..., "content": ...}).
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym


class TextEnv(gym.Env):
    """Base class for text environments. Subclasses implement `reset` and `step`."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Text(max_length=1 << 20)
    action_space = gym.spaces.Text(max_length=1 << 20)


class EnvContractError(TypeError):
    """An environment returned something that does not follow the API."""


def _is_obs(obs: Any) -> bool:
    if isinstance(obs, str):
        return True
    return isinstance(obs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in obs)


def check_reset_output(env_name: str, out: Any) -> tuple[Any, dict]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EnvContractError(
            f"{env_name}.reset() returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            + "; expected a tuple (obs, info)"
        )
    obs, info = out
    if not _is_obs(obs):
        raise EnvContractError(
            f"{env_name}.reset() returned obs of type {type(obs).__name__}; expected str or a list of "
            "chat messages like [{'role': 'user', 'content': '...'}]"
        )
    if not isinstance(info, dict):
        raise EnvContractError(f"{env_name}.reset() returned info of type {type(info).__name__}; expected dict")
    return obs, info


def check_step_output(env_name: str, out: Any) -> tuple[Any, float, bool, bool, dict]:
    if not (isinstance(out, tuple) and len(out) == 5):
        raise EnvContractError(
            f"{env_name}.step() returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            + "; expected a tuple (obs, reward, terminated, truncated, info)"
        )
    obs, reward, terminated, truncated, info = out
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EnvContractError(
            f"{env_name}.step() returned reward {reward!r}; expected a number (int or float)"
        ) from None
    if math.isnan(reward) or math.isinf(reward):
        raise EnvContractError(f"{env_name}.step() returned reward {reward}; expected a finite number")
    if not isinstance(info, dict):
        raise EnvContractError(f"{env_name}.step() returned info of type {type(info).__name__}; expected dict")
    if not (terminated or truncated) and not _is_obs(obs):
        raise EnvContractError(
            f"{env_name}.step() returned obs of type {type(obs).__name__} for an episode that goes on; "
            "expected str or a list of chat messages like [{'role': 'tool', 'content': '...'}]"
        )
    return obs, reward, bool(terminated), bool(truncated), info
