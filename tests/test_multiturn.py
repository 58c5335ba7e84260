"""Multi-turn episodes with the real env pool and engine: env tokens stay in context but are masked,
every policy token carries its version, and token ids are carried through turns unchanged."""
import pytest
import torch

from envs import make_env
from policies.build import load_tokenizer
from rollout.trajectory import collate
from rl.config import EnvConfig
from rl.settings import engine_config, env_pool, rollout_settings
from rollout.engine import VLLMEngine
from rollout.episodes import EpisodeRunner


def test_guess_number_rewards_and_feedback():
    env = make_env("guess_number", kwargs={"max_turns": 3})
    obs, info = env.reset(seed=3)
    secret = info["secret"]
    wrong = (secret + 1) % 10
    obs, r, term, trunc, _ = env.step(str(wrong))
    assert r == 0.0 and not term and not trunc
    assert obs[0]["content"] == ("lower." if wrong > secret else "higher.")
    obs, r, term, trunc, _ = env.step("banana")
    assert obs[0]["content"] == "answer with a number only." and not trunc
    _, r, term, _, info = env.step(f" {secret}")
    assert term and info["solved"] and r == pytest.approx(0.7 ** 2)
    env.reset(seed=3)
    for _ in range(3):
        *_, trunc, info = env.step(str(wrong))
    assert trunc and not info["solved"]


def test_multiturn_token_bookkeeping_with_real_engine(ray_cluster, tiny_path):
    ray = ray_cluster
    path = tiny_path("qwen3")  # fp32 engine: sampling logprobs can be compared to a rescore exactly
    tok = load_tokenizer(path)
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, dtype="float32", max_model_len=1024))
    ray.get(engine.ready.remote())
    pool = env_pool(EnvConfig(name="guess_number", kwargs={"max_turns": 3}, num_actors=2))
    runner = EpisodeRunner(pool, [engine], tok, rollout_settings(group_size=4, max_tokens=3, max_turns=3, max_context=1024))
    trajs = runner.run(seeds=[0, 1, 2, 3])
    assert len(trajs) == 16 and runner.stats["env/failed_episodes"] == 0
    multi = [t for t in trajs if t.turns > 1]
    assert multi, "a random policy should rarely guess right on the first turn"
    for t in trajs:
        n = len(t.response_ids)
        assert len(t.loss_mask) == len(t.behaviour_logprobs) == len(t.versions) == n
        assert all((v == 0) == (m == 1) for v, m in zip(t.versions, t.loss_mask))  # version 0 on policy tokens
    t = multi[0]
    env_tokens = [i for i, m in zip(t.response_ids, t.loss_mask) if m == 0]
    env_text = tok.decode(env_tokens)
    assert "<|im_start|>user\n" in env_text and "<|im_start|>assistant\n" in env_text
    assert any(s in env_text for s in ("higher.", "lower.", "answer with a number only."))
    # token ids carried through turns: rescoring the whole sequence reproduces the sampling logprobs
    seqs = [x.prompt_ids + x.response_ids for x in multi]
    scores = ray.get(engine.score.remote(seqs))
    for x, s in zip(multi, scores):
        p = len(x.prompt_ids)
        for j, (m, lp) in enumerate(zip(x.loss_mask, x.behaviour_logprobs)):
            if m:
                assert abs(s[p - 1 + j] - lp) < 1e-4
    batch = collate(trajs, tok.pad_token_id)
    assert batch["loss_mask"].sum().item() == sum(x.num_policy_tokens for x in trajs)
    assert torch.all(batch["versions"][batch["loss_mask"] == 0] == -1)
    pool.shutdown()
