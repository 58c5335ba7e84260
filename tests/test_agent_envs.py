"""Tool calls (Qwen3.5 XML and Qwen3 JSON forms), the calculator tool-use env, chat rendering of env
turns, and end-to-end CLI runs of the multi-turn tool-use and code-sandbox environments."""
import pytest

from envs.builtin.calculator import CalculatorEnv, safe_arithmetic
from envs.tools import parse_tool_calls
from policies.tokenizer import build_char_tokenizer
from rollout.episodes import ChatRenderer

XML_CALL = "<tool_call>\n<function=calculator>\n<parameter=expression>\n{expr}\n</parameter>\n</function>\n</tool_call>"


def test_parse_qwen3_5_xml_and_qwen3_json_tool_calls():
    text = ("let me compute.\n" + XML_CALL.format(expr="12*7") +
            '\n<tool_call>\n{"name": "lookup", "arguments": {"k": [1, 2], "n": 3}}\n</tool_call>')
    p = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in p.calls] == [("calculator", {"expression": "12*7"}),
                                                         ("lookup", {"k": [1, 2], "n": 3})]
    assert p.errors == [] and p.text == "let me compute."
    # XML parameter values that look like JSON are decoded; others stay text
    p = parse_tool_calls("<tool_call><function=f><parameter=a>\n5\n</parameter><parameter=b>x y</parameter></function></tool_call>")
    assert p.calls[0].arguments == {"a": 5, "b": "x y"}


def test_malformed_and_unterminated_tool_calls_are_errors_not_crashes():
    p = parse_tool_calls("<tool_call>{not json</tool_call>")
    assert not p.calls and len(p.errors) == 1 and "malformed tool call" in p.errors[0]
    p = parse_tool_calls("<tool_call>\n<function=calculator>\n<parameter=expression>\n1+1\n</parameter>")  # cut off by max_tokens
    assert p.calls[0].name == "calculator"  # the parameter block is complete, the call is usable
    assert parse_tool_calls("no tools here").calls == []


def test_calculator_env_tool_turn_then_answer():
    env = CalculatorEnv(max_tool_turns=2, call_reward=0.1)
    obs, info = env.reset(seed=3)
    assert info["tools"][0]["function"]["name"] == "calculator" and obs[0]["role"] == "user"
    gold = info["gold"]
    expr = obs[0]["content"].split("what is ")[1].split("?")[0]
    assert str(safe_arithmetic(expr)) == gold
    replies, r, term, trunc, step_info = env.step(XML_CALL.format(expr=expr))
    assert replies == [{"role": "tool", "content": gold}] and r == pytest.approx(0.1) and not (term or trunc)
    assert step_info["tool_calls"] == 1
    _, r, term, _, step_info = env.step(f"<think>\nmaybe 12345? or {XML_CALL.format(expr='1+1')}\n</think>\n\nthe answer is {gold}")
    assert term and r == 1.0 and step_info["exact"] and step_info["tool_turns"] == 1


def test_calculator_env_errors_are_answers_and_turns_are_bounded():
    env = CalculatorEnv(max_tool_turns=2)
    env.reset(seed=0)
    replies, r, *_ = env.step("<tool_call>\n<function=shell>\n<parameter=cmd>\nls\n</parameter>\n</function>\n</tool_call>")
    assert "unknown tool 'shell'" in replies[0]["content"] and r == 0.0
    replies, r, term, trunc, info = env.step(XML_CALL.format(expr="__import__('os').system('true')"))
    assert replies[0]["content"].startswith("error: ValueError") and trunc and not term
    assert info["tool_errors"] == 2
    with pytest.raises(TypeError, match="CalculatorEnv.step expects the policy's text"):
        env.step(None)


def test_env_turn_tokens_match_the_full_conversation_rendering():
    """prompt + policy turn + rendered tool reply == the template applied to the whole conversation,
    so the learner scores exactly the context the engine saw."""
    tok = build_char_tokenizer()
    r = ChatRenderer(tok)
    env = CalculatorEnv()
    obs, info = env.reset(seed=1)
    prompt = r.prompt_ids(obs, info["tools"])
    call = XML_CALL.format(expr="1+2")
    policy = tok.encode(call, add_special_tokens=False) + [tok.eos_token_id]
    replies = [{"role": "tool", "content": "3"}, {"role": "tool", "content": "again 3"}]
    env_ids = r.env_turn_ids(replies, policy)
    full = tok.apply_chat_template(obs + [{"role": "assistant", "content": call}] + replies, tools=info["tools"],
                                   add_generation_prompt=True, tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert prompt + policy + env_ids == full
    assert "<tool_response>\n3\n</tool_response>\n<tool_response>\nagain 3" in tok.decode(env_ids)


def test_tool_use_env_trains_end_to_end(train):
    """Multi-turn tool use in a whole run: per-turn and per-episode rewards and tool stats logged."""
    metrics = train("steps=2", "eval.every=0", "env=calculator", "rollout.max_turns=3",
                         "rollout.max_tokens=12", "rollout.max_model_len=1536", "rollout.prompts_per_step=8",
                         "rollout.group_size=4", "learner.micro_batch_size=16")
    for m in metrics:
        assert m["env/failed_episodes"] == 0 and m["rollout/episodes"] == 32
        for k in ("reward/mean", "reward/turn_mean", "episode/turns_mean", "env/info/tool_calls",
                  "env/info/tool_turns"):
            assert k in m, k
        assert 1.0 <= m["episode/turns_mean"] <= 3.0
    assert max(m["episode/turns_mean"] for m in metrics) > 1.0, "some episodes should take a tool turn"


def test_code_sandbox_env_trains_end_to_end(train):
    """Model-written Python run against unit tests in the sandbox, as the reward of a whole run."""
    metrics = train("steps=2", "eval.every=0", "env=code_tests", "rollout.max_tokens=16",
                         "rollout.prompts_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=16")
    for m in metrics:
        assert m["env/failed_episodes"] == 0 and m["rollout/episodes"] == 16
        assert 0.0 <= m["reward/mean"] <= 1.0 and "env/info/total" in m and m["env/info/total"] > 0


def test_env_turns_with_a_template_that_rerenders_earlier_turns():
    """Qwen3.5's template renders an assistant turn with an empty <think> block only after the last
    user query, so a user-role env reply changes how the earlier turn would be rendered. Env turn
    tokens must still be exactly what the template puts after the policy's turn."""
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{%- set ns = namespace(last=-1) -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and loop.index0 > ns.last -%}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    r = ChatRenderer(tok)
    policy = tok.encode("5", add_special_tokens=False)  # cut off before its EOS
    ids = r.env_turn_ids([{"role": "user", "content": "higher."}], policy)
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>user\nhigher.<|im_end|>\n<|im_start|>assistant\n"
