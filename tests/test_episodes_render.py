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


def test_env_replies_rendered_once_and_closed_per_turn(tmp_path):
    """An env reply is rendered by the chat template once per distinct reply; whether the policy's
    turn needs its EOS appended is decided per call."""
    tok = save_tokenizer(tmp_path / "tok", "char")
    calls = []
    real = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **k: calls.append(1) or real(*a, **k)
    render = ChatRenderer(tok)
    reply = [{"role": "user", "content": "higher."}]
    eos = tok.eos_token_id
    open_turn = render.env_turn_ids(reply, [5, 6])
    closed_turn = render.env_turn_ids(reply, [5, eos])
    assert len(calls) == 1
    assert open_turn == [eos] + closed_turn and tok.decode(closed_turn).endswith("<|im_start|>assistant\n")
    closed_turn.append(99)  # callers get their own list
    assert render.env_turn_ids(reply, [eos]) == open_turn[1:]
    render.env_turn_ids([{"role": "user", "content": "lower."}], [eos])
    assert len(calls) == 2
