"""Env pool: Ray actors each hosting many environments, driven by coalesced batch calls.

`EnvHost` is the plain in-process core (one env instance per live episode, keyed by slot).
`EnvPool` is the asyncio client: each episode awaits `reset`/`step`; requests for the same actor
are coalesced into one Ray call while the previous call is in flight, so thousands of episodes
cost a handful of calls per round and nothing busy-waits. Capacity (`num_actors × envs_per_actor`
live episodes) is the backpressure: `reset` waits for a free slot.

Failures never escape as exceptions into the training loop: an env that raises or exceeds
`step_timeout_s` fails only its own episode (`EnvFailure`); an actor that dies or stops answering
within the call timeout is killed and replaced, and every episode it hosted fails. The episode
runner retries failed episodes on a fresh env.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from envs.base import EnvContractError, check_reset_output, check_step_output
from envs.registry import make_env, resolve_env_class


class EnvFailure(RuntimeError):
    """One episode's env failed (raised, timed out, or its actor died)."""


class _StepTimeout(Exception):
    pass


def _error(e: BaseException, where: str) -> str:
    if isinstance(e, EnvContractError):  # names the method already; the traceback ends in the checker
        return f"{where} raised EnvContractError: {e}"
    tb = traceback.extract_tb(e.__traceback__)
    loc = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{where} raised {type(e).__name__}: {e}{loc}"


def plain_info(info: dict) -> dict:
    """Keep info values that travel cheaply (numbers, strings, bools) plus `tools` (JSON schemas)."""
    out = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
    if isinstance(info.get("tools"), list):
        out["tools"] = info["tools"]
    return out


