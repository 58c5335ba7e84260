"""The example env plugin (examples/qrl-reverse-env): its docs page, a real install, a training run with
it, and the errors a non-conforming user env gets (docs/write-your-own-environment.md)."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import gymnasium as gym
import pytest

from rollout.env_pool import EnvHost
from tests.conftest import REPO, cli_env, short_tmp

EXAMPLE = REPO / "examples" / "qrl-reverse-env"
EXAMPLE_SOURCE = EXAMPLE / "src" / "qrl_reverse_env" / "__init__.py"
DOCS = REPO / "docs" / "write-your-own-environment.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def test_docs_code_is_the_example_source():
    blocks = python_blocks(DOCS.read_text())
    assert len(blocks) == 1, "the docs page should have exactly one python block: the example's source"
    assert blocks[0] == EXAMPLE_SOURCE.read_text(), "docs code block differs from the example's __init__.py"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example package built and installed for real into its own folder (not into the venv)."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = tmp / "qrl-reverse-env"  # build from a copy: setuptools leaves build/ and *.egg-info behind
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    # The venv's setuptools builds the wheel, so no package index is needed.
    no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    if shutil.which("uv"):
        installer = ["uv", "pip", "install", "--python", sys.executable]
    elif importlib.util.find_spec("pip"):
        installer = [sys.executable, "-m", "pip", "install"]
    else:
        pytest.skip("neither uv nor pip is available to install the example")
    cmd = [*installer, "--target", str(site), "--no-deps", *no_isolation, str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def plugin_env(site, base: dict | None = None) -> dict:
    env = dict(base or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return env


CHECK_INSTALLED = """
import json
import gymnasium as gym
import qrl_reverse_env
from envs.registry import available_envs, make_env

env = make_env("reverse_word")
obs, info = env.reset(seed=3)
again, _ = make_env("reverse_word").reset(seed=3)
target = info["word"][::-1]
n = len(target)
rewards = {answer: env.step(answer) for answer in [target, " " + target + "\\n", target[0] + "_" * (n - 1), target + "x", ""]}
print(json.dumps({
    "registered": available_envs().get("reverse_word"),
    "module_file": qrl_reverse_env.__file__,
    "is_gym_env": isinstance(env, gym.Env),
    "words": list(qrl_reverse_env.WORDS),
    "obs": obs, "again": again, "word": info["word"],
    "steps": {k: [v[1], v[2], v[3], v[4]["exact"]] for k, v in rewards.items()},
}))
"""


def test_installed_plugin_is_registered_and_works(plugin_site):
    proc = subprocess.run([sys.executable, "-c", CHECK_INSTALLED], cwd=plugin_site.parent, env=plugin_env(plugin_site),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["registered"] == "qrl_reverse_env:ReverseWordEnv"
    assert out["module_file"].startswith(str(plugin_site)), "imported from somewhere other than the install"
    assert out["is_gym_env"]
    word = out["word"]
    assert word in out["words"] and all(w.isascii() and w.isalpha() and w.islower() for w in out["words"])
    assert out["obs"] == [{"role": "user", "content": f"reverse: {word}"}] and out["again"] == out["obs"]
    target, n = word[::-1], len(word)
    steps = out["steps"]
    assert steps[target] == [1.0, True, False, True]
    assert steps[" " + target + "\n"] == [1.0, True, False, True]  # surrounding whitespace is ignored
    assert steps[target[0] + "_" * (n - 1)] == [pytest.approx(1 / n), True, False, False]
    assert steps[target + "x"] == [pytest.approx(n / (n + 1)), True, False, False]  # too long costs
    assert steps[""] == [0.0, True, False, False]


@pytest.mark.slow
def test_trains_with_the_installed_plugin(tmp_path, cache_dir, plugin_site):
    """2 steps through the CLI. The plugin is importable only through PYTHONPATH; the Ray env actors
    inherit it (each EnvHost builds the env in __init__, so a plugin that does not import there fails
    the run) and every episode's reset/step ran in them without error."""
    cmd = [sys.executable, "-m", "rl.train", "env=reverse_word", f"run_dir={tmp_path / 'run'}",
           f"cache_dir={cache_dir}", f"ray.temp_dir={short_tmp()}", "logger=console", "steps=2",
           "rollout.prompts_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=16", "rollout.max_tokens=8"]
    proc = subprocess.run(cmd, cwd=REPO, env=plugin_env(plugin_site, cli_env(tmp_path)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["reward/mean"] is not None and 0.0 <= m["reward/mean"] <= 1.0
        assert "reward/exact_frac" in m  # from the plugin's info["exact"]
        assert m["env/failed_episodes"] == 0 and m["env/errors"] == 0


# -- a user's env that breaks the contract: the error names the method and what was expected --------------

class UserEnv(gym.Env):
    """Follows the API; each subclass below breaks one rule."""

    def reset(self, seed=None, options=None):
        return "reverse: ab", {}

    def step(self, action):
        return [], 1.0, True, False, {}


class ResetReturnsObsOnly(UserEnv):  # the gym < 0.26 API
    def reset(self, seed=None, options=None):
        return "reverse: ab"


class ResetReturnsThreeValues(UserEnv):
    def reset(self, seed=None, options=None):
        return "reverse: ab", {}, {}


class ResetReturnsDictObs(UserEnv):
    def reset(self, seed=None, options=None):
        return {"prompt": "reverse: ab"}, {}


class StepReturnsFourValues(UserEnv):  # the gym < 0.26 API: obs, reward, done, info
    def step(self, action):
        return [], 1.0, True, {}


class StepReturnsNoReward(UserEnv):
    def step(self, action):
        return [], None, True, False, {}


BROKEN_ENVS = [
    (ResetReturnsObsOnly, "reset", "{env}.reset() returned str; expected a tuple (obs, info)"),
    (ResetReturnsThreeValues, "reset", "{env}.reset() returned tuple of length 3; expected a tuple (obs, info)"),
    (ResetReturnsDictObs, "reset", "{env}.reset() returned obs of type dict; expected str or a list of chat messages"),
    (StepReturnsFourValues, "step",
     "{env}.step() returned tuple of length 4; expected a tuple (obs, reward, terminated, truncated, info)"),
    (StepReturnsNoReward, "step", "{env}.step() returned reward None; expected a number (int or float)"),
]


def test_conforming_user_env_runs_in_env_host():
    host = EnvHost(None, f"{__name__}:UserEnv", {})
    assert host.run_batch([("reset", 0, 1)]) == [(True, ("reverse: ab", {}))]
    assert host.run_batch([("step", 0, "ba")]) == [(True, ([], 1.0, True, False, {}))]


@pytest.mark.parametrize("env_cls,method,message", BROKEN_ENVS, ids=[c.__name__ for c, _, _ in BROKEN_ENVS])
def test_non_conforming_user_env_gets_a_clear_error(env_cls, method, message):
    host = EnvHost(None, f"{__name__}:{env_cls.__name__}", {})
    ok, out = host.run_batch([("reset", 0, 1)])[0]
    if method == "step":
        assert ok, out
        ok, out = host.run_batch([("step", 0, "ba")])[0]
    assert not ok and out.startswith(f"{host.label}.{method}(")
    assert f"raised EnvContractError: {message.format(env=host.label)}" in out
    assert len(host.envs) == 0  # the broken env was dropped; the episode is retried on a fresh one
    assert message.format(env="my_env") in DOCS.read_text(), "docs should quote this error message"
