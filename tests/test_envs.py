"""The environment API, registry and the contract checks a plugin author relies on."""
import gymnasium as gym
import pytest

from envs import available_envs, make_env
from envs.base import EnvContractError, check_reset_output, check_step_output
from envs.builtin.copy_digits import CopyDigitsEnv
from reward.string_match import copy_score as score
from envs.registry import EnvRegistryError
from rollout.env_pool import EnvHost


def test_copy_digits_is_a_gymnasium_env_and_deterministic_per_seed():
    env = make_env("copy_digits", kwargs={"min_digits": 2, "max_digits": 3})
    assert isinstance(env, gym.Env)
    obs, info = env.reset(seed=7)
    obs2, info2 = make_env("copy_digits", kwargs={"min_digits": 2, "max_digits": 3}).reset(seed=7)
    assert obs == obs2 and info["target"] == info2["target"]
    assert obs[0]["role"] == "user" and info["target"] in obs[0]["content"]
    _, reward, terminated, truncated, step_info = env.step(info["target"])
    assert reward == pytest.approx(1.0) and terminated and not truncated and step_info["exact"]


def test_copy_digits_score():
    assert score("42", "42") == pytest.approx(1.0)
    assert score("", "42") == 0.0
    assert score("41", "42") == pytest.approx(0.1 + 0.7 * 0.5 + 0.2)
    assert score("ab", "42") == pytest.approx(0.2)  # right length only
    assert score("4200", "42") == pytest.approx(0.1 + 0.7 + 0.2 / 3)  # right digits, too long
    assert score("7", "42") == pytest.approx(0.1 * 0.5 + 0.2 / 2)


def test_builtin_registered_through_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="rl.envs")}
    assert eps["copy_digits"] == "envs.builtin.copy_digits:CopyDigitsEnv"  # installed package metadata
    assert available_envs()["copy_digits"] == eps["copy_digits"]


def test_target_path_and_unknown_name():
    env = make_env(target="envs.builtin.copy_digits.CopyDigitsEnv")
    assert isinstance(env, CopyDigitsEnv)
    with pytest.raises(EnvRegistryError, match="unknown env 'nope'; available: .*copy_digits"):
        make_env("nope")


def test_plugin_that_fails_to_import_is_named():
    with pytest.raises(EnvRegistryError, match="module 'no_such_plugin_mod' raised ModuleNotFoundError"):
        make_env(target="no_such_plugin_mod:Env")


def test_contract_errors_name_method_and_expectation():
    with pytest.raises(EnvContractError, match=r"bad.reset\(\) returned str; expected a tuple \(obs, info\)"):
        check_reset_output("bad", "hello")
    with pytest.raises(EnvContractError, match=r"bad.step\(\) returned tuple of length 3"):
        check_step_output("bad", ("o", 1.0, True))
    with pytest.raises(EnvContractError, match="reward None; expected a number"):
        check_step_output("bad", ("o", None, True, False, {}))
    with pytest.raises(EnvContractError, match="finite"):
        check_step_output("bad", ("o", float("nan"), True, False, {}))


class RaisingEnv(CopyDigitsEnv):
    def step(self, action):
        raise RuntimeError("boom")


def test_env_host_turns_exceptions_into_counted_errors():
    host = EnvHost(None, "tests.test_envs:RaisingEnv", {})
    r = host.run_batch([("reset", 0, 1), ("reset", 1, 2)])
    assert all(ok for ok, _ in r) and len(host.envs) == 2
    out = host.run_batch([("step", 0, "1"), ("step", 5, "1")])
    assert out[0][0] is False and "RuntimeError: boom" in out[0][1] and "step()" in out[0][1]
    assert out[1][0] is False and "no live env" in out[1][1]
    assert len(host.envs) == 1  # the failed env was closed


class KeywordOnlyResetEnv(CopyDigitsEnv):
    """gymnasium's own signature: reset(*, seed=None, options=None)."""

    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed, options=options)


def test_env_host_calls_reset_with_keyword_seed():
    host = EnvHost(None, "tests.test_envs:KeywordOnlyResetEnv", {})
    (ok, (obs, info)), = host.run_batch([("reset", 0, 7)])
    assert ok and info["target"] == CopyDigitsEnv().reset(seed=7)[1]["target"]
