"""countdown: reach a target number from a few given numbers with + - * / (each number at most once).

Each seed gives `num_numbers` numbers in [1, max_number] and a target built from a random
expression over a random subset of them (at least two; all of them with `use_all`), so every
problem has a solution: the expression is kept in `self.witness`. Intermediate values stay whole and
the target is a positive integer no larger than `max_target`, not equal to any given number (after
200 failed draws the target is the sum of all numbers). Replies are scored by
`reward.countdown.countdown_reward`. Prompts use only characters the tiny character tokenizer knows.
"""
from __future__ import annotations

import random
from fractions import Fraction

from envs.base import TextEnv
from reward.countdown import countdown_reward

_MAX_TRIES = 200


def _combine(rng: random.Random, left: tuple[str, Fraction, str], right: tuple[str, Fraction, str]):
    """Join two (text, value, top_op) subexpressions with a random operator; None if it isn't whole."""
    (a_text, a, a_op), (b_text, b, b_op) = left, right
    op = rng.choice("+-*/")
    if op == "/" and (b == 0 or (a / b).denominator != 1):
        return None
    if op in "*/" and a_op in ("+", "-"):
        a_text = f"({a_text})"
    if (op in "*/" and b_op) or (op == "-" and b_op in ("+", "-")):  # a*(b+c), a/(b*c), a-(b+c)
        b_text = f"({b_text})"
    value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    return f"{a_text}{op}{b_text}", value, op


def _random_expression(rng: random.Random, numbers: list[int], use_all: bool) -> tuple[str, Fraction] | None:
    """Combine a random subset of `numbers` (all with `use_all`) pairwise in random order.

    None if a division is not whole.
    """
    count = len(numbers) if use_all else rng.randint(2, len(numbers))
    parts = [(str(n), Fraction(n), "") for n in rng.sample(numbers, count)]
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        joined = _combine(rng, parts[i], parts[j])
        if joined is None:
            return None
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [joined]
    return parts[0][0], parts[0][1]


class CountdownEnv(TextEnv):
    def __init__(self, num_numbers: int = 3, max_number: int = 25, max_target: int = 1000,
                 prompt: str = "using the numbers {numbers} (each at most once) and + - * /, make {target}. "
                               "answer with the equation.",
                 format_reward: float = 0.1, use_all: bool = False):
        if not 2 <= num_numbers <= 8:
            raise ValueError(f"countdown num_numbers must be in [2, 8], got {num_numbers}")
        if not 1 <= max_number <= 10**6:
            raise ValueError(f"countdown max_number must be in [1, 1000000], got {max_number}")
        if max_target < num_numbers * max_number:  # the fallback target is the sum of all numbers
            raise ValueError(f"countdown max_target must be at least num_numbers * max_number = "
                             f"{num_numbers * max_number}, got {max_target}")
        if "{numbers}" not in prompt or "{target}" not in prompt:
            raise ValueError(f"countdown prompt must contain '{{numbers}}' and '{{target}}', got {prompt!r}")
        if not 0.0 <= format_reward <= 1.0:
            raise ValueError(f"countdown format_reward must be in [0, 1], got {format_reward}")
        self.num_numbers, self.max_number, self.max_target = num_numbers, max_number, max_target
        self.prompt, self.format_reward, self.use_all = prompt, format_reward, use_all
        self.numbers: list[int] = []
        self.target, self.witness = 0, ""

    def _problem(self, rng: random.Random) -> tuple[list[int], int, str]:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
        for _ in range(_MAX_TRIES):
            made = _random_expression(rng, numbers, self.use_all)
            if made is None:
                continue
            text, value = made
            if 0 < value <= self.max_target and value not in numbers:
                return numbers, int(value), text
        return numbers, sum(numbers), "+".join(map(str, numbers))  # rare, e.g. when every number is 1

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.numbers, self.target, self.witness = self._problem(random.Random(seed))
        shown = ", ".join(map(str, self.numbers))
        content = self.prompt.format(numbers=shown, target=self.target)
        return [{"role": "user", "content": content}], {"numbers": shown, "target": self.target}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"countdown.step expects the policy's text, got {type(action).__name__}")
        reward, verdict = countdown_reward(action, self.numbers, self.target, format_reward=self.format_reward,
                                           use_all=self.use_all)
        info = {"target": self.target, "numbers": ", ".join(map(str, self.numbers)), **verdict}
        return [], reward, True, False, info
