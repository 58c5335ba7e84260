"""Env pool: Ray actors each hosting many environments, driven with batched reset/step calls.

`EnvHost` is the plain in-process core; `EnvPool` spreads episode slots over `num_actors` Ray
actors and calls them in parallel. Env exceptions never escape: each result carries either the
checked output or an error string, and the caller decides to retry on a fresh env.
"""
from __future__ import annotations

import traceback
from typing import Any

from envs.base import check_reset_output, check_step_output
from envs.registry import make_env


def _error(e: BaseException, where: str) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    loc = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{where} raised {type(e).__name__}: {e}{loc}"


class EnvHost:
    """Hosts environments keyed by slot id; one env instance per live episode."""

    def __init__(self, name: str | None, target: str | None, kwargs: dict | None):
        self.name, self.target, self.kwargs = name, target, dict(kwargs or {})
        self.label = name or target
        make_env(name, target, self.kwargs)  # fail fast (in the actor) on import/kwargs errors
        self.envs: dict[int, Any] = {}

    def reset_batch(self, requests: list[tuple[int, int]]) -> list[dict]:
        """requests: (slot, seed). A fresh env instance is made for each reset."""
        out = []
        for slot, seed in requests:
            try:
                env = make_env(self.name, self.target, self.kwargs)
                self.envs[slot] = env
                obs, info = check_reset_output(self.label, env.reset(seed=seed))
                out.append({"obs": obs, "info": _plain(info)})
            except Exception as e:  # noqa: BLE001
                self.envs.pop(slot, None)
                out.append({"error": _error(e, f"{self.label}.reset(seed={seed})")})
        return out

    def step_batch(self, requests: list[tuple[int, str]]) -> list[dict]:
        out = []
        for slot, action in requests:
            env = self.envs.get(slot)
            if env is None:
                out.append({"error": f"{self.label}: slot {slot} has no live env (reset failed or was never called)"})
                continue
            try:
                obs, reward, term, trunc, info = check_step_output(self.label, env.step(action))
                out.append({"obs": obs, "reward": reward, "terminated": term, "truncated": trunc, "info": _plain(info)})
            except Exception as e:  # noqa: BLE001
                out.append({"error": _error(e, f"{self.label}.step()")})
            if out[-1].get("terminated") or out[-1].get("truncated") or "error" in out[-1]:
                self.close_slot(slot)
        return out

    def close_slot(self, slot: int) -> None:
        env = self.envs.pop(slot, None)
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def num_live(self) -> int:
        return len(self.envs)


def _plain(info: dict) -> dict:
    """Keep info values that travel cheaply (numbers, strings, bools)."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}


class EnvPool:
    """Slots are spread round-robin over `num_actors` Ray actors."""

    def __init__(self, name: str | None, target: str | None, kwargs: dict | None, num_actors: int = 2,
                 num_cpus_per_actor: float = 0.1):
        import ray

        actor_cls = ray.remote(num_cpus=num_cpus_per_actor, max_restarts=0)(EnvHost)
        self.actors = [actor_cls.remote(name, target, kwargs) for _ in range(num_actors)]
        # Surface plugin import errors here, with the plugin's own message.
        ray.get([a.num_live.remote() for a in self.actors])

    def _call(self, method: str, requests: list[tuple[int, Any]]) -> list[dict]:
        import ray

        per_actor: list[list[int]] = [[] for _ in self.actors]
        for i, (slot, _) in enumerate(requests):
            per_actor[slot % len(self.actors)].append(i)
        refs = [
            getattr(a, method).remote([requests[i] for i in idx]) if idx else None
            for a, idx in zip(self.actors, per_actor)
        ]
        results: list[dict | None] = [None] * len(requests)
        for ref, idx in zip(refs, per_actor):
            if ref is None:
                continue
            for i, r in zip(idx, ray.get(ref)):
                results[i] = r
        return results  # type: ignore[return-value]

    def reset(self, requests: list[tuple[int, int]]) -> list[dict]:
        return self._call("reset_batch", requests)

    def step(self, requests: list[tuple[int, str]]) -> list[dict]:
        return self._call("step_batch", requests)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
