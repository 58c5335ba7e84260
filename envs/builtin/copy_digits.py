"""copy_digits: the prompt shows a short digit string; the policy must answer with exactly that string.

Rewards are dense (`reward.string_match.copy_score`): partial credit for digits, for each correct
position and for the right length, 1.0 only for the exact answer. A tiny random-init policy learns
the answer format (one digit, then end-of-turn) within minutes on CPU (reward ~0.09 -> ~0.4);
copying the right digit takes a larger model or many more steps.
"""
from __future__ import annotations

import random

from envs.base import TextEnv
from reward.string_match import copy_score



class CopyDigitsEnv(TextEnv):
    def __init__(self, min_digits: int = 1, max_digits: int = 2, alphabet: str = "0123456789", prompt: str = "copy {target}",
                 digit_bonus: float = 0.1, length_bonus: float = 0.2):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"copy_digits needs 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not alphabet or not all(c.isdigit() for c in alphabet):
            raise ValueError(f"copy_digits alphabet must be non-empty digits, got {alphabet!r}")
        self.min_digits, self.max_digits, self.alphabet, self.prompt = min_digits, max_digits, alphabet, prompt
        self.digit_bonus, self.length_bonus = digit_bonus, length_bonus
        self.target = ""

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = random.Random(seed)
        n = rng.randint(self.min_digits, self.max_digits)
        self.target = "".join(rng.choice(self.alphabet) for _ in range(n))
        return [{"role": "user", "content": self.prompt.format(target=self.target)}], {"target": self.target}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"copy_digits.step expects the policy's text, got {type(action).__name__}")
        reward = copy_score(action, self.target, self.digit_bonus, self.length_bonus)
        return [], reward, True, False, {"target": self.target, "exact": action == self.target}
