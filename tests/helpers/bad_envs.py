"""Environments that misbehave, for fault and bad-input tests."""
from envs.builtin.copy_digits import CopyDigitsEnv


class AlwaysRaisesEnv(CopyDigitsEnv):
    def step(self, action):
        raise RuntimeError("reward service unavailable")


class FlakyEnv(CopyDigitsEnv):
    """Every 5th env instance made in a process raises in step(); a retry gets a fresh instance."""

    made = 0

    def __init__(self, **kw):
        super().__init__(**kw)
        FlakyEnv.made += 1
        self.broken = FlakyEnv.made % 5 == 0

    def step(self, action):
        if self.broken:
            raise ValueError("transient failure")
        return super().step(action)
