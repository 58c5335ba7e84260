"""The tiny random-init Qwen3.5 policy visibly learns the built-in env with the real stack.

Stated margin: over the default run (30 steps of 32 prompts x 8 samples), the mean reward of the
last 4 steps must exceed that of the first 4 steps by at least 0.12 (it starts near 0.08: a random
policy rarely answers with a single digit followed by end-of-turn). Every episode samples with its
own seed (rollout/episodes.py sample_seed), so a run repeats exactly on the same machine; other
machines' kernels may round differently and take another path. Before per-episode seeds runs
differed: most learned the format (reward ~0.3-0.4, stop fraction ~1.0); one settled on digits
without end-of-turn (reward 0.22 after 24 steps), which is why the margin is on reward, over the
full default length.
"""
import statistics

from tests.test_e2e import run_cli

STEPS, WINDOW, MARGIN = 30, 4, 0.12


def test_mean_reward_rises_on_copy_digits(tmp_path):
    _, metrics = run_cli(tmp_path, f"steps={STEPS}", "logger=console")
    rewards = [m["reward/mean"] for m in metrics]
    start, end = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    print(f"reward first {WINDOW} steps {start:.3f} -> last {WINDOW} steps {end:.3f}: {rewards}")
    assert end >= start + MARGIN, rewards
