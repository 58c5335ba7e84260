"""Chunked token logprobs and entropy (rl/logprobs.py) equal the naive full-logits computation, in
value and in gradient, for chunk sizes that split the sequence unevenly (the 248K-vocab path)."""
from types import SimpleNamespace

import pytest
import torch

from rl.logprobs import token_logprobs


class HeadOnly(torch.nn.Module):
    def __init__(self, head, hidden):
        super().__init__()
        self.lm_head, self._h = head, hidden
        self.model = lambda input_ids, use_cache=False: SimpleNamespace(last_hidden_state=self._h)

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_naive_with_gradients(chunk):
    torch.manual_seed(0)
    B, T, H, V = 2, 23, 16, 997
    head = torch.nn.Linear(H, V, bias=False)
    ids = torch.randint(0, V, (B, T))
    h0 = torch.randn(B, T, H)

    h = h0.clone().requires_grad_(True)
    logp = torch.log_softmax(head(h[:, :-1]), dim=-1)
    lp_ref = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logp.exp() * logp).sum(-1)
    (lp_ref.sum() + 0.3 * ent_ref.sum()).backward()
    g_h_ref, g_w_ref = h.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    h = h0.clone().requires_grad_(True)
    lp, ent = token_logprobs(HeadOnly(head, h), ids, chunk, with_entropy=True)
    (lp.sum() + 0.3 * ent.sum()).backward()
    assert lp.shape == ent.shape == (B, T - 1)
    assert torch.allclose(lp, lp_ref, atol=1e-5) and torch.allclose(ent, ent_ref, atol=1e-5)
    assert torch.allclose(h.grad, g_h_ref, atol=1e-5) and torch.allclose(head.weight.grad, g_w_ref, atol=1e-5)


def test_no_grad_scoring_matches():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False)
    ids, h = torch.randint(0, 50, (1, 12)), torch.randn(1, 12, 8)
    with torch.no_grad():
        a = token_logprobs(HeadOnly(head, h), ids, 5)
        b = token_logprobs(HeadOnly(head, h), ids, 4096)
    assert torch.allclose(a, b, atol=1e-6) and not a.requires_grad
