"""Environments that misbehave, for fault and bad-input tests."""
from envs.builtin.copy_digits import CopyDigitsEnv


class AlwaysRaisesEnv(CopyDigitsEnv):
    def step(self, action):
        raise RuntimeError("reward service unavailable")


class FlakyEnv(CopyDigitsEnv):
    """One env instance in five (at random) raises in step(); a retry gets a fresh instance."""

    def __init__(self, **kw):
        import random

        super().__init__(**kw)
        self.broken = random.random() < 0.2

    def step(self, action):
        if self.broken:
            raise ValueError("transient failure")
        return super().step(action)


class FaultInjectionEnv(CopyDigitsEnv):
    """Injects one fault per seed, the first time any episode with that seed steps (a marker file in
    `marker_dir` remembers it across env actors, so the retry on a fresh env succeeds):
    `faults` maps seed -> raise | hang | hang_hard | die | always_raise.
    hang: sleeps (interrupted by the env actor's step timeout); hang_hard: blocks the timeout signal
    first, so only replacing the actor ends it; die: the actor process exits."""

    def __init__(self, marker_dir: str, faults: dict, **kw):
        super().__init__(**kw)
        self.marker_dir, self.faults = marker_dir, {int(k): v for k, v in faults.items()}
        self.seed = None

    def reset(self, seed=None, options=None):
        self.seed = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        import os
        import signal
        import time

        kind = self.faults.get(self.seed)
        if kind == "always_raise":
            raise RuntimeError(f"seed {self.seed} always fails")
        marker = os.path.join(self.marker_dir, f"{kind}-{self.seed}")
        if kind and not os.path.exists(marker):
            open(marker, "w").close()
            if kind == "raise":
                raise RuntimeError(f"injected failure for seed {self.seed}")
            if kind == "hang":
                time.sleep(3600)
            if kind == "hang_hard":
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
                time.sleep(3600)
            if kind == "die":
                os._exit(17)
        return super().step(action)


class ConstRewardEnv(CopyDigitsEnv):
    """step() returns `reward` as given (any object), for the reward-validation tests."""

    def __init__(self, reward=0.0, **kw):
        super().__init__(**kw)
        self.reward = reward

    def step(self, action):
        obs, _, term, trunc, info = super().step(action)
        return obs, self.reward, term, trunc, info


class BadRewardEnv(CopyDigitsEnv):
    """Seed 0 always returns a NaN reward and seed 1 the string "0.5"; other seeds are fine."""

    def reset(self, seed=None, options=None):
        self.seed = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, term, trunc, info = super().step(action)
        return obs, {0: float("nan"), 1: "0.5"}.get(self.seed, reward), term, trunc, info


class DatasetEnv(CopyDigitsEnv):
    """Prompts from a text file (one per line) named in env.kwargs.path."""

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        with open(path) as f:
            self.lines = f.read().splitlines()


class LongReplyEnv(CopyDigitsEnv):
    """Multi-turn and never ends by itself: every step rewards 0.25 and replies with a long message,
    so only the context limit ends an episode."""

    def step(self, action):
        return [{"role": "user", "content": "go on. " * 3}], 0.25, False, False, {}


class BadObsEnv(CopyDigitsEnv):
    """reset/step observations that break the contract: `kind` is empty_reset | int_content | tools_dict |
    dict_step_obs."""

    def __init__(self, kind: str, **kw):
        super().__init__(**kw)
        self.kind = kind

    def reset(self, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        if self.kind == "empty_reset":
            return [], info
        if self.kind == "int_content":
            return [{"role": "user", "content": 7}], info
        if self.kind == "tools_dict":
            return obs, {**info, "tools": {"name": "calculator"}}
        return obs, info

    def step(self, action):
        return {"role": "user", "content": "again"}, 0.0, False, False, {}
