"""Env steps/s and live episodes through the Ray env pool (`rollout.env_pool.EnvPool`) with a
scripted (non-LLM) policy, memory per live episode, and a linear projection to 10^6 concurrent
episodes on a Ray cluster.

Workload: the built-in multi-turn `guess_number` env over a wide range (low=0, high=10^6,
max_turns=25) played by a binary-search policy that parses the env's "higher."/"lower." replies, so
every episode is solved in ~19-20 steps. Each episode is one coroutine; `--episodes` of them are
reset (all live at once: RSS is read here), then played concurrently. Baselines in the same run:
the same env and policy in a plain in-process Python loop (no Ray), and a naive client that makes
one Ray call per reset/step (no coalescing). Also: a single-step env (guess_number with
low=high=0, so the first guess ends it) run through the pool at 2x its capacity, a small sweep of
pool knobs (actors x max_inflight_calls), a CPU-time split (driver / env actors / Ray system
processes), the actor-side per-op cost measured in-process, and a cProfile of the driver.

The driver's cyclic GC is a knob here: with 10^4 live coroutines Python's default thresholds
(700,10,10) spend about half the driver's CPU per step in GC, so the main run raises them
(`--driver-gc-threshold`, default 100000,50,1000) and the same pool is then replayed with Python's
defaults; both are reported.

    .venv/bin/python bench/env_scale.py        # writes bench/results/env_scale.{json,md}  (~2 min)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import math
import os
import pickle
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402  (a Ray dependency)

from envs.registry import make_env, resolve_env_class  # noqa: E402
from rl.config import EnvConfig  # noqa: E402
from rl.settings import env_pool  # noqa: E402
from rollout.env_pool import EnvFailure, EnvHost, EnvPool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ENV = "guess_number"


# -- scripted policy -----------------------------------------------------------------------------
class BinarySearch:
    """Reads the range from the reset prompt ("guess my number from LOW to HIGH. ..."), then halves
    it on every "higher."/"lower." reply."""

    __slots__ = ("lo", "hi", "guess")

    def __init__(self, obs):
        words = obs[0]["content"].split()
        self.lo, self.hi = int(words[4]), int(words[6].rstrip("."))
        self.guess = 0

    def act(self) -> str:
        self.guess = (self.lo + self.hi) // 2
        return str(self.guess)

    def observe(self, obs) -> None:
        text = obs[0]["content"]
        if text.startswith("higher"):
            self.lo = self.guess + 1
        elif text.startswith("lower"):
            self.hi = self.guess - 1


# -- CPU accounting ------------------------------------------------------------------------------
def cpu_snapshot(actor_pids: set[int]) -> dict[str, float]:
    """CPU seconds (user+system) of this driver, of the env actors, and of every other process under
    it (raylet, GCS, idle workers): what one step costs on the whole machine, not only wall time."""
    me = psutil.Process()
    out = {"driver": sum(me.cpu_times()[:2]), "actors": 0.0, "ray_system": 0.0}
    for p in me.children(recursive=True):
        try:
            t = sum(p.cpu_times()[:2])
        except psutil.Error:
            continue
        out["actors" if p.pid in actor_pids else "ray_system"] += t
    return out


def cpu_delta(a: dict, b: dict, steps: int) -> dict:
    d = {k: b[k] - a[k] for k in a}
    d["total"] = sum(d.values())
    return {f"{k}_cpu_us_per_op": 1e6 * v / max(steps, 1) for k, v in d.items()} | {"cpu_s": d}


def rss(pid: int | None = None) -> int:
    return psutil.Process(pid or os.getpid()).memory_info().rss


# -- in-process measurements ---------------------------------------------------------------------
def inprocess_loop(kwargs: dict, n: int) -> dict:
    """The same env and policy, one episode after another, in a plain Python loop (no Ray)."""
    cls = resolve_env_class(ENV)
    steps = solved = 0
    t0 = time.perf_counter()
    for seed in range(n):
        env = cls(**kwargs)
        obs, _ = env.reset(seed=seed)
        pol = BinarySearch(obs)
        while True:
            obs, reward, term, trunc, info = env.step(pol.act())
            steps += 1
            if term or trunc:
                solved += bool(info.get("solved"))
                break
            pol.observe(obs)
        env.close()
    dt = time.perf_counter() - t0
    return {"episodes": n, "steps": steps, "s": dt, "steps_per_s": steps / dt, "solved_frac": solved / n,
            "mean_steps_per_episode": steps / n}


def actor_side_inprocess(kwargs: dict, n: int) -> dict:
    """What an env actor does per op, without Ray: `EnvHost.run_batch` (SIGALRM timer, contract
    checks, `plain_info`) on whole rounds of ops, plus the pieces it is made of, and pickling (the
    serialisation Ray does for the op and result lists)."""
    host = EnvHost(ENV, None, kwargs, step_timeout_s=30.0)
    t0 = time.perf_counter()
    res = host.run_batch([("reset", s, s) for s in range(n)])
    reset_us = 1e6 * (time.perf_counter() - t0) / n
    pols = {s: BinarySearch(r[1][0]) for s, r in enumerate(res)}
    step_s = pickle_s = 0.0
    steps = 0
    while pols:
        ops = [("step", s, p.act()) for s, p in pols.items()]
        t = time.perf_counter()
        res = host.run_batch(ops)
        step_s += time.perf_counter() - t
        t = time.perf_counter()
        pickle.loads(pickle.dumps(ops, protocol=5))
        pickle.loads(pickle.dumps(res, protocol=5))
        pickle_s += time.perf_counter() - t
        steps += len(ops)
        for (_, s, _), (ok, (obs, _, term, trunc, _)) in zip(ops, res):
            if term or trunc:
                del pols[s]
            else:
                pols[s].observe(obs)
    # the pieces of one step
    cls = resolve_env_class(ENV)
    env = cls(**kwargs)
    obs, _ = env.reset(seed=0)

    def per_call_us(fn, reps):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e6 * (time.perf_counter() - t) / reps

    from envs.base import check_step_output
    from rollout.env_pool import plain_info

    out = env.step("1")
    return {
        "run_batch_reset_us_per_op": reset_us,
        "run_batch_step_us_per_op": 1e6 * step_s / steps,
        "pickle_roundtrip_us_per_step_op": 1e6 * pickle_s / steps,
        "env_step_us": per_call_us(lambda: env.step("1"), 20000),
        "env_reset_us": per_call_us(lambda: env.reset(seed=1), 5000),
        "env_construct_us": per_call_us(lambda: cls(**kwargs), 20000),
        "check_step_output_us": per_call_us(lambda: check_step_output(ENV, out), 50000),
        "plain_info_us": per_call_us(lambda: plain_info(out[4]), 50000),
        # what every reset paid before EnvHost resolved the env class once (entry-point scan)
        "make_env_us": per_call_us(lambda: make_env(ENV, None, kwargs), 20),
    }


# -- through Ray ---------------------------------------------------------------------------------
class DriverGC:
    """Optionally set the driver's cyclic-GC thresholds for a run, and time every collection
    (gc.callbacks), so the share of driver CPU spent in GC is measured rather than guessed."""

    def __init__(self, threshold: tuple[int, ...] | None):
        self.threshold, self.s, self.collections, self._t = threshold, 0.0, [0, 0, 0], 0.0

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.s += time.perf_counter() - self._t
            self.collections[info["generation"]] += 1

    def __enter__(self):
        self._old = gc.get_threshold()
        if self.threshold:
            gc.set_threshold(*self.threshold)
        gc.collect()
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._cb)
        gc.set_threshold(*self._old)

    def snapshot(self) -> tuple[float, list[int]]:
        return self.s, list(self.collections)


async def run_pool(pool: EnvPool, n: int, seed0: int = 0, gate_for_memory: bool = False,
                   profile: cProfile.Profile | None = None, gc_threshold: tuple[int, ...] | None = None) -> dict:
    """n episodes, one coroutine each. With `gate_for_memory`, all n are reset and held live while
    RSS is read, then played; otherwise each plays as soon as its reset returns."""
    with DriverGC(gc_threshold) as dgc:
        out = await _run_pool(pool, n, seed0, gate_for_memory, profile, dgc)
    out["driver_gc_threshold"] = list(gc_threshold or gc.get_threshold())
    return out


async def _run_pool(pool, n, seed0, gate_for_memory, profile, dgc: DriverGC) -> dict:
    st = {"steps": 0, "resets": 0, "errors": 0, "live": 0, "peak_live": 0, "solved": 0}
    first_errors: list[str] = []
    gate = asyncio.Event()
    if not gate_for_memory:
        gate.set()

    def fail(e: BaseException) -> None:
        st["errors"] += 1
        if len(first_errors) < 5:
            first_errors.append(f"{type(e).__name__}: {e}"[:300])

    async def episode(seed: int) -> None:
        try:
            handle, obs, _ = await pool.reset(seed)
        except Exception as e:  # noqa: BLE001 - counted, never expected
            return fail(e)
        st["resets"] += 1
        st["live"] += 1
        st["peak_live"] = max(st["peak_live"], st["live"])
        try:
            await gate.wait()
            pol = BinarySearch(obs)
            while True:
                obs, _, term, trunc, info = await pool.step(handle, pol.act())
                st["steps"] += 1
                if term or trunc:
                    st["solved"] += bool(info.get("solved"))
                    break
                pol.observe(obs)
        except Exception as e:  # noqa: BLE001
            fail(e)
        finally:
            st["live"] -= 1

    actor_pids = {d["pid"] for d in pool.describe()}
    calls0, ops0 = pool.stats["calls"], pool.stats["ops"]
    out: dict = {"episodes": n, "actors": len(pool.lanes), "envs_per_actor": pool.envs_per_actor,
                 "capacity": pool.capacity, "max_inflight_calls": pool.max_inflight_calls}
    if gate_for_memory:
        out["actor_rss_empty_bytes"] = pool.memory_rss_bytes()
        out["driver_rss_before_bytes"] = rss()
    cpu0 = cpu_snapshot(actor_pids)
    gc0 = dgc.snapshot()
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(episode(seed0 + i)) for i in range(n)]
    if gate_for_memory:
        while st["resets"] + st["errors"] < n:
            await asyncio.sleep(0.005)
        t1 = time.perf_counter()
        cpu1 = cpu_snapshot(actor_pids)
        out["reset_phase_s"] = t1 - t0
        out["resets_per_s"] = n / (t1 - t0)
        out["reset_cpu"] = cpu_delta(cpu0, cpu1, n)
        out["actor_rss_live_bytes"] = pool.memory_rss_bytes()
        out["driver_rss_live_bytes"] = rss()
        out["live_envs_reported_by_actors"] = sum(d["live"] for d in pool.describe())
        out["calls_reset_phase"] = pool.stats["calls"] - calls0
        calls1, ops1 = pool.stats["calls"], pool.stats["ops"]
        gc1 = dgc.snapshot()
        if profile:
            profile.enable()
        gate.set()
    await asyncio.gather(*tasks)
    t2 = time.perf_counter()
    if profile:
        profile.disable()
    cpu2 = cpu_snapshot(actor_pids)
    gc2 = dgc.snapshot()
    out |= {k: st[k] for k in ("steps", "resets", "errors", "peak_live", "solved")}
    out["first_errors"] = first_errors
    out["total_s"] = t2 - t0
    out["end_to_end_steps_per_s"] = st["steps"] / (t2 - t0)
    out["end_to_end_ops_per_s"] = (st["steps"] + st["resets"]) / (t2 - t0)
    out["calls"] = pool.stats["calls"] - calls0
    out["ops"] = pool.stats["ops"] - ops0
    out["ops_per_call"] = out["ops"] / max(out["calls"], 1)
    out["actor_restarts"] = pool.stats["actor_restarts"]
    if gate_for_memory:
        out["play_phase_s"] = t2 - t1
        out["steps_per_s"] = st["steps"] / (t2 - t1)  # play phase: every op is a step
        out["play_cpu"] = cpu_delta(cpu1, cpu2, st["steps"])
        out["play_calls"] = pool.stats["calls"] - calls1
        out["play_ops_per_call"] = (pool.stats["ops"] - ops1) / max(out["play_calls"], 1)
        out["play_cpu"]["driver_gc_us_per_op"] = 1e6 * (gc2[0] - gc1[0]) / max(st["steps"], 1)
        out["play_driver_gc_collections"] = [b - a for a, b in zip(gc1[1], gc2[1])]
        live = sum(out["actor_rss_live_bytes"]) - sum(out["actor_rss_empty_bytes"])
        out["actor_bytes_per_live_episode"] = live / n
        out["driver_bytes_per_live_episode"] = (out["driver_rss_live_bytes"] - out["driver_rss_before_bytes"]) / n
        out["actor_rss_after_all_closed_bytes"] = pool.memory_rss_bytes()
    else:
        out["steps_per_s"] = out["end_to_end_steps_per_s"]
        out["cpu"] = cpu_delta(cpu0, cpu2, st["steps"] + st["resets"])
        out["cpu"]["driver_gc_us_per_op"] = 1e6 * (gc2[0] - gc0[0]) / max(st["steps"] + st["resets"], 1)
    return out


async def run_naive(kwargs: dict, n: int, num_actors: int) -> dict:
    """No coalescing: every reset and every step is its own `run_batch.remote([op])` call, episodes
    still concurrent (asyncio) across `num_actors` EnvHost actors."""
    import ray

    Host = ray.remote(num_cpus=0.1, max_restarts=0)(EnvHost)
    actors = [Host.remote(ENV, None, kwargs, 30.0) for _ in range(num_actors)]
    await asyncio.gather(*[a.describe.remote() for a in actors])
    st = {"steps": 0, "errors": 0, "calls": 0}

    async def call(actor, op):
        st["calls"] += 1
        [(ok, payload)] = await actor.run_batch.remote([op])
        if not ok:
            raise EnvFailure(payload)
        return payload

    async def episode(i: int) -> None:
        actor = actors[i % num_actors]
        try:
            obs, _ = await call(actor, ("reset", i, i))
            pol = BinarySearch(obs)
            while True:
                obs, _, term, trunc, _ = await call(actor, ("step", i, pol.act()))
                st["steps"] += 1
                if term or trunc:
                    break
                pol.observe(obs)
        except Exception:  # noqa: BLE001
            st["errors"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[episode(i) for i in range(n)])
    dt = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return {"episodes": n, "actors": num_actors, "steps": st["steps"], "errors": st["errors"], "calls": st["calls"],
            "s": dt, "steps_per_s": st["steps"] / dt, "calls_per_s": st["calls"] / dt}


def summary(r: dict) -> dict:
    return ({k: r[k] for k in ("actors", "max_inflight_calls", "driver_gc_threshold", "steps_per_s", "errors",
                               "play_ops_per_call", "end_to_end_steps_per_s", "resets_per_s")}
            | {k: r["play_cpu"][k] for k in ("driver_cpu_us_per_op", "driver_gc_us_per_op", "actors_cpu_us_per_op",
                                             "ray_system_cpu_us_per_op", "total_cpu_us_per_op")})


def _bucket(file: str, fn: str) -> str:
    if "select.epoll" in fn:
        return "waiting for actors (epoll)"
    if "asyncio" in file or "_asyncio" in fn or "_contextvars" in fn:
        return "asyncio machinery (futures, tasks, call_soon)"
    if "/ray/" in file or "msgpack" in file or "ray._raylet" in fn or "_pickle" in fn or "pickle" in file:
        return "Ray client (submit, (de)serialise)"
    if file.endswith("rollout/env_pool.py"):
        return "EnvPool client code"
    if file.endswith("bench/env_scale.py"):
        return "episode coroutine + scripted policy"
    return "other"


def profile_summary(prof: cProfile.Profile, n: int = 25) -> dict:
    stats = pstats.Stats(prof, stream=io.StringIO())
    buckets: dict[str, float] = {}
    for (file, _, fn), (_, _, tt, _, _) in stats.stats.items():
        b = _bucket(file, fn)
        buckets[b] = buckets.get(b, 0.0) + tt
    total = sum(buckets.values())
    return {"own_time_by_part": {k: {"s": v, "frac": v / total} for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "top_by_tottime": profile_top(prof, n)}


def profile_top(prof: cProfile.Profile, n: int = 25) -> list[dict]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # tottime over all functions
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        short = file.replace(str(REPO) + "/", "")
        short = short.split("site-packages/")[-1] if "site-packages/" in short else short
        short = short.split("/lib/python3")[-1] if "/lib/python3" in short else short
        rows.append({"function": f"{short}:{line}({fn})", "calls": nc, "tottime_s": tt, "cumtime_s": ct,
                     "tottime_frac": tt / total if total else 0.0})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:n]


def projection(main: dict, cores_here: int, node_cores: int, node_gib: float, mem_frac: float,
               reserve_cores: int, target: int, heavy_kib: list[float]) -> dict:
    """Linear projection from this machine's measurements (not a cluster measurement)."""
    cpu = main["play_cpu"]
    driver_us, actor_us, sys_us = (cpu["driver_cpu_us_per_op"], cpu["actors_cpu_us_per_op"],
                                   cpu["ray_system_cpu_us_per_op"])
    total_us = driver_us + actor_us + sys_us
    per_core_wall = main["steps_per_s"] / cores_here          # contended wall clock: conservative
    per_core_cpu = 1e6 / total_us                                # CPU actually spent per step
    usable = node_cores - reserve_cores
    # cores of a node split between env actors and episode drivers in proportion to their CPU per step
    actors_per_node = max(1, round(usable * actor_us / (actor_us + driver_us)))
    drivers_per_node = max(1, usable - actors_per_node)
    budget = node_gib * 2**30 * mem_frac
    empty_actor = max(main["actor_rss_empty_bytes"])
    per_ep_actor = main["actor_bytes_per_live_episode"]
    per_ep_driver = max(main["driver_bytes_per_live_episode"], 0.0)

    def nodes_for(per_ep_actor_bytes: float) -> dict:
        per_ep = per_ep_actor_bytes + per_ep_driver
        free = budget - actors_per_node * empty_actor
        eps_per_node = int(free // per_ep)
        nodes = math.ceil(target / eps_per_node)
        per_actor = target / (nodes * actors_per_node)  # episodes each actor hosts at the target
        return {"episodes_per_actor_at_target": per_actor,
                "actor_round_s_at_target": per_actor * actor_us / 1e6,  # one step of each of its episodes
                "actor_bytes_per_episode": per_ep_actor_bytes, "episodes_per_actor": eps_per_node // actors_per_node,
                "episodes_per_node": eps_per_node, "nodes_for_target": nodes,
                "cluster_steps_per_s_wall_basis": nodes * usable * per_core_wall,
                "cluster_steps_per_s_cpu_basis": nodes * usable * per_core_cpu}

    rows = [dict(nodes_for(per_ep_actor), label="measured guess_number")]
    rows += [dict(nodes_for(k * 1024), label=f"hypothetical {k:g} KiB/episode env") for k in heavy_kib]
    return {
        "note": ("Linear projection from single-machine measurements on this 2-core box (driver, env actors "
                 "and Ray system processes sharing the same cores). Not a cluster measurement: cross-node "
                 "object transfer, GCS/raylet load at scale and per-node driver sharding are not measured."),
        "target_concurrent_episodes": target,
        "node": {"cores": node_cores, "gib": node_gib, "memory_fraction_for_envs": mem_frac,
                 "reserved_cores": reserve_cores},
        "measured": {"steps_per_s_here": main["steps_per_s"], "cores_here": cores_here,
                     "steps_per_s_per_core_wall": per_core_wall, "steps_per_s_per_core_cpu": per_core_cpu,
                     "driver_cpu_us_per_step": driver_us, "actor_cpu_us_per_step": actor_us,
                     "ray_system_cpu_us_per_step": sys_us, "empty_actor_rss_bytes": empty_actor,
                     "actor_bytes_per_live_episode": per_ep_actor, "driver_bytes_per_live_episode": per_ep_driver},
        "single_driver_cap_steps_per_s": 1e6 / driver_us,
        "actors_per_node": actors_per_node, "drivers_per_node": drivers_per_node,
        "node_steps_per_s_wall_basis": usable * per_core_wall,
        "node_steps_per_s_cpu_basis": usable * per_core_cpu,
        "rows": rows,
    }


def start_ray(ray, attempts: int = 3) -> int:
    """ray.init as tests/conftest.py does. On a loaded machine the raylet can abort at startup when the
    dashboard agent takes longer than its hard-coded 15 s to write its port file (ray-project/ray#65983),
    so a failed start is retried in a fresh temp dir."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="qr", dir="/tmp"), include_dashboard=False,
                     logging_level="WARNING",
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
            return attempt
        except Exception as e:  # noqa: BLE001
            print(f"ray.init failed (attempt {attempt}/{attempts}): {type(e).__name__}: {str(e)[:200]}", flush=True)
            ray.shutdown()
            if attempt == attempts:
                raise
    return attempts


async def main_async(args) -> dict:
    import ray

    kwargs = {"low": 0, "high": args.high, "max_turns": args.max_turns}
    res: dict = {"command": "python " + " ".join(sys.argv), "env": ENV, "env_kwargs": kwargs,
                 "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "ray_version": ray.__version__, "python": platform.python_version()}
    print("in-process baseline ...", flush=True)
    res["inprocess"] = inprocess_loop(kwargs, args.inproc_episodes)
    res["actor_side_inprocess"] = actor_side_inprocess(kwargs, args.episodes)
    print(json.dumps(res["inprocess"]), json.dumps(res["actor_side_inprocess"]), sep="\n", flush=True)

    res["ray_init_attempts"] = start_ray(ray)
    try:
        print("naive: one Ray call per op ...", flush=True)
        res["naive"] = await run_naive(kwargs, args.naive_episodes, args.actors)
        print(json.dumps(res["naive"]), flush=True)

        def make_pool(actors: int, inflight: int, capacity: int, kw=kwargs) -> EnvPool:
            return env_pool(EnvConfig(name=ENV, kwargs=kw, num_actors=actors,
                                      envs_per_actor=math.ceil(capacity / actors)), max_inflight_calls=inflight)

        gct = tuple(int(x) for x in args.driver_gc_threshold.split(",") if x) or None
        print(f"main: {args.episodes} live episodes, {args.actors} actors x inflight {args.max_inflight}, "
              f"driver gc threshold {gct or 'python default'} ...", flush=True)
        pool = make_pool(args.actors, args.max_inflight, args.episodes)
        res["main"] = await run_pool(pool, args.episodes, gate_for_memory=True, gc_threshold=gct)
        print(json.dumps({k: v for k, v in res["main"].items() if "cpu" not in k}), flush=True)
        print("same pool, Python's default GC thresholds in the driver ...", flush=True)
        res["main_python_gc"] = await run_pool(pool, args.episodes, seed0=10**6, gate_for_memory=True)
        print(json.dumps(summary(res["main_python_gc"])), flush=True)
        if args.profile:
            print("profiled replay (cProfile on the driver) ...", flush=True)
            prof = cProfile.Profile()
            p = await run_pool(pool, args.episodes, seed0=2 * 10**6, gate_for_memory=True, profile=prof,
                               gc_threshold=gct)
            res["profile"] = {"steps_per_s_under_cprofile": p["steps_per_s"], "errors": p["errors"],
                              **profile_summary(prof)}
        pool.shutdown()

        print("single-step env at 2x pool capacity ...", flush=True)
        one = {"low": 0, "high": 0, "max_turns": 1}
        pool = make_pool(args.actors, args.max_inflight, args.episodes, kw=one)
        res["single_step"] = await run_pool(pool, 2 * args.episodes, seed0=0, gc_threshold=gct)
        res["single_step"]["env_kwargs"] = one
        pool.shutdown()
        print(json.dumps({k: v for k, v in res["single_step"].items() if k != "cpu"}), flush=True)

        res["sweep"] = []
        for cfg in filter(None, args.sweep.split(",")):
            a, inf = (int(x) for x in cfg.split("x"))
            pool = make_pool(a, inf, args.episodes)
            r = await run_pool(pool, args.episodes, seed0=3 * 10**6, gate_for_memory=True, gc_threshold=gct)
            pool.shutdown()
            res["sweep"].append(summary(r))
            print(json.dumps(res["sweep"][-1]), flush=True)
    finally:
        ray.shutdown()
    m, d = res["main"], res["main_python_gc"]
    ip = res["inprocess"]["steps_per_s"]
    res["ratios"] = {"ray_pool_steps_per_s / inprocess_steps_per_s": m["steps_per_s"] / ip,
                     "ray_pool_end_to_end_steps_per_s / inprocess_steps_per_s": m["end_to_end_steps_per_s"] / ip,
                     "ray_pool_python_gc_steps_per_s / inprocess_steps_per_s": d["steps_per_s"] / ip,
                     "ray_pool_steps_per_s / naive_steps_per_s": m["steps_per_s"] / res["naive"]["steps_per_s"],
                     "driver_gc_tuned / python_gc (steps/s)": m["steps_per_s"] / d["steps_per_s"]}

    def targets(x: dict) -> dict:
        return {"steps_per_s >= 20000": x["steps_per_s"] >= 20000,
                "end_to_end_steps_per_s >= 20000": x["end_to_end_steps_per_s"] >= 20000,
                "live_episodes >= 10000": x["live_envs_reported_by_actors"] >= 10000 and x["peak_live"] >= 10000,
                "errors == 0": x["errors"] == 0 and x["actor_restarts"] == 0}

    res["targets"] = {"main (driver gc tuned)": targets(m), "python default gc": targets(d),
                      "single_step errors == 0": res["single_step"]["errors"] == 0}
    res["env_pool_change"] = ("EnvHost resolves the env class once in __init__ (resolve_env_class) and constructs "
                              "envs with self._cls(**kwargs) on reset, instead of make_env() per reset, which "
                              "scans all installed entry points (~7-12 ms per call in this venv).")
    res["projection"] = projection(m, os.cpu_count() or 1, args.node_cores, args.node_gib, args.mem_frac,
                                   args.reserve_cores, args.target_episodes,
                                   [float(x) for x in args.heavy_kib.split(",") if x])
    return res


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return str(b)


def markdown(r: dict) -> str:
    m, d, ip, nv, ss = r["main"], r["main_python_gc"], r["inprocess"], r["naive"], r["single_step"]
    a, pj, ra = r["actor_side_inprocess"], r["projection"], r["ratios"]
    pc, rc = m["play_cpu"], m["reset_cpu"]
    gct = ",".join(map(str, m["driver_gc_threshold"]))
    yes = lambda ok: "yes" if ok else "**NO**"  # noqa: E731
    L = [f"# Env scale: `{r['env']}` {r['env_kwargs']} through the Ray env pool, scripted binary-search policy",
         "", f"Command: `{r['command']}`  ({r['cores']} cores shared with other jobs, so wall-clock numbers are "
         f"noisy; ratios are against baselines measured in the same run. Ray {r['ray_version']}, "
         f"Python {r['python']}; whole benchmark {r.get('bench_wall_s', 0):.0f} s)", "",
         f"Pool: `EnvPool('{r['env']}', num_actors={m['actors']}, envs_per_actor={m['envs_per_actor']}, "
         f"max_inflight_calls={m['max_inflight_calls']})`, {m['episodes']} episodes, one coroutine each: all reset "
         "and held live (RSS read), then played concurrently to the end.", "",
         "## Headline (same run)", "",
         "| measurement | value |", "|---|---|",
         f"| live episodes | **{m['peak_live']}** live in the driver, {m['live_envs_reported_by_actors']} live envs "
         f"reported by the {m['actors']} actors |",
         f"| errors / actor restarts | **{m['errors']} / {m['actor_restarts']}** |",
         f"| env steps/s through the pool, driver GC threshold ({gct}) | **{m['steps_per_s']:.0f}** "
         f"({m['steps']} steps in {m['play_phase_s']:.1f} s) |",
         f"| same pool, Python's default driver GC (700,10,10) | {d['steps_per_s']:.0f} "
         f"(errors {d['errors']}) |",
         f"| end to end incl. the {m['resets']} resets (tuned / default GC) | {m['end_to_end_steps_per_s']:.0f} / "
         f"{d['end_to_end_steps_per_s']:.0f} steps/s (resets {m['resets_per_s']:.0f}/s) |",
         f"| Ray calls in the play phase / ops per call | {m['play_calls']} / {m['play_ops_per_call']:.0f} |",
         f"| baseline: same env + policy, in-process loop (no Ray) | {ip['steps_per_s']:.0f} steps/s "
         f"({ip['mean_steps_per_episode']:.1f} steps/episode, solved {ip['solved_frac']:.2f}) |",
         f"| **pool / in-process** | **{ra['ray_pool_steps_per_s / inprocess_steps_per_s']:.3f}** "
         f"(default GC {ra['ray_pool_python_gc_steps_per_s / inprocess_steps_per_s']:.3f}, end to end "
         f"{ra['ray_pool_end_to_end_steps_per_s / inprocess_steps_per_s']:.3f}) |",
         f"| baseline: one Ray call per op, {nv['episodes']} concurrent episodes | {nv['steps_per_s']:.0f} steps/s "
         f"({nv['calls_per_s']:.0f} calls/s), {nv['errors']} errors |",
         f"| **pool / one-call-per-op (coalescing speed-up)** | **{ra['ray_pool_steps_per_s / naive_steps_per_s']:.0f}x** |",
         f"| single-step env ({ss['env_kwargs']}): {ss['episodes']} episodes through capacity {ss['capacity']} | "
         f"{ss['steps_per_s']:.0f} episodes/s = {ss['end_to_end_ops_per_s']:.0f} ops/s (reset+step), "
         f"{ss['errors']} errors, {ss['calls']} calls |",
         "", "Targets (>= 20,000 steps/s, 10,000 live episodes, 0 errors):", ""]
    for k, v in r["targets"].items():
        L.append(f"- {k}: " + (", ".join(f"{kk} {yes(vv)}" for kk, vv in v.items()) if isinstance(v, dict) else yes(v)))
    L += ["", "## Memory", "",
          "| | value |", "|---|---|",
          f"| empty actor RSS (0 live envs) | {', '.join(fmt_bytes(x) for x in m['actor_rss_empty_bytes'])} |",
          f"| actor RSS with {m['episodes'] // m['actors']} live envs each | "
          f"{', '.join(fmt_bytes(x) for x in m['actor_rss_live_bytes'])} |",
          f"| **per live episode, actor side** | **{m['actor_bytes_per_live_episode']:.0f} B** |",
          f"| per live episode, driver side (coroutine, future, handle, policy state) | "
          f"{m['driver_bytes_per_live_episode']:.0f} B |",
          f"| actor RSS after every episode closed (the allocator keeps its pages) | "
          f"{', '.join(fmt_bytes(x) for x in m['actor_rss_after_all_closed_bytes'])} |",
          "", "## Where the time goes", "",
          "CPU time per step in the play phase (psutil user+system of each process / steps; the driver's GC time "
          "from gc.callbacks):", "",
          "| run | driver us | of it cyclic GC us | env actors us | Ray system procs us | total us | steps/s |",
          "|---|---|---|---|---|---|---|"]
    for label, x in ((f"driver GC {gct}", m), ("Python default GC", d)):
        c = x["play_cpu"]
        L.append(f"| {label} | {c['driver_cpu_us_per_op']:.1f} | {c['driver_gc_us_per_op']:.1f} | "
                 f"{c['actors_cpu_us_per_op']:.1f} | {c['ray_system_cpu_us_per_op']:.1f} | "
                 f"{c['total_cpu_us_per_op']:.1f} | {x['steps_per_s']:.0f} |")
    L += ["", f"Reset phase, per reset: driver {rc['driver_cpu_us_per_op']:.1f} us, actors "
          f"{rc['actors_cpu_us_per_op']:.1f} us.", "",
          f"Actor-side work measured in-process (no Ray): `EnvHost.run_batch` {a['run_batch_step_us_per_op']:.2f} "
          f"us per step op and {a['run_batch_reset_us_per_op']:.1f} us per reset op; the pieces: env.step "
          f"{a['env_step_us']:.2f}, check_step_output {a['check_step_output_us']:.2f}, plain_info "
          f"{a['plain_info_us']:.2f}, env construction {a['env_construct_us']:.2f}, env.reset "
          f"{a['env_reset_us']:.1f} us (mostly gymnasium's `np_random` seeding in `Env.reset(seed=...)`); "
          f"pickling the op and result lists {a['pickle_roundtrip_us_per_step_op']:.2f} us/op. "
          f"`make_env()` costs {a['make_env_us']:.0f} us (it scans every installed package's entry points): "
          "EnvHost called it on every reset before the fix in `rollout/env_pool.py` (it now resolves the class once "
          f"in `__init__`): that capped an actor at ~{1e6 / a['make_env_us']:.0f} resets/s, i.e. "
          f"~{m['episodes'] / m['actors'] * a['make_env_us'] / 1e6:.0f} s to reset {m['episodes']} episodes on "
          f"{m['actors']} actors (before the fix, this workload measured 120 s for the 10,000 resets and ~1,500 "
          "steps/s end to end; the play phase alone was already ~29k steps/s).", ""]
    if "profile" in r:
        p = r["profile"]
        L += [f"Driver cProfile of a replay of the main run ({p['steps_per_s_under_cprofile']:.0f} steps/s under "
              "the profiler). Own time by part:", "", "| part | own s | share |", "|---|---|---|"]
        L += [f"| {k} | {v['s']:.2f} | {100 * v['frac']:.1f}% |" for k, v in p["own_time_by_part"].items()]
        L += ["", "Top functions by own time:", "", "| function | calls | own s | share |", "|---|---|---|---|"]
        L += [f"| `{x['function']}` | {x['calls']} | {x['tottime_s']:.3f} | {100 * x['tottime_frac']:.1f}% |"
              for x in p["top_by_tottime"][:12]]
        L.append("")
    L += ["## Pool knobs (same workload, fresh pool each)", "",
          "Batch size per Ray call is set by the knobs: episodes per actor per round / calls in flight.", "",
          "| actors | max inflight | driver GC | steps/s | end-to-end steps/s | resets/s | ops/call | driver us/step "
          "| of it GC | actor us/step | Ray sys us/step | errors |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in [summary(m) | {"note": " (main)"}, summary(d) | {"note": " (main, replay)"}] + r["sweep"]:
        L.append(f"| {x['actors']} | {x['max_inflight_calls']} | {','.join(map(str, x['driver_gc_threshold']))}"
                 f"{x.get('note', '')} | {x['steps_per_s']:.0f} | {x['end_to_end_steps_per_s']:.0f} | "
                 f"{x['resets_per_s']:.0f} | {x['play_ops_per_call']:.0f} | {x['driver_cpu_us_per_op']:.1f} | "
                 f"{x['driver_gc_us_per_op']:.1f} | {x['actors_cpu_us_per_op']:.1f} | "
                 f"{x['ray_system_cpu_us_per_op']:.1f} | {x['errors']} |")
    me, nd = pj["measured"], pj["node"]
    L += ["", f"## Projection to {pj['target_concurrent_episodes']:,} concurrent episodes", "",
          f"**{pj['note']}**", "",
          f"Inputs (main run): {me['steps_per_s_here']:.0f} steps/s on {me['cores_here']} cores = "
          f"{me['steps_per_s_per_core_wall']:.0f} steps/s per core by wall clock (contended, conservative), or "
          f"{me['steps_per_s_per_core_cpu']:.0f} per core of CPU actually spent "
          f"({me['driver_cpu_us_per_step'] + me['actor_cpu_us_per_step'] + me['ray_system_cpu_us_per_step']:.1f} "
          f"us/step: driver {me['driver_cpu_us_per_step']:.1f}, actors {me['actor_cpu_us_per_step']:.1f}, Ray system "
          f"{me['ray_system_cpu_us_per_step']:.1f}); empty actor {fmt_bytes(me['empty_actor_rss_bytes'])}; "
          f"{me['actor_bytes_per_live_episode']:.0f} B per live episode in the actor + "
          f"{me['driver_bytes_per_live_episode']:.0f} B in the driver.", "",
          f"Model, per node of {nd['cores']} cores / {nd['gib']:g} GiB: {nd['reserved_cores']} cores reserved "
          f"(raylet, OS); the other cores split between env actors and episode drivers in proportion to their CPU per "
          f"step = **{pj['actors_per_node']} env actors + {pj['drivers_per_node']} driver processes**; "
          f"{100 * nd['memory_fraction_for_envs']:.0f}% of memory for env state (actor + driver bytes per episode, "
          f"plus one empty-actor RSS per actor). Node throughput = usable cores x steps/s per core = "
          f"**{pj['node_steps_per_s_wall_basis']:,.0f} steps/s** (wall basis) to "
          f"{pj['node_steps_per_s_cpu_basis']:,.0f} (CPU basis). One asyncio driver (today's EpisodeRunner is one) is "
          f"capped at ~{pj['single_driver_cap_steps_per_s']:,.0f} steps/s by its own "
          f"{me['driver_cpu_us_per_step']:.1f} us/step, so reaching a node's rate needs the episodes sharded "
          "over several driver processes, each with its own EnvPool client.", "",
          "| per-episode env memory | episodes per actor | episodes per node | nodes for target | "
          "cluster steps/s, wall basis | CPU basis | steps/s per episode | episodes per actor at target | "
          "actor CPU per round at target |",
          "|---|---|---|---|---|---|---|---|---|"]
    for x in pj["rows"]:
        L.append(f"| {x['label']} ({fmt_bytes(x['actor_bytes_per_episode'])}) | {x['episodes_per_actor']:,} | "
                 f"{x['episodes_per_node']:,} | {x['nodes_for_target']} | {x['cluster_steps_per_s_wall_basis']:,.0f} | "
                 f"{x['cluster_steps_per_s_cpu_basis']:,.0f} | "
                 f"{x['cluster_steps_per_s_wall_basis'] / pj['target_concurrent_episodes']:.2f} | "
                 f"{x['episodes_per_actor_at_target']:,.0f} | {x['actor_round_s_at_target']:.2f} s |")
    L += ["", "Memory is not what binds for a small text env: one node holds 10^6 guess_number episodes many times "
          "over; the cluster size for 10^6 concurrent episodes is then set by the step rate wanted per episode "
          "(steps/s per episode: how often each of the 10^6 episodes can step). Heavier envs (hypothetical rows) become "
          "memory-bound. The last column is the latency floor the pool adds per turn when every episode steps at once "
          "(an actor works through its batch serially): more actors per node than cores only helps if the env "
          "waits on I/O."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=10_000, help="live episodes in the main run")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--max-inflight", type=int, default=2, help="EnvPool max_inflight_calls")
    ap.add_argument("--high", type=int, default=10**6)
    ap.add_argument("--max-turns", type=int, default=25)
    ap.add_argument("--inproc-episodes", type=int, default=10_000)
    ap.add_argument("--naive-episodes", type=int, default=256)
    ap.add_argument("--driver-gc-threshold", default="100000,50,1000",
                    help="gc.set_threshold in the driver while episodes run ('' = Python's default 700,10,10)")
    ap.add_argument("--sweep", default="1x2,2x1,2x4,4x2", help="extra pool configs ACTORSxINFLIGHT ('' to skip)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="replay the main run under cProfile (driver)")
    ap.add_argument("--node-cores", type=int, default=64)
    ap.add_argument("--node-gib", type=float, default=256)
    ap.add_argument("--mem-frac", type=float, default=0.8)
    ap.add_argument("--reserve-cores", type=int, default=2)
    ap.add_argument("--target-episodes", type=int, default=10**6)
    ap.add_argument("--heavy-kib", default="64,1024,16384", help="hypothetical per-episode env sizes for the projection")
    ap.add_argument("--out", default=str(RESULTS / "env_scale"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = asyncio.run(main_async(args))
    res["bench_wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"bench wall time {res['bench_wall_s']:.0f}s")


if __name__ == "__main__":
    main()
