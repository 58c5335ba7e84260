"""Bad input gets a one-line error naming the cause and the fix (checked through the real CLI)."""
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, short_tmp


def run_cli(tmp_path, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "rl.train", "logger=console", f"run_dir={tmp_path / 'run'}",
           f"cache_dir={tmp_path / 'cache'}", f"ray.temp_dir={short_tmp()}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_failed_before_start(proc):
    """The error came from the checks in Controller.__init__: the run folder line (printed after
    them, before Ray starts) never appeared."""
    assert "[qrl] run folder" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_unknown_config_key(tmp_path):
    line = error_line(run_cli(tmp_path, "learner.zero_stge=3"))
    assert "unknown config key 'learner.zero_stge'" in line and "zero_stage" in line


@pytest.mark.slow
def test_unknown_group_option(tmp_path):
    line = error_line(run_cli(tmp_path, "env=no_such_env"))
    assert "env/no_such_env" in line and "copy_digits" in line


@pytest.mark.slow
def test_unknown_algorithm_lists_the_available_ones(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm=ppo2"))
    assert "algorithm/ppo2" in line
    for name in ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo"):
        assert name in line.split("available")[1], line


@pytest.mark.slow
def test_unknown_advantage_estimator(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm.advantage=gae2"))
    assert "algorithm.advantage='gae2' is unknown" in line and "gae" in line and "rloo" in line


@pytest.mark.slow
def test_unknown_loss_aggregation(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm.loss_agg=token_mean"))
    assert "algorithm.loss_agg='token_mean'" in line and "seq-mean-token-mean" in line


@pytest.mark.slow
def test_unknown_learner_kernel(tmp_path):
    line = error_line(run_cli(tmp_path, "learner.kernels='gdn,flash'"))
    assert "learner.kernels='gdn,flash'" in line and "['flash']" in line and "causal_conv" in line


@pytest.mark.slow
def test_unknown_trainer_mode(tmp_path):
    line = error_line(run_cli(tmp_path, "trainer.mode=fast"))
    assert "trainer.mode='fast'" in line and "one_step_off" in line and "async" in line


@pytest.mark.slow
def test_stale_correction_without_importance_sampling(tmp_path):
    line = error_line(run_cli(tmp_path, "trainer.mode=async", "trainer.stale_policy=correct",
                              "algorithm.is_correction=none"))
    assert "algorithm.is_correction=none" in line and "tis" in line


@pytest.mark.slow
def test_missing_checkpoint_path(tmp_path):
    line = error_line(run_cli(tmp_path, f"policy.path={tmp_path / 'nope'}"))
    assert "does not exist" in line and "HF checkpoint folder" in line


@pytest.mark.slow
def test_checkpoint_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(run_cli(tmp_path, f"policy.path={tmp_path / 'empty'}"))
    assert "without config.json" in line


@pytest.mark.slow
def test_env_plugin_that_fails_to_import(tmp_path):
    line = error_line(run_cli(tmp_path, "env._target_=no_such_plugin.envs:MyEnv"))
    assert "could not be imported" in line and "no_such_plugin" in line and "pip install" in line


@pytest.mark.slow
def test_inconsistent_batch_sizes(tmp_path):
    line = error_line(run_cli(tmp_path, "rollout.prompts_per_step=3", "learner.num_ranks=5"))
    assert "samples must split evenly" in line and "learner.num_ranks=5" in line


@pytest.mark.slow
def test_group_size_one(tmp_path):
    line = error_line(run_cli(tmp_path, "rollout.group_size=1"))
    assert "rollout.group_size=1" in line and "at least 2" in line


@pytest.mark.slow
def test_ray_temp_dir_too_long(tmp_path):
    line = error_line(run_cli(tmp_path, "ray.temp_dir=/tmp/" + "x" * 80))
    assert "ray.temp_dir" in line and "shorter" in line


def test_environment_that_raises_stops_the_run_with_its_error(train):
    """The run's RunError (what the CLI prints as its one `error:` line, as for every RunError above)."""
    from common.errors import RunError

    with pytest.raises(RunError) as err:
        train("env._target_=tests.helpers.bad_envs:AlwaysRaisesEnv", "steps=2", "rollout.prompts_per_step=4",
              "learner.micro_batch_size=32")
    line = str(err.value)
    assert "failed on 32/32 episodes after 1 retries" in line
    assert "RuntimeError: reward service unavailable" in line and "Fix the environment" in line


def test_prompt_longer_than_the_context(train):
    """The calculator's tool prompt does not fit the default 512-token context: a clear error, not
    silently empty episodes."""
    with pytest.raises(ValueError) as err:  # the CLI prints it as its `error:` line
        train("env=calculator", "steps=1", "rollout.prompts_per_step=4", "learner.micro_batch_size=32")
    line = str(err.value)
    assert "leaves no room to answer within rollout.max_model_len=512" in line and "raise rollout.max_model_len" in line


def test_invalid_rewards_are_env_errors_naming_value_type_seed_and_fix():
    """NaN, inf, None, strings and arrays fail the episode (retried, counted, in env_errors.jsonl);
    numpy/torch scalars and bools are numbers."""
    import numpy as np
    import torch

    from rollout.env_pool import EnvHost

    target = "tests.helpers.bad_envs:ConstRewardEnv"
    bad = [(float("nan"), "reward nan; expected a finite number, got float"),
           (float("-inf"), "reward -inf; expected a finite number, got float"),
           (None, "reward None; expected a number (int or float), got NoneType"),
           ("0.5", "reward '0.5'; expected a number (int or float), got str"),
           (np.array([1.0, 2.0]), "got ndarray"), (torch.tensor([1.0]), "got Tensor")]
    for value, what in bad:
        host = EnvHost(None, target, {"reward": value})
        host.run_batch([("reset", 0, 7)])
        ok, msg = host.run_batch([("step", 0, "1")])[0]
        assert not ok and what in msg and "[episode seed 7]" in msg, msg
        assert f"Rewards must be finite numbers (int, float or a numpy/torch scalar): fix {target}.step" in msg
        assert not host.envs  # the env is dropped; the episode is retried on a fresh one
    for value, expected in [(np.float32(0.5), 0.5), (torch.tensor(0.25), 0.25), (True, 1.0), (np.int64(3), 3.0)]:
        host = EnvHost(None, target, {"reward": value})
        host.run_batch([("reset", 0, 7)])
        ok, out = host.run_batch([("step", 0, "1")])[0]
        assert ok and type(out[1]) is float and out[1] == expected


def test_unparseable_model_output_is_a_counted_zero_reward():
    """Built-in envs that parse the reply: an unreadable one scores 0 with info parse_error=1 (a
    readable wrong answer: 0), never an env error; the driver logs its mean as env/info/parse_error."""
    from rl.controller import info_means
    from rollout.trajectory import Trajectory
    from rollout.env_pool import EnvHost

    cases = {  # env: (unreadable turns, a readable but wrong final reply)
        "arithmetic": (["the answer is a mystery"], "answer: 123456"),
        "countdown": (["answer: 3 + + (7"], "answer: 3+7"),
        "calculator": (['<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>', "no idea"],
                       "123456"),
        "guess_number": (["banana"], "-1"),
        "code_tests": (["```python\ndef f(:\n```"], "```python\ndef f():\n    return 0\n```"),
    }
    trajs = []
    for name, (unreadable, wrong) in cases.items():
        for replies, want in [(unreadable, 1), ([wrong], 0)]:
            host = EnvHost(name, None, {})
            assert host.run_batch([("reset", 0, 3)])[0][0]
            for reply in replies:
                ok, (obs, reward, term, trunc, info) = host.run_batch([("step", 0, reply)])[0]
                assert ok and reward == 0.0, (name, reply, reward, info)
            assert info["parse_error"] == want, (name, replies, info)
            trajs.append(Trajectory(prompt_ids=[0], info=info))
    assert info_means(trajs)["env/info/parse_error"] == 0.5


@pytest.mark.slow
def test_env_kwargs_naming_a_missing_file(tmp_path):
    missing = tmp_path / "data" / "prompts.txt"
    proc = run_cli(tmp_path, "env._target_=tests.helpers.bad_envs:DatasetEnv", f"+env.kwargs.path={missing}")
    line = error_line(proc)
    assert_failed_before_start(proc)
    assert "could not be created with env.kwargs" in line and f"FileNotFoundError: [Errno 2] No such file or " \
        f"directory: '{missing}'" in line and "Fix env.kwargs" in line


@pytest.mark.slow
def test_policy_folder_without_tokenizer_files_or_weights(tmp_path, tiny_path):
    import shutil

    model = tiny_path("qwen3_5")
    no_tok, no_weights = tmp_path / "no_tok", tmp_path / "no_weights"
    shutil.copytree(model, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    shutil.copytree(model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    proc = run_cli(tmp_path, f"policy.path={no_tok}")
    line = error_line(proc)
    assert_failed_before_start(proc)
    assert f"policy.path='{no_tok}' has no tokenizer files (tokenizer.json" in line and "save_pretrained" in line
    proc = run_cli(tmp_path, f"policy.path={no_weights}")
    line = error_line(proc)
    assert_failed_before_start(proc)
    assert f"policy.path='{no_weights}' has config.json but no weights" in line and "save_pretrained" in line


@pytest.mark.slow
def test_tokenizer_without_chat_template(tmp_path, tiny_path):
    import json
    import shutil

    folder = tmp_path / "base_model"
    shutil.copytree(tiny_path("qwen3_5"), folder, ignore=shutil.ignore_patterns("chat_template*"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_cli(tmp_path, f"policy.path={folder}")
    line = error_line(proc)
    assert_failed_before_start(proc)
    assert f"the tokenizer at '{folder}' has no chat template" in line and "chat_template.jinja" in line
    assert "instruct checkpoint" in line


def test_bad_observations_are_contract_errors():
    """An empty first observation, a message whose content is not text/parts, tools that are not a
    list of schemas, or a dict instead of a message list for an episode that goes on: the episode
    fails with a message naming it (retried, counted), instead of an empty prompt, silently missing
    tools or a chat-template crash in the driver."""
    from rollout.env_pool import EnvHost

    target = "tests.helpers.bad_envs:BadObsEnv"
    for kind, want in [("empty_reset", "reset() returned an empty obs []"),
                       ("int_content", "reset() returned obs of type list (message 0 has content of type int: 7)"),
                       ("tools_dict", "reset() returned info['tools'] of type dict; expected a list of JSON tool")]:
        ok, msg = EnvHost(None, target, {"kind": kind}).run_batch([("reset", 0, 1)])[0]
        assert not ok and want in msg and "raised EnvContractError" in msg, msg
    host = EnvHost(None, target, {"kind": "dict_step_obs"})
    assert host.run_batch([("reset", 0, 1)])[0][0]
    ok, msg = host.run_batch([("step", 0, "1")])[0]
    assert not ok and "step() returned obs of type dict for an episode that goes on" in msg and "[episode seed 1]" in msg


# Real rollouts (Ray env actors + vLLM engine, in this process, on the session's Ray instance)
@pytest.fixture(scope="module")
def rollout(shared_ray, tiny_path):
    """(engine, tokenizer) of a tiny fp32 Qwen3 policy, shared by the tests below."""
    from policies.build import load_tokenizer
    from rl.settings import engine_config
    from rollout.engine import VLLMEngine

    ray = shared_ray.ensure()
    path = tiny_path("qwen3")
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, dtype="float32", max_model_len=1024))
    ray.get(engine.ready.remote())
    yield engine, load_tokenizer(path)
    ray.kill(engine)


def run_episodes(rollout, target: str, seeds: list[int], **settings):
    from rl.config import EnvConfig
    from rl.settings import env_pool, rollout_settings
    from rollout.episodes import EpisodeRunner

    engine, tok = rollout
    pool = env_pool(EnvConfig(name=None, _target_=target, num_actors=1))
    try:
        runner = EpisodeRunner(pool, [engine], tok, rollout_settings(**{"group_size": 4, "max_tokens": 16, "max_context": 1024, **settings}))
        return runner, runner.run(seeds=seeds)
    finally:
        pool.shutdown()


def test_invalid_rewards_fail_their_episodes_and_never_reach_the_learner(rollout):
    """Real rollouts: the episodes of the seed with a NaN reward and of the seed with a string reward
    fail after their retry and come back marked (reward 0, never NaN), counted and recorded with their
    seed; the other groups are unaffected. (What the controller then does with failed episodes, i.e.
    groups left out of the update, env_errors.jsonl, env.max_error_frac, is the same as for any env
    error: test_environment_that_raises_stops_the_run_with_its_error, tests/test_faults.py.)"""
    import math

    runner, trajs = run_episodes(rollout, "tests.helpers.bad_envs:BadRewardEnv", [0, 1, 2, 3], max_retries=1)
    s = runner.stats
    assert s["rollout/episodes"] == 16 and s["env/failed_episodes"] == 8 and s["env/failed_groups"] == 2
    assert s["env/errors"] == 16 and s["env/retries"] == 8  # 8 episodes x (1 try + 1 retry)
    assert all(math.isfinite(t.reward) and all(math.isfinite(r) for r in t.turn_rewards) for t in trajs)
    failed = [t for t in trajs if t.error]
    assert sorted({t.seed for t in failed}) == [0, 1] and all(t.reward == 0.0 for t in failed)
    assert all(t.error is None and t.num_policy_tokens > 0 for t in trajs if t.seed in (2, 3))
    assert sorted({e["seed"] for e in runner.errors}) == [0, 1] and len(runner.errors) == 16
    for e in runner.errors:
        want = ("returned reward nan; expected a finite number" if e["seed"] == 0
                else "returned reward '0.5'; expected a number (int or float), got str")
        assert want in e["error"] and f"[episode seed {e['seed']}]" in e["error"], e


def test_episode_longer_than_the_context_ends_exactly_at_the_limit(rollout):
    """A multi-turn env that never ends: every episode stops at rollout.max_model_len tokens exactly
    (an env reply past it is cut), with finish_reason "context"; its policy tokens and turn rewards
    are kept (not an error, not dropped) and it is counted in rollout/context_truncated."""
    limit = 120
    runner, trajs = run_episodes(rollout, "tests.helpers.bad_envs:LongReplyEnv", [0, 1], max_tokens=8,
                                 max_turns=1000, max_context=limit)
    assert runner.stats["rollout/context_truncated"] == 8 and runner.stats["env/errors"] == 0
    for t in trajs:
        assert t.error is None and t.finish_reason == "context"
        assert len(t.prompt_ids) + len(t.response_ids) == limit
        assert len(t.loss_mask) == len(t.behaviour_logprobs) == len(t.versions) == len(t.response_ids)
        assert t.turns >= 2 and t.num_policy_tokens >= t.turns and t.reward == 0.25 * t.turns
    assert any(t.loss_mask[-1] == 0 for t in trajs)  # an env reply was cut at the limit


@pytest.mark.slow
def test_resume_from_a_missing_folder_or_a_run_without_checkpoints(tmp_path):
    line = error_line(run_cli(tmp_path, f"resume={tmp_path / 'no_such_run'}"))
    assert f"resume={tmp_path / 'no_such_run'}: no such folder" in line and "resume=latest" in line, line
    half = tmp_path / "crashed" / "checkpoints" / "step_000004"  # a save that never finished
    half.mkdir(parents=True)
    line = error_line(run_cli(tmp_path, f"resume={tmp_path / 'crashed'}"))
    assert "no complete checkpoint" in line and "step_000004 never finished saving" in line, line
