"""reverse_word: an example qrl environment plugin.

The prompt is "reverse: <word>" for a short lowercase word picked by the seed; the policy must answer
with the word spelled backwards. Reward is dense: the share of positions that are right, counted
over the longer of answer and target, so 1.0 only for the exact answer.

It subclasses `gymnasium.Env` directly, with the same text spaces as qrl's `envs.base.TextEnv`,
so this package installs and runs without qrl (or torch) installed.
"""
from __future__ import annotations

import random

import gymnasium as gym

WORDS = ("cat", "dog", "sun", "tree", "bird", "fish", "moon", "star", "rain", "lamp",
         "book", "frog", "milk", "road", "apple", "river", "stone", "cloud", "plant", "house")


def position_score(answer: str, target: str) -> float:
    """Share of positions where answer and target agree, over the longer of the two."""
    if not answer:
        return 0.0
    matches = sum(a == t for a, t in zip(answer, target))
    return matches / max(len(answer), len(target))


class ReverseWordEnv(gym.Env):
    """Single-turn: answer the prompted word reversed."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Text(max_length=1 << 20)
    action_space = gym.spaces.Text(max_length=1 << 20)

    def __init__(self, words: list[str] | None = None, prompt: str = "reverse: {word}"):
        self.words = list(words) if words is not None else list(WORDS)
        bad = [w for w in self.words if not (w.isascii() and w.isalpha() and w.islower())]
        if not self.words or bad:
            raise ValueError(f"reverse_word needs a non-empty list of lowercase a-z words, got bad words {bad}")
        self.prompt = prompt
        self.word = self.target = ""

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.word = random.Random(seed).choice(self.words)
        self.target = self.word[::-1]
        messages = [{"role": "user", "content": self.prompt.format(word=self.word)}]
        return messages, {"word": self.word}

    def step(self, action: str):
        answer = action.strip()
        reward = position_score(answer, self.target)
        info = {"word": self.word, "exact": answer == self.target}
        return [], reward, True, False, info
