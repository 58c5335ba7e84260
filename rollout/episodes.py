"""Episode runner: thousands of concurrent episodes between the env pool and the engine(s), with
exact token bookkeeping.

Each episode is one coroutine: reset -> chat template (with the env's `tools`) -> token ids ->
engine samples a turn (logprobs + policy version) -> decode -> env.step -> if the episode goes on,
the env's messages are rendered by the chat template and appended as masked tokens -> ... until
terminated/truncated, `max_turns`, or `max_context` (then it ends exactly at `max_context` tokens,
finish_reason "context", an env reply cut there, and is kept and counted). The policy's sampled ids are never
re-tokenised. The turns of a multi-turn episode continue one engine session (rollout/sessions.py): the
engine keeps the conversation's KV and Gated DeltaNet state between turns and prefills only each
turn's new tokens, instead of the whole conversation again. Episodes wait on futures (engine
requests join vLLM's running batch; env requests are coalesced per actor), so nothing busy-waits;
`max_inflight` bounds live episodes.

GRPO groups are `group_size` episodes reset with the same seed. A failed episode (env raised,
timed out, or its actor died) is retried from reset on a fresh env up to `max_retries` times; if
it still fails it is returned with `error` set (never dropped) and its group is reported. An
episode whose engine request failed because the engine actor died is retried from reset once the
engine is replaced (rollout/engine_pool.py), without using up `max_retries` (counted apart).
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from rollout.trajectory import Trajectory
from rollout.engine_pool import EngineLost, EnginePool, is_dead
from rollout.env_pool import EnvFailure, EnvPool


@dataclass
class RolloutSettings:
    """Built from `rollout.*` (or `eval.*`) by rl/settings.py, where the defaults live."""
    group_size: int
    max_tokens: int  # per turn
    temperature: float
    top_p: float
    max_turns: int
    max_context: int  # prompt + all turns, in tokens
    max_retries: int
    max_inflight: int  # live episodes at once (backpressure)


def sample_seed(env_seed: int, index: int, attempt: int) -> int:
    """The sampling seed of episode `index` of the group reset with `env_seed` (its `attempt`-th try):
    a pure function of the episode, so the same episodes sample the same tokens from the same weights
    whichever engine, batch or order serves them; what makes resumed runs repeat uninterrupted ones."""
    import hashlib

    digest = hashlib.blake2b(f"{env_seed}/{index}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # room for + turn below 2**63


_SESSION_IDS = itertools.count()


class EngineClient:
    """Sends each request to the engine with the fewest requests in flight; the turns of a
    multi-turn episode (`session`) go to the engine that holds its earlier turns
    (rollout/sessions.py), unless that engine was replaced. A request whose engine died replaces
    that engine (once per death, EnginePool) and raises EngineLost."""

    def __init__(self, engines: list | EnginePool):
        self.pool = engines if isinstance(engines, EnginePool) else EnginePool(engines)
        self.engines = self.pool.engines
        self.inflight = [0] * len(self.pool)
        self._sessions: dict[str, tuple[int, int]] = {}  # session key -> (engine, its generation)
        self._ending: dict[int, list[str]] = {}  # engine -> sessions to end (one call per loop pass)

    @staticmethod
    def new_session() -> str:
        return f"{os.getpid()}-{next(_SESSION_IDS)}"

    def _pick(self, session: str | None) -> int:
        held = self._sessions.get(session) if session is not None else None
        if held is not None and self.pool.current(held[0])[1] == held[1]:
            return held[0]
        return min(range(len(self.engines)), key=self.inflight.__getitem__)

    async def generate(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                       images: list | None = None, seed: int | None = None, session: str | None = None,
                       last_turn: bool = False):
        """`session`: the episode's session key (text prompts), `last_turn`: no turn follows."""
        i = self._pick(session)
        engine, generation = self.pool.current(i)
        if session is not None:
            if last_turn:  # the engine ends it after this turn
                self._sessions.pop(session, None)
            else:
                self._sessions[session] = (i, generation)
        self.inflight[i] += 1
        try:
            if images:  # vision-language prompt (policies/vision.py)
                return await engine.generate_one.remote(prompt_ids, max_tokens, temperature, top_p, seed,
                                                        images=images)
            if session is not None:
                return await engine.generate_one.remote(prompt_ids, max_tokens, temperature, top_p, seed,
                                                        session=session, last_turn=last_turn)
            return await engine.generate_one.remote(prompt_ids, max_tokens, temperature, top_p, seed)
        except Exception as e:
            if not is_dead(e):
                raise
            await self.pool.replace_async(i, generation, e)  # RunError when no restart is left
            raise EngineLost(f"vLLM engine {i} died: {type(e).__name__}") from e
        finally:
            self.inflight[i] -= 1

    def end_session(self, session: str) -> None:
        """The episode is over: its engine frees the session. The sessions ended during one pass of
        the event loop go to each engine in one call, which nobody awaits."""
        held = self._sessions.pop(session, None)
        if held is None or self.pool.current(held[0])[1] != held[1]:  # ended already, or its engine is gone
            return
        pending = self._ending.setdefault(held[0], [])
        pending.append(session)
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush_ends, held[0])

    def _flush_ends(self, i: int) -> None:
        keys = self._ending.pop(i, [])
        if keys:
            ref = self.pool.current(i)[0].end_sessions.remote(keys)
            ref.future().add_done_callback(lambda f: f.exception())  # a dead engine took its sessions along


