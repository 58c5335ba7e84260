"""The fused Triton LM-head op (rl/fused_logprobs.py) gives the float64 logprobs, entropy and gradients,
run on CPU under Triton's interpreter; without interpreter mode on CPU, `fused=True` falls back to the
chunked path. Chunks and vocab blocks split unevenly (n=37, chunk 16; V=1000, BLOCK_V=256).

Triton picks interpreter mode when it is imported (its own library functions are jitted then), and
vLLM imports triton, so the interpreted checks (`interp_*`, collected only in that run) run in a fresh
`TRITON_INTERPRET=1` pytest subprocess (test_kernels_under_interpreter); by hand:
`TRITON_INTERPRET=1 pytest -o python_functions='interp_*' tests/test_fused_logprobs.py`."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from rl import fused_logprobs as fl  # noqa: E402
from rl.logprobs import head_logprobs  # noqa: E402
from tests.conftest import REPO  # noqa: E402

N, H, V, CHUNK = 37, 64, 1000, 16
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels run by the interpreter on CPU, with vocab blocks that split V unevenly."""
    assert INTERPRETED, "interp_* checks run with TRITON_INTERPRET=1 (see the module docstring)"
    monkeypatch.setattr(fl, "BLOCK_V", 256)


@pytest.mark.slow
def test_kernels_under_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-o", "python_functions=interp_*"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 9 and "skipped" not in out, out[-4000:]


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 2 / H**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, head, targets, torch.randn(N, generator=g), torch.randn(N, generator=g)


def reference(hidden, weight, targets, g_lp, g_ent):
    """float64 lp, ent and d(g_lp.lp + g_ent.ent)/d(hidden, weight) (g_* None: that term is left out)."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h @ w.t(), dim=-1)
    lp, ent = logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
    loss = sum((x * g.double()).sum() for x, g in ((lp, g_lp), (ent, g_ent)) if g is not None)
    loss.backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_entropy", [False, True])
def interp_fused_matches_float64(interpret, dtype, tol, with_entropy):
    hidden, head, targets, g_lp, g_ent = inputs(dtype)
    h = hidden.clone().requires_grad_()
    assert fl.can_fuse(head, h), fl.fuse_blocker(head, h)
    out = head_logprobs(head, h, targets, CHUNK, with_entropy, fused=True)
    lp, ent = out if with_entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == (N,) and lp.grad_fn is not None
    assert "FusedHeadLogprobs" in type(lp.grad_fn).__name__  # the fused op ran, not the fallback
    (lp * g_lp).sum().add((ent * g_ent).sum() if with_entropy else 0).backward()
    lp_ref, ent_ref, gh_ref, gw_ref = reference(hidden, head.weight, targets, g_lp, g_ent if with_entropy else None)
    assert rel(lp, lp_ref) < tol
    if with_entropy:
        assert ent.shape == (N,) and rel(ent, ent_ref) < tol
    assert h.grad.dtype == head.weight.grad.dtype == dtype
    assert rel(h.grad, gh_ref) < tol and rel(head.weight.grad, gw_ref) < tol


def interp_one_output_and_one_input_grad(interpret):
    """Only the entropy is used (g_lp is None), the weight is frozen; then only lp (g_ent is None)."""
    hidden, head, targets, g_lp, g_ent = inputs(torch.float32, seed=1)
    w = head.weight.detach()
    h = hidden.clone().requires_grad_()
    lp, ent = fl.fused_head_logprobs(h, w, targets, CHUNK, with_entropy=True)
    (ent * g_ent).sum().backward()
    _, ent_ref, gh_ref, _ = reference(hidden, w, targets, None, g_ent)
    assert rel(ent, ent_ref) < 1e-5 and rel(h.grad, gh_ref) < 1e-5

    w = w.clone().requires_grad_()
    lp, ent = fl.fused_head_logprobs(hidden, w, targets, N, with_entropy=True)  # one chunk
    (lp * g_lp).sum().backward()
    _, _, _, gw_ref = reference(hidden, w.detach(), targets, g_lp, None)
    assert rel(w.grad, gw_ref) < 1e-5
    with torch.no_grad():
        assert torch.equal(fl.fused_head_logprobs(hidden, w, targets, CHUNK), lp.detach())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def interp_kept_logits_match_float64(interpret, dtype, tol):
    """keep_logits=True (no head recompute in backward; one kernel and one matmul per gradient over all
    rows) gives the float64 gradients, and the same logprobs and entropy as recomputing."""
    hidden, head, targets, g_lp, g_ent = inputs(dtype, seed=2)
    out = []
    for keep in (False, True):
        h, w = hidden.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
        lp, ent = fl.fused_head_logprobs(h, w, targets, CHUNK, with_entropy=True, keep_logits=keep)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        out.append((lp, ent, h.grad, w.grad))
    _, _, gh_ref, gw_ref = reference(hidden, head.weight, targets, g_lp, g_ent)
    (lp0, ent0, _, _), (lp1, ent1, gh, gw) = out
    assert torch.allclose(lp0, lp1, rtol=0, atol=1e-4) and torch.allclose(ent0, ent1, rtol=0, atol=1e-4)
    assert gh.dtype == gw.dtype == dtype
    assert rel(gh, gh_ref) < tol and rel(gw, gw_ref) < tol


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, head, targets, g_lp, g_ent = inputs(torch.float32)
    assert not fl.can_fuse(head, hidden) and "not on CUDA" in fl.fuse_blocker(head, hidden)
    res = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        lp, ent = head_logprobs(head, h, targets, CHUNK, with_entropy=True, fused=fused)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        res.append((lp, ent, h.grad, head.weight.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*res))


def interp_fuse_blocker_names_the_reason(interpret):
    hidden = torch.randn(3, H)
    assert fl.fuse_blocker(torch.nn.Linear(H, V, bias=False), hidden) == ""
    assert "bias" in fl.fuse_blocker(torch.nn.Linear(H, V), hidden)
    assert "not a plain nn.Linear" in fl.fuse_blocker(torch.nn.Embedding(V, H), hidden)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on partitioned parameters
    assert "ZeRO-3" in fl.fuse_blocker(head, hidden)
    assert "bfloat16" in fl.fuse_blocker(torch.nn.Linear(H, V, bias=False), hidden.bfloat16())
    with pytest.raises(ValueError, match="targets"):
        fl.fused_head_logprobs(hidden, torch.randn(V, H), torch.zeros(4, dtype=torch.long))


def interp_packed_model_fused_equals_unfused(interpret, monkeypatch):
    """A real (tied-embedding) transformers model through rl.packing: same logprobs, entropy, grads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rl.packing import packed_token_logprobs, prepare

    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    lengths = torch.tensor([9, 30, 4])
    ids = torch.randint(1, 300, (3, 30), generator=torch.Generator().manual_seed(0))
    calls, fused_op = [], fl.fused_head_logprobs
    monkeypatch.setattr(fl, "fused_head_logprobs", lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    res = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg).float()
        prepare(model)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert fl.can_fuse(model.get_output_embeddings(), torch.zeros(1, 64))
        lp, ent = packed_token_logprobs(model, ids, lengths, chunk_tokens=CHUNK, with_entropy=True, fused=fused)
        (lp.sum() + 0.3 * ent.sum()).backward()
        res.append([lp, ent] + [p.grad for p in model.parameters()])
    assert len(calls) == 1  # fused=True took the fused op, fused=False did not
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
