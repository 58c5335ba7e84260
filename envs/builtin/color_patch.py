"""color_patch: an image env for vision-language policies. The observation is a chat message with a
small generated image (a solid patch of one of 2-4 colours, its shade jittered per seed) and a text
question; the policy answers with the one letter that names the colour.

The question text is the same for every seed, so only the image tells the colours apart. Rewards
are dense like copy_digits': 1.0 for the right letter alone; otherwise `letter_bonus` if the answer
starts with one of the choices and `length_bonus` if it is one character (a tiny random-init policy
first learns this format: one letter, then end-of-turn).
"""
from __future__ import annotations

import random

from envs.base import TextEnv

PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


class ColorPatchEnv(TextEnv):
    def __init__(self, colors: tuple | list = ("red", "green", "blue"), image_size: int = 32, jitter: int = 30,
                 prompt: str = "colour? {choices}", letter_bonus: float = 0.1, length_bonus: float = 0.1):
        colors = list(colors)
        unknown = [c for c in colors if c not in PALETTE]
        if unknown or not 2 <= len(colors) <= len(PALETTE):
            raise ValueError(f"color_patch colors={colors}: use 2-{len(PALETTE)} of {', '.join(PALETTE)}")
        letters = [c[0] for c in colors]
        if len(set(letters)) != len(letters):
            raise ValueError(f"color_patch colors={colors} share a first letter; the answers would be ambiguous")
        if not 16 <= image_size <= 512:
            raise ValueError(f"color_patch image_size={image_size}; use 16..512 pixels")
        self.colors, self.letters, self.image_size, self.jitter = colors, letters, image_size, jitter
        self.prompt = prompt.format(choices="/".join(letters))
        self.letter_bonus, self.length_bonus = letter_bonus, length_bonus
        self.target = ""

    def reset(self, seed: int | None = None, options: dict | None = None):
        from PIL import Image

        super().reset(seed=seed)
        rng = random.Random(seed)
        color = rng.choice(self.colors)
        rgb = tuple(max(0, min(255, v + rng.randint(-self.jitter, self.jitter))) for v in PALETTE[color])
        image = Image.new("RGB", (self.image_size, self.image_size), rgb)
        self.target = color[0]
        content = [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}], {"target": self.target, "color": color}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"color_patch.step expects the policy's text, got {type(action).__name__}")
        answer = action.strip().lower()
        exact = answer == self.target
        if exact:
            reward = 1.0
        else:
            reward = self.letter_bonus * (answer[:1] in self.letters) + self.length_bonus * (len(answer) == 1)
        return [], reward, True, False, {"target": self.target, "exact": exact}