class ChatRenderer:
    """Token ids for prompts and for env replies in the middle of an episode, as the tokenizer's
    own chat template renders them."""

    _SENTINEL = "qrl-turn-boundary"

    CACHE_SIZE = 4096

    def __init__(self, tokenizer, processor=None):
        self.tok = tokenizer
        self.processor = processor  # vision-language policies: turns image parts into model inputs
        self._mm_prompts: dict = {}
        self._prompts: dict = {}  # the episodes of a group start from the same observation
        self._env_turns: dict = {}  # env replies repeat ("higher.", tool results): rendered once each

    @staticmethod
    def as_messages(obs) -> list[dict]:
        return [{"role": "user", "content": obs}] if isinstance(obs, str) else list(obs)

    def prompt_ids(self, obs, tools: list | None = None) -> list[int]:
        try:
            key = json.dumps([obs, tools], sort_keys=True)
        except (TypeError, ValueError):  # not JSON-able (e.g. images): render every time
            key = None

        def render():
            out = self.tok.apply_chat_template(self.as_messages(obs), tools=tools or None,
                                               add_generation_prompt=True, tokenize=True)
            return tuple(out["input_ids"] if hasattr(out, "keys") else out)

        return list(self._cached(self._prompts, key, render))

    def _cached(self, cache: dict, key: str | None, build):
        """build() once per key (at most CACHE_SIZE keys, then start over); key None: not cached."""
        if key is None:
            return build()
        if key not in cache:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[key] = build()
        return cache[key]

    def prompt_inputs(self, obs, tools: list | None = None) -> tuple[list[int], list, dict]:
        """(prompt ids, images, mm_inputs). Text observations: (prompt_ids(...), [], {}). With image
        content parts: ids with each image's placeholder expanded by the processor, the images (for
        the engine) and pixel_values / image_grid_thw (for the learner); see policies/vision.py."""
        from policies.vision import images_in, process_prompt, render_key

        images = images_in(self.as_messages(obs))
        if not images:
            return self.prompt_ids(obs, tools), [], {}
        if self.processor is None:
            raise ValueError("the env's observation has image content parts but the policy has no image processor "
                             "(a text-only model); use a vision-language policy, e.g. policy=tiny_qwen3_5_vl")

        def render():
            text = self.tok.apply_chat_template(self.as_messages(obs), tools=tools or None,
                                                add_generation_prompt=True, tokenize=False)
            ids, mm = process_prompt(self.processor, text, images)
            return tuple(ids), mm

        ids, mm = self._cached(self._mm_prompts, render_key(obs, tools), render)
        return list(ids), images, mm

    def env_turn_ids(self, obs, policy_ids: list[int]) -> list[int]:
        """Close the policy's turn (its EOS if it did not stop on its own), then the env's messages
        and the next assistant header. The template renders them after a stand-in conversation and
        only what follows the stand-in assistant turn is kept: role-dependent rendering (grouped
        tool responses, Qwen3.5 dropping <think> from turns before the last user query) cannot
        leak in, and the policy's own tokens are never re-rendered or re-tokenised."""
        from policies.vision import images_in

        if images_in(self.as_messages(obs)):
            raise ValueError("an env reply after the first observation has image content parts; images are "
                             "supported in the first observation only (put them in reset's obs)")
        close = [] if policy_ids and policy_ids[-1] == self.tok.eos_token_id else [self.tok.eos_token_id]
        try:
            key = json.dumps(obs, sort_keys=True)
        except (TypeError, ValueError):
            key = None
        return close + list(self._cached(self._env_turns, key, lambda: self._render_env_turn(obs)))

    def _render_env_turn(self, obs) -> tuple[int, ...]:
        eos = self.tok.eos_token
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": self._SENTINEL}]
        text = self.tok.apply_chat_template(base + self.as_messages(obs), add_generation_prompt=True,
                                            tokenize=False)
        rest = text[text.rindex(self._SENTINEL) + len(self._SENTINEL):]
        if not rest.startswith(eos):
            raise ValueError(f"the chat template does not end an assistant turn with the EOS token {eos!r}; "
                             "cannot append env turns to the policy's sampled tokens")
        return tuple(self.tok.encode(rest[len(eos):], add_special_tokens=False))


