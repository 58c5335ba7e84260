"""The tiny random-init Qwen3.5 policy visibly learns the built-in env with the real stack.

Stated margin: over 24 steps of the default config (32 prompts x 8 samples per step), the mean
reward of the last 4 steps must exceed that of the first 4 steps by at least 0.12 (it starts
near 0.08: a random policy rarely answers with a single digit followed by end-of-turn).
"""
import statistics

from tests.test_e2e import run_cli

STEPS, WINDOW, MARGIN = 24, 4, 0.12


def test_mean_reward_rises_on_copy_digits(tmp_path):
    _, metrics = run_cli(tmp_path, f"steps={STEPS}", "logger=console")
    rewards = [m["reward/mean"] for m in metrics]
    start, end = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    print(f"reward first {WINDOW} steps {start:.3f} -> last {WINDOW} steps {end:.3f}: {rewards}")
    assert end >= start + MARGIN, rewards
    # it learned to answer briefly and stop at end-of-turn
    assert metrics[-1]["response/stop_frac"] > metrics[0]["response/stop_frac"] + 0.3
