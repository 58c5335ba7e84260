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
