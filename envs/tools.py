"""Tool calls in the policy's text, and `ToolEnv`: a base class for environments whose policy calls tools.

Qwen3.5 writes tool calls in the XML form (vLLM's `qwen3_coder` parser):

    <tool_call>
    <function=calculator>
    <parameter=expression>
    12*7
    </parameter>
    </function>
    </tool_call>

Qwen3 (and many fine-tunes) write JSON instead: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
Both are parsed. A `ToolEnv` episode: the policy calls tools (the env runs them and answers with
`tool` messages), then gives a final answer without a tool call, which `score_answer` rewards.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from envs.base import TextEnv

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ParsedTurn:
    calls: list[ToolCall]
    errors: list[str]  # malformed calls, with what was wrong
    text: str  # the turn with tool calls removed


def _coerce(value: str) -> Any:
    """XML parameters arrive as text; JSON-looking values (numbers, lists, objects) are decoded."""
    try:
        return json.loads(value)
    except (ValueError, TypeError, RecursionError):
        return value


def parse_tool_calls(text: str) -> ParsedTurn:
    calls, errors = [], []
    for block in _CALL.findall(text):
        body = block.strip()
        fn = _FUNCTION.search(body)
        if fn:
            args = {k: _coerce(v.strip()) for k, v in _PARAM.findall(fn.group(2))}
            calls.append(ToolCall(fn.group(1), args))
            continue
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
            calls.append(ToolCall(name, args))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            errors.append(f"malformed tool call {body[:80]!r}: {type(e).__name__}: {str(e)[:200]}")
    return ParsedTurn(calls, errors, _CALL.sub("", text).strip())


def strip_reasoning(text: str) -> str:
    """The answer part of a turn: what follows Qwen3.5's `</think>` (tool calls and answers inside
    the reasoning do not count)."""
    return text.rsplit("</think>", 1)[-1].strip() if "</think>" in text else text


def function_schema(name: str, description: str, parameters: dict[str, tuple[str, str]],
                    required: list[str] | None = None) -> dict:
    """An OpenAI-style tool schema (what chat templates render for `tools=`).
    parameters: {name: (json type, description)}."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {k: {"type": t, "description": d} for k, (t, d) in parameters.items()},
                       "required": list(parameters) if required is None else required}}}


class ToolEnv(TextEnv):
    """Multi-turn env with tools. Subclasses set `tools` ({name: callable(**arguments) -> str}) and
    `tool_schemas`, and implement `make_task(rng) -> (messages, info)` and
    `score_answer(text) -> (reward, info)`.

    Per turn: tool calls -> the env runs them and replies with `tool` messages (reward
    `call_reward` for a turn whose calls were all well-formed and ran without error); no tool call -> the final answer is scored
    and the episode ends. After `max_tool_turns` tool turns the episode is truncated.
    info["parse_error"] is 1 once a tool call was malformed or `score_answer` reported a parse_error."""

    tools: dict[str, Callable[..., str]] = {}
    tool_schemas: list[dict] = []

    def __init__(self, max_tool_turns: int = 3, call_reward: float = 0.0, max_result_chars: int = 2000):
        self.max_tool_turns, self.call_reward, self.max_result_chars = max_tool_turns, call_reward, max_result_chars
        self.tool_turns = 0
        self.stats = {"tool_calls": 0, "tool_errors": 0}

    def make_task(self, rng) -> tuple[list[dict], dict]:
        raise NotImplementedError

    def score_answer(self, text: str) -> tuple[float, dict]:
        raise NotImplementedError

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        import random

        self.tool_turns = 0
        self.stats = {"tool_calls": 0, "tool_errors": 0}
        self.parse_error = 0
        messages, info = self.make_task(random.Random(seed))
        return messages, {**info, "tools": self.tool_schemas}

    def run_tool(self, call: ToolCall) -> str:
        fn = self.tools.get(call.name)
        if fn is None:
            self.stats["tool_errors"] += 1
            return f"error: unknown tool {call.name!r}; available: {', '.join(sorted(self.tools))}"
        try:
            out = str(fn(**call.arguments))
        except Exception as e:  # noqa: BLE001 - a tool error is an answer to the policy, not a crash
            self.stats["tool_errors"] += 1
            return f"error: {type(e).__name__}: {e}"
        return out[: self.max_result_chars]

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"{type(self).__name__}.step expects the policy's text, got {type(action).__name__}")
        parsed = parse_tool_calls(strip_reasoning(action))
        if not parsed.calls and not parsed.errors:
            reward, info = self.score_answer(parsed.text)
            self.parse_error = max(self.parse_error, int(info.get("parse_error", 0)))
            return [], reward, True, False, {**info, **self.stats, "tool_turns": self.tool_turns,
                                             "parse_error": self.parse_error}
        self.tool_turns += 1
        self.parse_error = max(self.parse_error, int(bool(parsed.errors)))
        self.stats["tool_calls"] += len(parsed.calls)
        self.stats["tool_errors"] += len(parsed.errors)
        errors_before = self.stats["tool_errors"]
        replies = [{"role": "tool", "content": self.run_tool(c)} for c in parsed.calls]
        replies += [{"role": "tool", "content": f"error: {e}"} for e in parsed.errors]
        clean = parsed.calls and not parsed.errors and self.stats["tool_errors"] == errors_before
        reward = self.call_reward if clean else 0.0
        truncated = self.tool_turns >= self.max_tool_turns
        return replies, reward, False, truncated, {**self.stats, "tool_turns": self.tool_turns,
                                                   "parse_error": self.parse_error}
