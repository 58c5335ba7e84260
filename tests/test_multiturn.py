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
    # the turns after the first continued the episode's engine session (only their new tokens were
    # prefilled), every session was ended with its episode, and the same episodes run as fresh
    # requests over the whole conversation sample the same tokens with the same logprobs (fp32)
    stats = wait_sessions_ended(ray, engine)
    assert stats["turns_continued"] == sum(x.turns - 1 for x in trajs) and stats["prefill_tokens_reused"] > 0
    runner.engine_sessions = False
    fresh = runner.run(seeds=[0, 1, 2, 3])
    assert ray.get(engine.session_stats.remote())["turns_continued"] == stats["turns_continued"]
    for a, b in zip(trajs, fresh):
        assert a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
        assert max(abs(x - y) for x, y in zip(a.behaviour_logprobs, b.behaviour_logprobs)) < 1e-4
    pool.shutdown()


def wait_sessions_ended(ray, engine, timeout: float = 30.0) -> dict:
    """The engine's session counters once no session is live (episodes end theirs without waiting)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(engine.session_stats.remote())
        if stats.get("live", 0) == 0 or time.monotonic() > deadline:
            assert stats and stats["live"] == 0, stats
            return stats
        time.sleep(0.1)


def test_sessions_on_qwen3_5_and_across_a_weight_load(ray_cluster, tiny_path):
    """The hybrid model (Gated DeltaNet state + attention KV, bf16 engine): a session's turns sample
    what fresh requests over the whole conversation sample, up to bf16 noise. A weight load while a
    session is paused (holding KV blocks) succeeds, the session's KV is given back first (so the
    load's prefix-cache reset, which needs every block free, works) and its next turn is computed
    afresh with the new weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    ray = ray_cluster
    path = tiny_path("qwen3_5")
    tok = load_tokenizer(path)
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, max_model_len=1024))
    ray.get(engine.ready.remote())
    pool = env_pool(EnvConfig(name="guess_number", kwargs={"max_turns": 3}, num_actors=1))
    runner = EpisodeRunner(pool, [engine], tok, rollout_settings(group_size=4, max_tokens=4, max_turns=3, max_context=1024))
    trajs = runner.run(seeds=[5, 6, 7, 8])
    stats = wait_sessions_ended(ray, engine)
    assert stats["turns_continued"] == sum(x.turns - 1 for x in trajs) > 0
    runner.engine_sessions = False
    fresh = runner.run(seeds=[5, 6, 7, 8])
    same = diffs = 0
    for a, b in zip(trajs, fresh):
        for i, (x, y) in enumerate(zip(a.response_ids, b.response_ids)):
            if x != y:
                break
            if a.loss_mask[i]:
                same += 1
                diffs = max(diffs, abs(a.behaviour_logprobs[i] - b.behaviour_logprobs[i]))
    policy_tokens = sum(x.num_policy_tokens for x in trajs)
    assert same >= 0.9 * policy_tokens and diffs < 0.05, (same, policy_tokens, diffs)
    pool.shutdown()

    prompt = trajs[0].prompt_ids
    first = ray.get(engine.generate_one.remote(prompt, 4, 1.0, 1.0, 11, session="w"))
    assert ray.get(engine.session_stats.remote())["paused"] == 1
    version = ray.get(engine.get_version.remote()) + 1
    named = list(load_file(str(Path(path) / "model.safetensors")).items())
    ray.get(engine.receive_weights.remote("object_store", version, named))
    assert ray.get(engine.commit_weights.remote(version, interrupt=True))["tensors"] > 0
    stats = ray.get(engine.session_stats.remote())
    assert stats["paused"] == 0 and stats["live"] == 0
    nxt = ray.get(engine.generate_one.remote(prompt + first.token_ids + [tok.eos_token_id], 4, 1.0, 1.0, 12,
                                             session="w", last_turn=True))
    assert nxt.version == version and len(nxt.token_ids) > 0
    assert ray.get(engine.session_stats.remote())["turns_continued"] == stats["turns_continued"]  # afresh
    ray.kill(engine)
