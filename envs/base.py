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


def _obs_problem(obs: Any) -> str | None:
    """What is wrong with an observation (None: it is a str or a list of chat messages whose content
    is text or a list of content parts)."""
    if isinstance(obs, str):
        return None
    if not isinstance(obs, list):
        return f"of type {type(obs).__name__}"
    for i, m in enumerate(obs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            return f"of type list (message {i} is {_short(m)}, not a dict with a 'role' string and 'content')"
        c = m["content"]
        if not (isinstance(c, str) or (isinstance(c, list) and all(isinstance(p, dict) for p in c))
                or (c is None and m.get("tool_calls"))):
            return f"of type list (message {i} has content of type {type(c).__name__}: {_short(c)})"
    return None


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def reward_value(env_name: str, reward: Any) -> float:
    """`reward` as a float: an int, float, bool or numpy/torch scalar that is finite. Anything else
    (NaN, inf, None, a string, an array) raises EnvContractError: it must never reach the learner."""
    fix = (f". Rewards must be finite numbers (int, float or a numpy/torch scalar): fix {env_name}.step / "
           "the reward function it calls")
    kind = type(reward).__name__
    try:
        if isinstance(reward, (str, bytes)) or getattr(reward, "ndim", 0) != 0:
            raise TypeError
        value = float(reward)
    except Exception:  # noqa: BLE001 - whatever float() raises for this type
        raise EnvContractError(f"{env_name}.step() returned reward {_short(reward)}; expected a number (int or "
                               f"float), got {kind}{fix}") from None
    if math.isnan(value) or math.isinf(value):
        raise EnvContractError(f"{env_name}.step() returned reward {value}; expected a finite number, got "
                               f"{kind}{fix}")
    return value


def check_reset_output(env_name: str, out: Any) -> tuple[Any, dict]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EnvContractError(
            f"{env_name}.reset() returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            + "; expected a tuple (obs, info)"
        )
    obs, info = out
    problem = _obs_problem(obs)
    if problem:
        raise EnvContractError(
            f"{env_name}.reset() returned obs {problem}; expected str or a list of "
            "chat messages like [{'role': 'user', 'content': '...'}]"
        )
    if not obs:
        raise EnvContractError(f"{env_name}.reset() returned an empty obs {obs!r}; the first observation is the "
                               "prompt: return its text or at least one chat message")
    if not isinstance(info, dict):
        raise EnvContractError(f"{env_name}.reset() returned info of type {type(info).__name__}; expected dict")
    tools = info.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise EnvContractError(f"{env_name}.reset() returned info['tools'] of type {type(tools).__name__}; expected a "
                               "list of JSON tool schemas (dicts, see envs.tools.function_schema)")
    return obs, info


def check_step_output(env_name: str, out: Any) -> tuple[Any, float, bool, bool, dict]:
    if not (isinstance(out, tuple) and len(out) == 5):
        raise EnvContractError(
            f"{env_name}.step() returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            + "; expected a tuple (obs, reward, terminated, truncated, info)"
        )
    obs, reward, terminated, truncated, info = out
    reward = reward_value(env_name, reward)
    if not isinstance(info, dict):
        raise EnvContractError(f"{env_name}.step() returned info of type {type(info).__name__}; expected dict")
    problem = None if terminated or truncated else _obs_problem(obs)
    if problem:
        raise EnvContractError(
            f"{env_name}.step() returned obs {problem} for an episode that goes on; "
            "expected str or a list of chat messages like [{'role': 'tool', 'content': '...'}]"
        )
    return obs, reward, bool(terminated), bool(truncated), info
