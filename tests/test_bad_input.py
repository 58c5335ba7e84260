"""Bad input gets a one-line error naming the cause and the fix (checked through the real CLI)."""
import subprocess
import sys

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


def test_unknown_config_key(tmp_path):
    line = error_line(run_cli(tmp_path, "learner.zero_stge=3"))
    assert "unknown config key 'learner.zero_stge'" in line and "zero_stage" in line


def test_unknown_group_option(tmp_path):
    line = error_line(run_cli(tmp_path, "env=no_such_env"))
    assert "env/no_such_env" in line and "copy_digits" in line


def test_unknown_algorithm_lists_the_available_ones(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm=ppo2"))
    assert "algorithm/ppo2" in line
    for name in ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo"):
        assert name in line.split("available")[1], line


def test_unknown_advantage_estimator(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm.advantage=gae2"))
    assert "algorithm.advantage='gae2' is unknown" in line and "gae" in line and "rloo" in line


def test_unknown_loss_aggregation(tmp_path):
    line = error_line(run_cli(tmp_path, "algorithm.loss_agg=token_mean"))
    assert "algorithm.loss_agg='token_mean'" in line and "seq-mean-token-mean" in line


def test_unknown_trainer_mode(tmp_path):
    line = error_line(run_cli(tmp_path, "trainer.mode=fast"))
    assert "trainer.mode='fast'" in line and "one_step_off" in line and "async" in line


def test_stale_correction_without_importance_sampling(tmp_path):
    line = error_line(run_cli(tmp_path, "trainer.mode=async", "trainer.stale_policy=correct",
                              "algorithm.is_correction=none"))
    assert "algorithm.is_correction=none" in line and "tis" in line


def test_missing_checkpoint_path(tmp_path):
    line = error_line(run_cli(tmp_path, f"policy.path={tmp_path / 'nope'}"))
    assert "does not exist" in line and "HF checkpoint folder" in line


def test_checkpoint_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(run_cli(tmp_path, f"policy.path={tmp_path / 'empty'}"))
    assert "without config.json" in line


def test_env_plugin_that_fails_to_import(tmp_path):
    line = error_line(run_cli(tmp_path, "env._target_=no_such_plugin.envs:MyEnv"))
    assert "could not be imported" in line and "no_such_plugin" in line and "pip install" in line


def test_inconsistent_batch_sizes(tmp_path):
    line = error_line(run_cli(tmp_path, "rollout.prompts_per_step=3", "learner.num_ranks=5"))
    assert "samples must split evenly" in line and "learner.num_ranks=5" in line


def test_group_size_one(tmp_path):
    line = error_line(run_cli(tmp_path, "rollout.group_size=1"))
    assert "rollout.group_size=1" in line and "at least 2" in line


def test_ray_temp_dir_too_long(tmp_path):
    line = error_line(run_cli(tmp_path, "ray.temp_dir=/tmp/" + "x" * 80))
    assert "ray.temp_dir" in line and "shorter" in line


def test_environment_that_raises_stops_the_run_with_its_error(tmp_path):
    proc = run_cli(tmp_path, "env._target_=tests.helpers.bad_envs:AlwaysRaisesEnv", "steps=2",
                   "rollout.prompts_per_step=4", "learner.micro_batch_size=32")
    line = error_line(proc)
    assert "failed on 32/32 episodes after 1 retries" in line
    assert "RuntimeError: reward service unavailable" in line and "Fix the environment" in line


def test_prompt_longer_than_the_context(tmp_path):
    """The calculator's tool prompt does not fit the default 512-token context: a clear error, not
    silently empty episodes."""
    proc = run_cli(tmp_path, "env=calculator", "steps=1", "rollout.prompts_per_step=4",
                   "learner.micro_batch_size=32")
    line = error_line(proc)
    assert "leaves no room to answer within rollout.max_model_len=512" in line and "raise rollout.max_model_len" in line
