"""guess_number: a multi-turn env. The policy guesses a hidden digit; the env answers "higher" or
"lower" until the guess is right or `max_turns` guesses are used. Reward: 1.0 for a right guess on
the first turn, discounted by `turn_discount` per extra turn, 0 if never found."""
from __future__ import annotations

import random
import re

from envs.base import TextEnv


class GuessNumberEnv(TextEnv):
    def __init__(self, low: int = 0, high: int = 9, max_turns: int = 4, turn_discount: float = 0.7):
        if low > high:
            raise ValueError(f"guess_number needs low <= high, got {low} > {high}")
        self.low, self.high, self.max_turns, self.turn_discount = low, high, max_turns, turn_discount
        self.secret, self.turn, self.parse_error = 0, 0, 0

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.turn, self.parse_error = 0, 0
        prompt = f"guess my number from {self.low} to {self.high}. answer with the number only."
        return [{"role": "user", "content": prompt}], {"secret": self.secret}

    def step(self, action: str):
        self.turn += 1
        text = action.strip()
        guess = int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None  # not "²" or 5000 digits
        self.parse_error = max(self.parse_error, int(guess is None))  # 1 once a guess was not a number
        if guess == self.secret:
            reward = self.turn_discount ** (self.turn - 1)
            return [], reward, True, False, {"solved": True, "turns": self.turn, "parse_error": self.parse_error}
        truncated = self.turn >= self.max_turns
        if guess is None:
            reply = "answer with a number only."
        else:
            reply = "higher." if guess < self.secret else "lower."
        obs = [] if truncated else [{"role": "user", "content": reply}]
        return obs, 0.0, False, truncated, {"solved": False, "turns": self.turn, "parse_error": self.parse_error}