class EnvHost:
    """Hosts environments keyed by slot id. `run_batch` executes a list of operations:
    ("reset", slot, seed) | ("step", slot, action) | ("close", slot, None) and returns, per op,
    (True, payload) or (False, error message)."""

    def __init__(self, name: str | None, target: str | None, kwargs: dict | None, step_timeout_s: float = 0.0):
        self.name, self.target, self.kwargs = name, target, dict(kwargs or {})
        self.label = target or name
        self.step_timeout_s = step_timeout_s
        make_env(name, target, self.kwargs)  # fail fast (in the actor) on import/kwargs errors
        # Resolve the class once: `make_env` scans every installed package's entry points (~7 ms
        # in this venv), which per reset capped an actor at ~100 resets/s.
        self._cls = resolve_env_class(name, target)
        self.envs: dict[int, Any] = {}
        self.seeds: dict[int, Any] = {}  # each live env's reset seed (named in its errors)
        # A hanging env is interrupted by SIGALRM where possible (main thread); the pool's call
        # timeout (actor replaced) is the backstop for hangs signals cannot interrupt.
        self._alarm = step_timeout_s > 0 and threading.current_thread() is threading.main_thread()
        if self._alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)

    @staticmethod
    def _on_alarm(signum, frame):
        raise _StepTimeout()

    def _timed(self, fn):
        if not self._alarm:
            return fn()
        signal.setitimer(signal.ITIMER_REAL, self.step_timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def run_batch(self, ops: list[tuple[str, int, Any]]) -> list[tuple[bool, Any]]:
        out = []
        for op, slot, arg in ops:
            if op == "reset":
                out.append(self._reset(slot, arg))
            elif op == "step":
                out.append(self._step(slot, arg))
            else:
                self.close_slot(slot)
                out.append((True, None))
        return out

    def _guarded(self, slot: int, where: str, call):
        """Run one env call under the step timeout; on a timeout or exception the slot's env is
        dropped and (False, message naming the env call) returned."""
        try:
            return True, self._timed(call)
        except _StepTimeout:
            self.close_slot(slot)
            return False, f"{self.label}.{where} timed out after {self.step_timeout_s}s (env.step_timeout_s)"
        except Exception as e:  # noqa: BLE001
            self.close_slot(slot)
            return False, _error(e, f"{self.label}.{where}")

    def _reset(self, slot: int, seed: int) -> tuple[bool, Any]:
        def reset():
            self.seeds[slot] = seed
            env = self.envs[slot] = self._cls(**self.kwargs)
            return check_reset_output(self.label, env.reset(seed=seed))

        ok, out = self._guarded(slot, f"reset(seed={seed})", reset)
        return (True, (out[0], plain_info(out[1]))) if ok else (False, out)

    def _step(self, slot: int, action: str) -> tuple[bool, Any]:
        env = self.envs.get(slot)
        if env is None:
            return False, f"{self.label}: slot {slot} has no live env (reset failed or was never called)"
        seed = self.seeds.get(slot)
        ok, out = self._guarded(slot, "step()", lambda: check_step_output(self.label, env.step(action)))
        if not ok:
            return False, f"{out} [episode seed {seed}]"
        obs, reward, term, trunc, info = out
        if term or trunc:
            self.close_slot(slot)
        return True, (obs, reward, term, trunc, plain_info(info))

    def close_slot(self, slot: int) -> None:
        self.seeds.pop(slot, None)
        env = self.envs.pop(slot, None)
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def describe(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "live": len(self.envs),
                "signal_timeouts": self._alarm}

    def memory_rss_bytes(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class EnvHandle:
    """A live episode's env: which actor lane, which slot, and the lane generation it lives in."""
    lane: int
    slot: int
    generation: int


class _Lane:
    """One env actor plus its queue of pending ops."""

    def __init__(self, actor, bundle: int | None):
        self.actor, self.bundle = actor, bundle
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.inflight = 0
        self.live = 0
        self.generation = 0
        self.replaced_because = ""
        self.flush_scheduled = False


class EnvPool:
    """Asyncio client over `num_actors` EnvHost actors (see the module docstring)."""

    def __init__(self, name: str | None, target: str | None, kwargs: dict | None, *, num_actors: int,
                 envs_per_actor: int, num_cpus_per_actor: float, step_timeout_s: float, call_timeout_s: float,
                 placement: str, max_inflight_calls: int = 2, actor_options: dict | None = None,
                 placement_timeout_s: float = 120.0):
        """The env.* arguments come from the config (rl/settings.py env_pool); the rest are pool
        internals with no config key."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        self.spec = (name, target, dict(kwargs or {}), step_timeout_s)
        self.label = target or name
        self.envs_per_actor = envs_per_actor
        self.step_timeout_s, self.call_timeout_s = step_timeout_s, call_timeout_s
        self.max_inflight_calls = max_inflight_calls
        self.num_cpus_per_actor = num_cpus_per_actor
        self.actor_options = dict(actor_options or {})
        self.stats = {"actor_restarts": 0, "calls": 0, "ops": 0}
        self.pg = None
        if placement and num_cpus_per_actor > 0:
            self.pg = placement_group([{"CPU": num_cpus_per_actor}] * num_actors, strategy=placement)
            try:
                ray.get(self.pg.ready(), timeout=placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self.pg)
                raise TimeoutError(
                    f"{num_actors} env actors x {num_cpus_per_actor} CPU could not be placed with "
                    f"env.placement={placement} within {placement_timeout_s:.0f}s (cluster: "
                    f"{len([n for n in ray.nodes() if n['Alive']])} nodes, {ray.available_resources().get('CPU', 0)} "
                    "CPUs free). STRICT_SPREAD needs a node per actor; lower env.num_actors or "
                    "env.num_cpus_per_actor, use env.placement=SPREAD, or add nodes") from None
        self.lanes = [_Lane(self._new_actor(i), i if self.pg else None) for i in range(num_actors)]
        self._next_slot = 0
        self._capacity: asyncio.Semaphore | None = None
        # Surface plugin import/kwargs errors here, with the plugin's own message.
        ray.get([lane.actor.describe.remote() for lane in self.lanes])

    def _new_actor(self, index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts = dict(num_cpus=self.num_cpus_per_actor, max_restarts=0, max_task_retries=0, **self.actor_options)
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=index)
        return ray.remote(**opts)(EnvHost).remote(*self.spec)

    @property
    def capacity(self) -> int:
        return len(self.lanes) * self.envs_per_actor

    def _sem(self) -> asyncio.Semaphore:
        if self._capacity is None:  # created inside the running loop
            self._capacity = asyncio.Semaphore(self.capacity)
        return self._capacity

    # -- episode-facing API ------------------------------------------------------------------
    async def reset(self, seed: int) -> tuple[EnvHandle, Any, dict]:
        """A fresh env on the least-loaded actor; waits while the pool is at capacity."""
        await self._sem().acquire()
        i = min(range(len(self.lanes)), key=lambda k: self.lanes[k].live)
        lane = self.lanes[i]
        slot = self._next_slot
        self._next_slot += 1
        handle = EnvHandle(i, slot, lane.generation)
        lane.live += 1
        try:
            obs, info = await self._submit(handle, ("reset", slot, seed))
        except EnvFailure:
            self._release(handle)
            raise
        return handle, obs, info

    async def step(self, handle: EnvHandle, action: str) -> tuple[Any, float, bool, bool, dict]:
        try:
            out = await self._submit(handle, ("step", handle.slot, action))
        except EnvFailure:
            self._release(handle)
            raise
        if out[2] or out[3]:
            self._release(handle)
        return out

    def close(self, handle: EnvHandle) -> None:
        """Give up an episode early (e.g. it ran out of turns or context)."""
        lane = self.lanes[handle.lane]
        if handle.generation == lane.generation:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.exception())  # nobody awaits a close
            lane.pending.append((("close", handle.slot, None), fut))
            self._schedule(handle.lane)
        self._release(handle)

    def _release(self, handle: EnvHandle) -> None:
        if handle.slot < 0:
            return
        lane = self.lanes[handle.lane]
        if handle.generation == lane.generation:
            lane.live -= 1
        handle.slot = -1
        self._sem().release()

    # -- batching --------------------------------------------------------------------------------
    async def _submit(self, handle: EnvHandle, op: tuple):
        lane = self.lanes[handle.lane]
        if handle.generation != lane.generation:
            raise EnvFailure(f"{self.label}: env actor {handle.lane} was replaced; this episode's env is gone")
        fut = asyncio.get_running_loop().create_future()
        lane.pending.append((op, fut))
        self._schedule(handle.lane)
        return await fut

    def _schedule(self, i: int) -> None:
        lane = self.lanes[i]
        if lane.pending and not lane.flush_scheduled and lane.inflight < self.max_inflight_calls:
            lane.flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush(i)))

    async def _flush(self, i: int) -> None:
        lane = self.lanes[i]
        lane.flush_scheduled = False
        batch, lane.pending = lane.pending, []
        if not batch:
            return
        lane.inflight += 1
        generation = lane.generation
        self.stats["calls"] += 1
        self.stats["ops"] += len(batch)
        timeout = self.call_timeout_s + self.step_timeout_s * 2 + 0.01 * len(batch)
        try:
            results = await asyncio.wait_for(lane.actor.run_batch.remote([op for op, _ in batch]), timeout)
        except Exception as e:  # noqa: BLE001 - actor died, hung past the timeout, or the call failed
            why = (f"did not answer within {timeout:.0f}s (env.step_timeout_s/env.call_timeout_s)"
                   if isinstance(e, asyncio.TimeoutError) else f"failed: {type(e).__name__}: {str(e)[:300]}")
            if lane.generation == generation:
                self._replace(i, why)
            else:  # this call went to the actor that was already killed and replaced
                why = f"was replaced after it {lane.replaced_because}"
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(EnvFailure(f"{self.label}: env actor {i} {why}; its episodes are retried"))
            results = None
        finally:
            lane.inflight -= 1
        if results is not None:
            for (_, fut), (ok, payload) in zip(batch, results):
                if not fut.done():
                    fut.set_result(payload) if ok else fut.set_exception(EnvFailure(payload))
        self._schedule(i)

    def _replace(self, i: int, why: str) -> None:
        """Kill a dead or hung actor and start a fresh one in its place; its live envs are gone."""
        import ray

        lane = self.lanes[i]
        try:
            ray.kill(lane.actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        lane.generation += 1
        lane.live = 0
        lane.replaced_because = why
        lane.actor = self._new_actor(i)
        self.stats["actor_restarts"] += 1
        # ops queued for the old actor refer to envs that are gone
        stale, lane.pending = lane.pending, []
        for _, fut in stale:
            if not fut.done():
                fut.set_exception(EnvFailure(f"{self.label}: env actor {i} was replaced after it {why}; "
                                             "its episodes are retried"))

    # -- introspection -------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        import ray

        return ray.get([lane.actor.describe.remote() for lane in self.lanes])

    def memory_rss_bytes(self) -> list[int]:
        import ray

        return ray.get([lane.actor.memory_rss_bytes.remote() for lane in self.lanes])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for lane in self.lanes:
            try:
                ray.kill(lane.actor)
            except Exception:  # noqa: BLE001
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
