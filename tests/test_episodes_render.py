"""The episodes of a group share their first prompt: the chat template renders it once."""
from policies.tokenizer import save_tokenizer
from rollout.episodes import ChatRenderer


def test_group_prompt_rendered_once(tmp_path):
    tok = save_tokenizer(tmp_path / "tok", "char")
    calls = []
    real = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **k: calls.append(1) or real(*a, **k)
    render = ChatRenderer(tok)
    first = render.prompt_ids("copy 7")
    again = [render.prompt_ids("copy 7") for _ in range(7)]
    other = render.prompt_ids("copy 8")
    assert len(calls) == 2  # one per distinct observation
    assert all(a == first for a in again) and other != first
    again[0].append(99)  # callers get their own list: the cache is not mutated through it
    assert render.prompt_ids("copy 7") == first
