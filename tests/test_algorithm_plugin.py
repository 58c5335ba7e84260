"""A user algorithm from a plugin, without editing the core: the docs' example estimator plus a
policy loss, registered through the `rl.algorithms` entry-point group, train for real."""
import pytest
import json
import re
import subprocess
import sys

from tests.conftest import REPO, cli_env, short_tmp

DOCS = REPO / "docs" / "algorithms.md"

PLAIN_PG = '''
import torch

from rl.algorithms import register_policy_loss


@register_policy_loss("pg_ratio")
def pg_ratio(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2):
    """Unclipped importance-weighted policy gradient."""
    return -torch.exp(logprobs - old_logprobs) * advantages, {"clip_frac": 0.0}
'''


def make_site(root):
    """A folder on PYTHONPATH holding the modules and a dist-info with their entry points (what
    `pip install` of a plugin package leaves behind)."""
    site = root / "site"
    site.mkdir()
    block = re.findall(r"^```python\n(.*?)^```", DOCS.read_text(), re.S | re.M)
    assert len(block) == 1, "docs/algorithms.md should have exactly one python block"
    (site / "my_algos.py").write_text(block[0])
    (site / "my_losses.py").write_text(PLAIN_PG)
    info = site / "my_algos-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-algos\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rl.algorithms]\nmedian_baseline = my_algos\npg_ratio = my_losses\n")
    return site


@pytest.mark.slow
def test_plugin_algorithm_trains(tmp_path):
    site = make_site(tmp_path)
    env = cli_env(tmp_path)
    env["PYTHONPATH"] = f"{site}:{REPO}"
    cmd = [sys.executable, "-m", "rl.train", f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
           f"ray.temp_dir={short_tmp()}", "logger=console", "steps=2", "eval.every=0", "rollout.prompts_per_step=8",
           "rollout.group_size=4", "learner.micro_batch_size=32", "algorithm.advantage=median_baseline", "algorithm.policy_loss=pg_ratio"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["policy/version"] for m in metrics] == [1, 2]
    assert all(m["advantage/abs_mean"] > 0 and m["train/grad_norm"] > 0 for m in metrics)


@pytest.mark.slow
def test_plugin_names_are_listed_when_misspelt(tmp_path):
    site = make_site(tmp_path)
    env = cli_env(tmp_path)
    env["PYTHONPATH"] = f"{site}:{REPO}"
    cmd = [sys.executable, "-m", "rl.train", f"run_dir={tmp_path / 'run'}", "logger=console",
           "algorithm.advantage=median_baselin"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = [l for l in proc.stderr.splitlines() if l.startswith("error: ")][0]
    assert "median_baselin" in line and "median_baseline" in line.split("available")[1]
