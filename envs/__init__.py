"""Environments: the gymnasium-style text environment API, registry and built-ins."""
from envs.base import TextEnv, check_reset_output, check_step_output
from envs.registry import available_envs, make_env

__all__ = ["TextEnv", "make_env", "available_envs", "check_reset_output", "check_step_output"]
