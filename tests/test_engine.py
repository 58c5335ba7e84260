"""The rollout engine's two backends (in-process LLMEngine thread, vLLM AsyncLLM) as Ray actors:
many concurrent requests, identical seeded samples, and weight commits on both."""
import asyncio

import pytest
from safetensors.torch import load_file

from rollout.engine import engine_actor
from rl.settings import engine_config


@pytest.fixture(scope="module")
def qwen3_5(tiny_path):
    return tiny_path("qwen3_5")


def _engine(ray, path, backend):
    eng = engine_actor(num_cpus=0.5).remote(engine_config(model=path, backend=backend))
    info = ray.get(eng.ready.remote())
    assert info["backend"] == backend
    return eng


def test_backends_agree_and_serve_concurrent_requests(ray_cluster, qwen3_5):
    ray = ray_cluster
    prompts = [[1, 5, 6, 7 + i % 9] for i in range(300)]
    results = {}
    for backend in ("inproc", "async"):
        eng = _engine(ray, qwen3_5, backend)
        # 300 concurrent requests, each its own Ray call: they share the engine's running batch
        outs = ray.get([eng.generate_one.remote(p, 6, 1.0, 1.0, i) for i, p in enumerate(prompts)])
        assert len(outs) == 300 and all(1 <= len(c.token_ids) == len(c.logprobs) <= 6 for c in outs)
        # a request the engine rejects fails at once (it never hangs), and the engine keeps serving
        with pytest.raises(Exception, match="(?i)length|context|too long|exceed"):
            ray.get(eng.generate_one.remote([1] * 5000, 4), timeout=120)
        assert len(ray.get(eng.generate_one.remote(prompts[0], 3), timeout=120).token_ids) >= 1
        # a weight commit (the checkpoint's own tensors) is adopted and leaves the model unchanged
        before = ray.get(eng.score.remote([p + c.token_ids for p, c in zip(prompts[:8], outs[:8])]))
        sd = load_file(f"{qwen3_5}/model.safetensors")
        ray.get(eng.receive_weights.remote("object_store", 1, list(sd.items())))
        assert ray.get(eng.commit_weights.remote(1))["tensors"] > 0
        assert ray.get(eng.get_version.remote()) == 1
        after = ray.get(eng.score.remote([p + c.token_ids for p, c in zip(prompts[:8], outs[:8])]))
        assert max(abs(x - y) for b, a in zip(before, after) for x, y in zip(b, a)) < 1e-6
        results[backend] = outs
        ray.kill(eng)
    a, b = results["inproc"], results["async"]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # same seeds, same samples
    assert max(abs(x - y) for ca, cb in zip(a, b) for x, y in zip(ca.logprobs, cb.logprobs)) < 1e-5


def test_seeded_samples_do_not_depend_on_chunked_prefill(ray_cluster, qwen3_5):
    """A long prompt prefilled in chunks (here: a 32-token budget per engine step) gets throw-away
    samples for its partial chunks; vLLM 0.32 rewinds the request's generator after each with
    Generator.set_offset, which CPU generators lack (the engine died: 'CPU Generator does not use
    offset'). rollout/vllm_ext.py restores the saved state instead: the same seeds give the same
    tokens as without chunking."""
    ray = ray_cluster
    prompts = [[1 + (7 * i + j) % 60 for j in range(100)] for i in range(12)]
    outs = {}
    for budget in (None, 32):
        extra = {"max_num_batched_tokens": budget} if budget else {}
        eng = engine_actor(num_cpus=0.5).remote(engine_config(model=qwen3_5, backend="inproc", extra=extra))
        ray.get(eng.ready.remote())
        outs[budget] = ray.get([eng.generate_one.remote(p, 6, 1.0, 1.0, 1000 + i) for i, p in enumerate(prompts)])
        ray.kill(eng)
    assert [c.token_ids for c in outs[32]] == [c.token_ids for c in outs[None]]
