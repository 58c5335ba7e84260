"""arithmetic: compute an integer expression with + - * and parentheses, e.g. "compute: (3+4)*2.".

Each seed gives one problem: a random binary expression tree with `min_terms`..`max_terms` leaves
in [0, max_value], printed with only the parentheses it needs. The gold value is computed from the
tree; the reply is scored by `reward.math_answer.math_reward` (math_verify), which must find a plain
number (the last `\\boxed{}`, the text after "answer:", or else the last number in the reply).
Prompts use only lowercase letters, digits and `+-*()`, so the tiny character tokenizer covers them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from envs.base import TextEnv
from reward.math_answer import math_reward

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class _Node:
    """A leaf (`value`) or a binary operation (`op`, `left`, `right`)."""

    value: int = 0
    op: str = ""
    left: _Node | None = None
    right: _Node | None = None


def _random_tree(rng: random.Random, num_terms: int, max_value: int, ops: str) -> _Node:
    if num_terms == 1:
        return _Node(value=rng.randint(0, max_value))
    left_terms = rng.randint(1, num_terms - 1)
    return _Node(op=rng.choice(ops), left=_random_tree(rng, left_terms, max_value, ops),
                 right=_random_tree(rng, num_terms - left_terms, max_value, ops))


def _render(node: _Node) -> str:
    """Infix text with the parentheses the tree needs (a-(b+c), (a+b)*c), and no others."""
    if not node.op:
        return str(node.value)
    left, right = _render(node.left), _render(node.right)
    if node.left.op and _PRECEDENCE[node.left.op] < _PRECEDENCE[node.op]:
        left = f"({left})"
    if node.right.op and (_PRECEDENCE[node.right.op] < _PRECEDENCE[node.op]
                          or (node.op == "-" and _PRECEDENCE[node.right.op] == _PRECEDENCE[node.op])):
        right = f"({right})"
    return f"{left}{node.op}{right}"


def _evaluate(node: _Node) -> int:
    if not node.op:
        return node.value
    a, b = _evaluate(node.left), _evaluate(node.right)
    return a + b if node.op == "+" else a - b if node.op == "-" else a * b


class ArithmeticEnv(TextEnv):
    def __init__(self, min_terms: int = 2, max_terms: int = 3, max_value: int = 9, operators: str = "+-*",
                 prompt: str = "compute: {expression}. answer with the number.", format_bonus: float = 0.0):
        if not 1 <= min_terms <= max_terms:
            raise ValueError(f"arithmetic needs 1 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_terms > 32:
            raise ValueError(f"arithmetic max_terms must be at most 32, got {max_terms}")
        if not 1 <= max_value <= 10**6:
            raise ValueError(f"arithmetic max_value must be in [1, 1000000], got {max_value}")
        if not operators or set(operators) - set(_PRECEDENCE):
            raise ValueError(f"arithmetic operators must be a non-empty subset of '+-*', got {operators!r}")
        if "{expression}" not in prompt:
            raise ValueError(f"arithmetic prompt must contain '{{expression}}', got {prompt!r}")
        if not 0.0 <= format_bonus <= 1.0:
            raise ValueError(f"arithmetic format_bonus must be in [0, 1], got {format_bonus}")
        self.min_terms, self.max_terms, self.max_value = min_terms, max_terms, max_value
        self.operators, self.prompt, self.format_bonus = "".join(sorted(set(operators))), prompt, format_bonus
        self.expression, self.gold = "", ""

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = random.Random(seed)
        tree = _random_tree(rng, rng.randint(self.min_terms, self.max_terms), self.max_value, self.operators)
        self.expression, self.gold = _render(tree), str(_evaluate(tree))
        content = self.prompt.format(expression=self.expression)
        return [{"role": "user", "content": content}], {"expression": self.expression, "gold": self.gold}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"arithmetic.step expects the policy's text, got {type(action).__name__}")
        reward, verdict = math_reward(action, self.gold, format_bonus=self.format_bonus, numeric_only=True)
        info = {"gold": self.gold, "answer": verdict["answer"], "exact": verdict["exact"], "reason": verdict["reason"],
                "parse_error": verdict["parse_error"]}
        return [], reward, True, False, info
