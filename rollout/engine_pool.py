"""The run's vLLM engine actors, and their replacement when one dies.

One list of engine handles (`EnginePool.engines`) is shared by the episode runner (which sends
requests) and the controller (which syncs weights into them). When a request fails because its
engine actor died, `replace_async(i, generation, error)` replaces engine i once per death: every
concurrent failure of the same engine generation awaits the same replacement. The new actor is
started from the same `EngineConfig`, then `resync(handle)` (supplied by the controller) pushes the
learner's current weights into it and returns the version it adopted; only then does it take the
dead one's place. After `max_restarts` restarts in a run the next death stops the run with a
RunError. Ray itself never restarts engines (max_restarts=0): a restarted engine needs its weights.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable


class EngineLost(Exception):
    """An engine request failed because its actor died; the engine has been replaced and the
    episode is retried from reset (not counted against rollout.max_retries)."""


def is_dead(err: BaseException) -> bool:
    """The actor is gone (process killed, node lost), as opposed to an error inside a request."""
    import ray

    return isinstance(err, ray.exceptions.RayActorError)


class EnginePool:
    def __init__(self, engines: list, configs: list | None = None, actor_cls=None,
                 resync: Callable | None = None, max_restarts: int = 0, cannot_restart: str | None = None):
        self.engines = list(engines)  # handles; replaced in place, so holders of this list see new ones
        self.configs = configs
        self.actor_cls = actor_cls
        self.resync = resync
        self.max_restarts = max_restarts
        self.cannot_restart = cannot_restart  # why engines of this run cannot be restarted (None: they can)
        self.generation = [0] * len(self.engines)  # bumped when engine i is replaced
        self.restarts = 0
        self.history: list[dict] = []  # one entry per restart: engine, error, version adopted
        self._locks = [threading.Lock() for _ in self.engines]
        self._replacing: dict[tuple[int, int], asyncio.Future] = {}

    @classmethod
    def start(cls, actor_cls, configs: list, **kwargs) -> "EnginePool":
        return cls([actor_cls.remote(c) for c in configs], configs, actor_cls, **kwargs)

    def __len__(self) -> int:
        return len(self.engines)

    def current(self, i: int) -> tuple[object, int]:
        """(handle, generation) of engine i. The generation is read first: `replace` stores the new
        handle before bumping it, so a stale generation may pair with a new handle (harmless: a
        later failure then finds the slot already replaced) but never the reverse."""
        gen = self.generation[i]
        return self.engines[i], gen

    async def replace_async(self, i: int, generation: int, error: BaseException | str) -> bool:
        """Replace engine i (if it is still `generation`) without blocking the event loop; concurrent
        callers for the same death share one replacement. Raises RunError when none is left."""
        key = (i, generation)
        fut = self._replacing.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(None, self.replace, i, generation, error)
            self._replacing[key] = fut
        return await asyncio.shield(fut)

    def replace(self, i: int, generation: int, error: BaseException | str) -> bool:
        """Kill engine i, start a new one from its config, resync it to the learner's weights and put
        it in place. Returns False when this generation was already replaced (by another caller)."""
        import ray

        from common.errors import RunError

        with self._locks[i]:
            if self.generation[i] != generation:
                return False
            why = error if isinstance(error, str) else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            if self.cannot_restart or self.actor_cls is None:
                raise RunError(f"vLLM engine {i} died ({why}) and is not restarted: "
                               f"{self.cannot_restart or 'the engine pool has no engine config to restart from'}")
            if self.restarts >= self.max_restarts:
                raise RunError(f"vLLM engine {i} died ({why}); rollout.max_engine_restarts={self.max_restarts} "
                               f"and {self.restarts} restart(s) already happened in this run. Fix what kills it "
                               "(out of memory: lower rollout.kv_cache_memory_mb or rollout.max_inflight, or give "
                               "the engine more memory; a lost node), or raise rollout.max_engine_restarts")
            try:
                ray.kill(self.engines[i], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.restarts += 1
            new = self.actor_cls.remote(self.configs[i])
            try:
                try:
                    ray.get(new.ready.remote())
                except Exception as e:
                    raise RunError(f"vLLM engine {i} died ({why}) and its replacement failed to start: "
                                   f"{type(e).__name__}: {e}") from e
                version = self.resync(new) if self.resync is not None else 0
            except BaseException:
                ray.kill(new, no_restart=True)
                raise
            self.engines[i] = new  # before the generation: see `current`
            self.generation[i] += 1
            self.history.append({"engine": i, "error": why, "version": version})
            print(f"[qrl] vLLM engine {i} died ({why}); restarted with policy version {version} "
                  f"(restart {self.restarts}/{self.max_restarts})", flush=True)
            return True

    def replace_dead(self, timeout_s: float = 60.0) -> list[int]:
        """Ping every engine; replace those whose actor is gone (e.g. died between rollouts, before
        a weight sync). Returns their indices. Any other answer (or none in time) counts as alive:
        the caller's own call surfaces it."""
        import ray

        snapshot = [self.current(i) for i in range(len(self.engines))]
        refs = [h.get_version.remote() for h, _ in snapshot]
        dead = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001
                if is_dead(e):
                    self.replace(i, snapshot[i][1], e)
                    dead.append(i)
        return dead