class EpisodeRunner:
    # multi-turn episodes keep their request in the engine between turns (rollout/sessions.py);
    # False (on the class or a runner): every turn is a fresh request over the whole conversation,
    # as before sessions existed (bench/multiturn.py compares both)
    engine_sessions: bool = True

    def __init__(self, env_pool: EnvPool, engines: list | EnginePool, tokenizer, settings: RolloutSettings, processor=None):
        self.pool, self.tok, self.s = env_pool, tokenizer, settings
        self.engine = EngineClient(engines)
        self._restarts_seen = 0  # engine restarts already reported in stats
        self.render = ChatRenderer(tokenizer, processor)
        self.stats: dict[str, float] = {}
        self.errors: list[dict] = []  # every env failure of the last run (episode slot, attempt, message)
        self._loop = asyncio.new_event_loop()

    def with_settings(self, settings: RolloutSettings) -> "EpisodeRunner":
        """A runner with other settings (e.g. evaluation) on the same env pool, engines and event
        loop: the env pool's futures and semaphore belong to one loop."""
        other = EpisodeRunner(self.pool, self.engine.engines, self.tok, settings, self.render.processor)
        other._loop.close()
        other._loop = self._loop
        other.engine_sessions = self.engine_sessions
        return other

    def run(self, seeds: list[int]) -> list[Trajectory]:
        """One batch: len(seeds) groups × group_size episodes, run concurrently. With thousands of
        live coroutines Python's default GC thresholds rescan the heap constantly (about half the
        driver's time per env step in bench/env_scale.py), so they are raised while it runs.
        While the loop streams on its own thread (async training), the batch joins it there."""
        if self._loop.is_running():
            return asyncio.run_coroutine_threadsafe(self.run_async(seeds), self._loop).result()
        thresholds = gc.get_threshold()
        gc.set_threshold(100_000, 50, 1000)
        try:
            return self._loop.run_until_complete(self.run_async(seeds))
        finally:
            gc.set_threshold(*thresholds)

    async def run_async(self, seeds: list[int]) -> list[Trajectory]:
        t0 = time.perf_counter()
        G = self.s.group_size
        self._reset_counts()
        limit = asyncio.Semaphore(self.s.max_inflight)
        trajs = await asyncio.gather(*[self._episode(slot, seeds[slot // G], slot // G, limit)
                                       for slot in range(len(seeds) * G)])
        self.stats = self._stats(trajs, time.perf_counter() - t0)
        return trajs

    def _reset_counts(self) -> None:
        self._counts = {"errors": 0, "retries": 0, "engine_retries": 0, "gen_tokens": 0, "gen_s": 0.0, "live": 0,
                        "max_live": 0}
        self.errors = []

    def _stats(self, trajs: list[Trajectory], wall: float) -> dict:
        c = self._counts
        failed_groups = {t.group for t in trajs if t.error}
        per_turn = [r for t in trajs if not t.error for r in t.turn_rewards]
        restarts, self._restarts_seen = self.engine.pool.restarts - self._restarts_seen, self.engine.pool.restarts
        return {
            "rollout/episodes": len(trajs), "env/errors": c["errors"], "env/retries": c["retries"],
            "env/failed_episodes": sum(t.error is not None for t in trajs), "env/failed_groups": len(failed_groups),
            "env/actor_restarts": self.pool.stats["actor_restarts"], "rollout/max_live_episodes": c["max_live"],
            "rollout/engine_restarts": restarts, "rollout/engine_retried_episodes": c["engine_retries"],
            "rollout/generated_tokens": c["gen_tokens"], "rollout/tokens_per_s": c["gen_tokens"] / max(wall, 1e-9),
            "rollout/wall_s": wall, "episode/turns_mean": sum(t.turns for t in trajs) / max(len(trajs), 1),
            "rollout/context_truncated": sum(t.finish_reason == "context" for t in trajs),
            "reward/turn_mean": sum(per_turn) / len(per_turn) if per_turn else 0.0,
        }

    # -- streaming (asynchronous training) -------------------------------------------------------
    def start_stream(self, next_seed: Callable[[], int], budget: Callable[[], int]) -> None:
        """Produce groups continuously on a background thread: a new group starts whenever fewer
        than `budget()` groups have been started (the trainer raises the budget as the policy
        version advances, which bounds staleness). Finished groups are taken with `take_groups`."""
        self._out: queue.Queue = queue.Queue()
        self._stopping = False
        self._thresholds = gc.get_threshold()
        gc.set_threshold(100_000, 50, 1000)
        self._reset_counts()
        self._stream_t0 = time.perf_counter()
        self._stream_thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="rollout-stream")
        self._stream_thread.start()
        self._producer = asyncio.run_coroutine_threadsafe(self._produce(next_seed, budget), self._loop)

    async def _produce(self, next_seed: Callable[[], int], budget: Callable[[], int]) -> None:
        self._wake = asyncio.Event()
        limit = asyncio.Semaphore(self.s.max_inflight)
        started = 0
        while not self._stopping:
            while started < budget() and not self._stopping:
                task = asyncio.ensure_future(self._group(next_seed(), started, limit))
                task.add_done_callback(lambda t: self._out.put(t.exception() or t.result()))
                started += 1
            await self._wake.wait()
            self._wake.clear()

    async def _group(self, seed: int, group: int, limit: asyncio.Semaphore) -> list[Trajectory]:
        G = self.s.group_size
        return list(await asyncio.gather(*[self._episode(group * G + j, seed, group, limit) for j in range(G)]))

    def notify(self) -> None:
        """The budget changed: let the producer start more groups."""
        self._loop.call_soon_threadsafe(lambda: self._wake.set() if hasattr(self, "_wake") else None)

    def take_group(self, timeout: float | None = None) -> list[Trajectory]:
        """The next finished group (in completion order); re-raises a producer failure."""
        item = self._out.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def take_stream_stats(self, trajs: list[Trajectory]) -> dict:
        """Counters since the last call (for the trajectories taken in between)."""
        wall = time.perf_counter() - self._stream_t0
        stats = self._stats(trajs, wall)
        c = self._counts
        c.update({"errors": 0, "retries": 0, "engine_retries": 0, "gen_tokens": 0, "max_live": c["live"]})
        self._stream_t0 = time.perf_counter()
        return stats

    def stop_stream(self) -> None:
        if getattr(self, "_stream_thread", None) is None:
            return
        self._stopping = True
        self.notify()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._stream_thread.join(timeout=10)
        self._stream_thread = None
        gc.set_threshold(*self._thresholds)

    async def _episode(self, slot: int, seed: int, group: int, limit: asyncio.Semaphore) -> Trajectory:
        last_error, attempt = "", 0
        while attempt <= self.s.max_retries:
            async with limit:
                self._counts["live"] += 1
                self._counts["max_live"] = max(self._counts["max_live"], self._counts["live"])
                try:
                    return await self._play(seed, group, sample_seed(seed, slot % self.s.group_size, attempt))
                except EngineLost:  # engine replaced: from reset again, not an env failure
                    self._counts["engine_retries"] += 1
                except EnvFailure as e:
                    last_error = str(e)
                    self._counts["errors"] += 1
                    self.errors.append({"slot": slot, "group": group, "seed": seed, "attempt": attempt,
                                        "error": last_error})
                    attempt += 1
                    if attempt <= self.s.max_retries:
                        self._counts["retries"] += 1
                finally:
                    self._counts["live"] -= 1
        return Trajectory(prompt_ids=self.render.prompt_ids(""), group=group, seed=seed, error=last_error,
                          finish_reason="error")

    async def _play(self, seed: int, group: int, sampling_seed: int | None = None) -> Trajectory:
        """One episode; turn k samples with seed `sampling_seed + k` (None: the engine's own RNG).
        A multi-turn episode's turns form one engine session, ended when the episode ends."""
        s = self.s
        handle, obs, info = await self.pool.reset(seed)
        tools = info.pop("tools", None)
        prompt_ids, images, mm_inputs = self.render.prompt_inputs(obs, tools)
        tr = Trajectory(prompt_ids=prompt_ids, group=group, seed=seed, info=info, mm_inputs=mm_inputs)
        if len(tr.prompt_ids) >= s.max_context:
            self.pool.close(handle)
            raise ValueError(f"the env's first prompt is {len(tr.prompt_ids)} tokens (seed {seed}), which leaves no "
                             f"room to answer within rollout.max_model_len={s.max_context}; raise "
                             "rollout.max_model_len or shorten the prompt")
        session = self.engine.new_session() if s.max_turns > 1 and self.engine_sessions and not images else None
        try:
            return await self._turns(tr, handle, images, sampling_seed, session)
        finally:
            if session is not None:
                self.engine.end_session(session)

    async def _turns(self, tr: Trajectory, handle, images: list, sampling_seed: int | None,
                     session: str | None) -> Trajectory:
        s = self.s
        while True:
            room = min(s.max_tokens, s.max_context - len(tr.prompt_ids) - len(tr.response_ids))
            if room <= 0:
                tr.finish_reason = "context"
                break
            if tr.turns >= s.max_turns:
                tr.finish_reason = tr.finish_reason or "max_turns"
                break
            tg = time.perf_counter()
            turn_seed = None if sampling_seed is None else (sampling_seed + tr.turns) % 2**63
            try:
                c = await self.engine.generate(tr.prompt_ids + tr.response_ids, room, s.temperature, s.top_p, images,
                                               turn_seed, session, last_turn=tr.turns + 1 >= s.max_turns)
            except EngineLost:
                self.pool.close(handle)
                raise
            self._counts["gen_s"] += time.perf_counter() - tg
            self._counts["gen_tokens"] += len(c.token_ids)
            tr.add_policy_tokens(list(c.token_ids), list(c.logprobs), c.versions or c.version)
            tr.finish_reason = c.finish_reason
            action = self.tok.decode(c.token_ids, skip_special_tokens=True)
            obs, reward, terminated, truncated, step_info = await self.pool.step(handle, action)
            tr.turns += 1
            tr.reward += reward
            tr.turn_rewards.append(reward)
            step_info.pop("tools", None)
            tr.info.update(step_info)
            if terminated or truncated:
                return tr
            if obs:  # an env reply that runs past the context is cut there; the loop then ends ("context")
                left = s.max_context - len(tr.prompt_ids) - len(tr.response_ids)
                tr.add_env_tokens(self.render.env_turn_ids(obs, tr.response_ids)[:max(left, 0)])
        self.pool.close(handle)  # ran out of turns or context: the env is given back unfinished
        return tr
