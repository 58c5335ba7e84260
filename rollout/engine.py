"""Rollout engine: vLLM with continuous batching, one request per episode turn, per-token logprobs
and policy versions, and weight updates in size-capped buckets.

Two backends behind one async interface (`VLLMEngine`, also the Ray actor class):
- `inproc` (default on CPU): vLLM's `LLMEngine` stepped by one engine thread inside this process.
  Requests from any number of concurrent episodes join the running batch between steps
  (continuous batching); the thread sleeps on its queue when idle (no busy-waiting).
- `async` (default on GPU): vLLM's `AsyncLLM` (engine core in its own process, overlapping
  scheduling with the forward pass).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from common.cpus import pin_to_cpus


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    version: int  # the version that sampled the first token
    versions: list[int] = field(default_factory=list)  # per token (differs after a mid-request update)


@dataclass
class _Stream:
    """A request's tokens as its deltas arrive, each tagged with the policy version that sampled it."""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    versions: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out, version: int) -> None:
        c = out.outputs[0]
        ids = list(c.token_ids)
        self.token_ids += ids
        self.logprobs += [c.logprobs[i][tok].logprob for i, tok in enumerate(ids)] if c.logprobs else []
        self.versions += [version] * len(ids)
        if out.finished or c.finish_reason is not None:  # a session's turn ends unfinished (rollout/sessions.py)
            self.finish_reason = c.finish_reason or "stop"


@dataclass
class EngineConfig:
    """Built from `rollout.*` / `policy.*` by rl/settings.py, where the defaults live."""
    model: str
    dtype: str  # auto: bfloat16 for Qwen3.5 (vLLM CPU's GDN kernel needs it), else float32 on CPU
    seed: int
    max_model_len: int
    kv_cache_memory_mb: int
    enforce_eager: bool
    enable_prefix_caching: bool
    backend: str  # auto | inproc | async
    cpus: str | None  # CPU cores for the engine (e.g. "0" or "0-3"); None: vLLM's default binding
    extra: dict


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _as_prompt(prompt) -> dict:
    """A vLLM prompt: token ids, or a ready dict (with `multi_modal_data` for images)."""
    return prompt if isinstance(prompt, dict) else {"prompt_token_ids": prompt}


def _image_token_id(model_path: str) -> int | None:
    """`<|image_pad|>`'s id for a vision-language checkpoint (None otherwise)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return getattr(cfg, "image_token_id", None) if getattr(cfg, "vision_config", None) is not None else None


def pick_engine_dtype(model_path: str, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import json
    from pathlib import Path

    cfg_file = Path(model_path) / "config.json"
    arch = []
    if cfg_file.exists():
        arch = json.loads(cfg_file.read_text()).get("architectures", [])
    is_qwen3_5 = any("Qwen3_5" in a or "Qwen3Next" in a for a in arch)
    return "bfloat16" if is_qwen3_5 or _on_gpu() else "float32"


def _sampling_params(max_tokens: int, temperature: float, top_p: float, seed: int | None,
                     stop_token_ids: list[int] | None, n: int = 1, ignore_eos: bool = False):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # DELTA: tokens are collected as each engine step makes them, so each is tagged with the policy
    # version current at that step (a weight update may land in the middle of a request).
    return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                          seed=seed, stop_token_ids=stop_token_ids, detokenize=False, ignore_eos=ignore_eos,
                          output_kind=RequestOutputKind.DELTA)


def _score_params():
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)


class _InprocBackend:
    """One thread owns vLLM's `LLMEngine`: it adds queued requests between engine steps and runs
    control calls (weight loads) when no request is in flight, or, for `interrupt` calls, between
    two engine steps while requests are in flight (partial rollouts: they continue on the new
    weights, and their later tokens carry the new version). Multi-turn episodes' turns continue
    one vLLM session each (rollout/sessions.py): paused sessions are not in flight."""

    def __init__(self, llm_kwargs: dict):
        self._q: queue.Queue = queue.Queue()
        self._waiting: dict[str, Future] = {}
        self._streams: dict[str, _Stream] = {}
        self._calls: list[tuple[Callable, Future]] = []
        self._interrupts: list[tuple[Callable, Future]] = []
        self.version = 0  # read and written on the engine thread only (after construction)
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self.sessions = None  # EngineSessions once the engine runs, if this vLLM supports them
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(llm_kwargs, started), daemon=True,
                                        name="vllm-engine")
        self._thread.start()
        started.result()  # re-raises an engine construction error here

    def submit(self, prompt_ids: list[int], params, session: tuple[str, bool] | None = None) -> Future:
        """session: (key, last_turn) of a multi-turn episode (rollout/sessions.py)."""
        return self._put("add", (prompt_ids, params, session))

    def end_sessions(self, keys: list[str]) -> None:
        if self._dead is None:
            self._q.put(("end", keys, None))

    def call(self, fn: Callable, interrupt: bool = False) -> Future:
        """Run fn(llm) on the engine thread once no request is in flight (interrupt=False) or
        before the next engine step (interrupt=True)."""
        return self._put("interrupt" if interrupt else "call", fn)

    def _put(self, kind: str, payload) -> Future:
        fut: Future = Future()
        if self._dead is not None:
            fut.set_exception(RuntimeError(f"the vLLM engine thread stopped: {self._dead!r}"))
        else:
            self._q.put((kind, payload, fut))
        return fut

    def _run(self, llm_kwargs: dict, started: Future) -> None:
        try:
            from vllm import LLM

            self.llm = LLM(**llm_kwargs)
            engine = self.llm.llm_engine
            from rollout.sessions import EngineSessions

            self.sessions = EngineSessions(engine) if EngineSessions.supported(self.llm) else None
        except BaseException as e:  # noqa: BLE001
            started.set_exception(e)
            return
        started.set_result(True)
        try:
            self._serve(engine)
        except BaseException as e:  # noqa: BLE001 - the engine is gone: fail everything, now and later
            self._dead = e
            for fut in list(self._waiting.values()) + [f for _, f in self._calls + self._interrupts]:
                if not fut.done():
                    fut.set_exception(e)
            while not self._q.empty():
                fut = self._q.get_nowait()[2]
                if fut is not None:
                    fut.set_exception(e)

    def _serve(self, engine) -> None:
        from vllm.sampling_params import RequestOutputKind

        sessions = self.sessions
        while True:
            busy = self._active(engine)
            try:
                items = [self._q.get(block=not busy and not self._calls and not self._interrupts)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            for kind, payload, fut in items:
                if kind == "add":
                    rid = str(next(self._ids))
                    prompt, params, session = payload
                    try:
                        if session is not None and sessions is not None and isinstance(prompt, list):
                            rid = sessions.add(rid, prompt, params, *session)
                        else:
                            engine.add_request(rid, _as_prompt(prompt), params)
                        self._waiting[rid] = fut
                        if params.output_kind == RequestOutputKind.DELTA:
                            self._streams[rid] = _Stream()
                    except Exception as e:  # noqa: BLE001 - e.g. prompt longer than max_model_len
                        fut.set_exception(e)
                elif kind == "end":
                    if sessions is not None:
                        sessions.end(payload)
                elif kind == "interrupt":
                    self._interrupts.append((payload, fut))
                else:
                    self._calls.append((payload, fut))
            if self._interrupts:
                self._release_sessions(engine)
                self._run_calls(self._interrupts)
                self._interrupts = []
            if self._active(engine):
                if sessions is not None:
                    sessions.evict()
                try:
                    outs = engine.step()
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, never hang them
                    for fut in self._waiting.values():
                        fut.set_exception(e)
                    self._waiting.clear()
                    self._streams.clear()
                    if sessions is not None:
                        sessions.clear()
                    if self._abort_all(engine):
                        continue
                    raise
                for out in outs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.add(out, self.version)
                    if out.finished or (stream is not None and stream.finish_reason is not None):
                        fut = self._waiting.pop(out.request_id, None)
                        self._streams.pop(out.request_id, None)
                        if sessions is not None and stream is not None:
                            sessions.finished(out.request_id, stream)
                        if fut is not None:
                            fut.set_result(stream if stream is not None else out)
            elif self._calls:
                self._release_sessions(engine)
                self._run_calls(self._calls)
                self._calls = []

    def _active(self, engine) -> bool:
        """Requests in flight; paused sessions are not (they wait for their episode's next turn)."""
        if self.sessions is not None and self.sessions.live:
            return bool(self._waiting)
        return engine.has_unfinished_requests()

    def _release_sessions(self, engine) -> None:
        """Before a control call: sessions give back their KV (rollout/sessions.py release); turns
        that were waiting to continue one restart as fresh requests over their full prompt."""
        if self.sessions is None:
            return
        for rid, prompt, params in self.sessions.release():
            fut, stream = self._waiting.pop(rid, None), self._streams.pop(rid, None)
            if fut is None:
                continue
            new = str(next(self._ids))
            engine.add_request(new, _as_prompt(prompt), params)
            self._waiting[new], self._streams[new] = fut, stream or _Stream()

    def _run_calls(self, calls) -> None:
        for fn, fut in calls:
            try:
                fut.set_result(fn(self))
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)

    @staticmethod
    def _abort_all(engine) -> bool:
        """After a failed step, drop the engine's requests so it can serve new ones."""
        try:
            ids = list(engine.output_processor.request_states)  # internal ids (paused sessions too)
            engine.abort_request(ids, internal=True)
            return True
        except Exception:  # noqa: BLE001
            return False

    async def generate(self, prompt_ids: list[int], params, session: tuple[str, bool] | None = None):
        return await asyncio.wrap_future(self.submit(prompt_ids, params, session))

    async def collective_rpc(self, method: str, args: tuple, version: int | None = None, interrupt: bool = False,
                             reset_cache: bool = True):
        """Run a worker method on the engine thread; with `version`, adopt it in the same critical
        section (so every later token carries it)."""
        def fn(backend):
            out = backend.llm.collective_rpc(method, args=args)
            # After a mid-flight update, running requests are preempted and their KV (and Gated
            # DeltaNet state) recomputed with the new weights before they continue.
            if reset_cache:
                backend.llm.reset_prefix_cache(reset_running_requests=interrupt)
                if backend.multimodal:  # see VLLMEngine.__init__
                    backend.llm.llm_engine.reset_encoder_cache()
            if version is not None:
                backend.version = version
            return out

        return await asyncio.wrap_future(self.call(fn, interrupt))


class _AsyncLLMBackend:
    """vLLM's AsyncLLM (engine core in a separate process)."""

    def __init__(self, llm_kwargs: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**llm_kwargs))
        self._ids = itertools.count()
        self.version = 0

    sessions = None  # multi-turn turns send their full prompt; prefix caching (rollout=gpu) reuses it

    async def generate(self, prompt_ids: list[int], params, session: tuple[str, bool] | None = None):
        from vllm.sampling_params import RequestOutputKind

        final, stream = None, _Stream()
        async for out in self.llm.generate(_as_prompt(prompt_ids), params, request_id=str(next(self._ids))):
            final = out
            if params.output_kind == RequestOutputKind.DELTA:
                stream.add(out, self.version)
        return stream if params.output_kind == RequestOutputKind.DELTA else final

    async def collective_rpc(self, method: str, args: tuple, version: int | None = None, interrupt: bool = False,
                             reset_cache: bool = True):
        """With `interrupt`, requests in flight are paused (kept) around the update and continue
        on the new weights; the version is adopted before they resume."""
        if interrupt:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            out = await self._rpc(method, args)
            if reset_cache:
                await self.llm.reset_prefix_cache(reset_running_requests=interrupt)
                if self.multimodal:  # see VLLMEngine.__init__
                    await self.llm.reset_encoder_cache()
            if version is not None:
                self.version = version
        finally:
            if interrupt:
                await self.llm.resume_generation()
        return out

    async def _rpc(self, method: str, args: tuple):
        if method == "receive_weights" and _is_bucket(args[1:]):
            # Tensors cannot travel through vLLM's engine-core -> worker RPC (it cannot pickle the
            # zero-copy buffers it decodes), so a bucket of them goes through a file in shared memory.
            import tempfile

            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with tempfile.NamedTemporaryFile(suffix=".safetensors", dir=shm) as f:
                save_file(_unshared(args[1]), f.name)
                return await self.llm.collective_rpc("receive_weights_from_file", args=(args[0], f.name))
        return await self.llm.collective_rpc(method, args=args)


def _is_bucket(message: tuple) -> bool:
    """A transport message that is one list of (name, tensor) pairs (sync/object_store.py)."""
    import torch

    return (len(message) == 1 and isinstance(message[0], list)
            and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)
                    for item in message[0]))


def _unshared(named: list) -> dict:
    """safetensors refuses tensors sharing memory (e.g. tied embeddings): copy repeats."""
    out, seen = {}, set()
    for n, t in named:
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[n] = t.clone() if key in seen else t
        seen.add(key)
    return out


class VLLMEngine:
    """All methods are coroutines, so the Ray actor serves thousands of concurrent requests."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.dtype = pick_engine_dtype(cfg.model, cfg.dtype)
        self.backend_name = cfg.backend if cfg.backend != "auto" else ("async" if _on_gpu() else "inproc")
        if self.backend_name not in ("inproc", "async"):
            raise ValueError(f"rollout.engine_backend={cfg.backend!r}; use auto, inproc or async")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.backend_name == "async" else "0"
        if cfg.cpus and not _on_gpu():  # vLLM binds its OpenMP threads to these cores
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpus
            pin_to_cpus(cfg.cpus)
        self.version = 0
        self._receiving: int | None = None  # the version whose buckets the workers hold, until its commit
        self.inflight = 0
        self.image_token_id = _image_token_id(cfg.model)
        kwargs = dict(
            model=cfg.model, dtype=self.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, enable_prefix_caching=cfg.enable_prefix_caching,
            worker_extension_cls="rollout.vllm_ext.WeightSyncExtension", disable_log_stats=True,
        )
        if not _on_gpu():
            kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=cfg.kv_cache_memory_mb << 20)
        kwargs.update(cfg.extra)
        backend = _AsyncLLMBackend if self.backend_name == "async" else _InprocBackend
        self.backend = backend(kwargs)
        # Vision-language: after a weight load the vision embeddings cached for images seen before are
        # stale, and vLLM's worker-side reload clears its encoder cache but not the scheduler's record
        # of it ("Encoder cache miss" on the next request of such an image): reset both.
        self.backend.multimodal = self.image_token_id is not None

    # -- generation ---------------------------------------------------------------------------
    def _prompt(self, prompt_ids: list[int], images: list | None):
        """Token ids, or with images vLLM's multimodal prompt: each expanded placeholder collapsed to
        one `<|image_pad|>` (vLLM expands it again from the image; policies/vision.py)."""
        if not images:
            return prompt_ids
        from policies.vision import engine_prompt

        if self.image_token_id is None:
            raise ValueError(f"images were sent to the engine of {self.cfg.model!r}, which is not a "
                             "vision-language model; use a VL policy (e.g. policy=tiny_qwen3_5_vl)")
        return {"prompt_token_ids": engine_prompt(prompt_ids, self.image_token_id, len(images)),
                "multi_modal_data": {"image": list(images)}}

    async def generate_one(self, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0,
                           top_p: float = 1.0, seed: int | None = None,
                           stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                           images: list | None = None, session: str | None = None,
                           last_turn: bool = False) -> Completion:
        """One completion of `prompt_ids` with the logprob of every sampled token and the policy
        version that sampled each one (ignore_eos: always generate max_tokens, for benchmarks).
        `images` (vision-language policies): the prompt's images in order; `prompt_ids` carries
        their placeholders expanded, as the processor made them (policies/vision.py).
        `session` (multi-turn episodes): a key under which the in-process engine keeps this turn's
        request (KV cache, Gated DeltaNet state) until the episode's next turn, whose `prompt_ids`
        extend this prompt + completion, so that only the new tokens are prefilled; `last_turn`:
        none follows. Other turns end with `end_sessions`. Text prompts only; other backends
        ignore it (rollout/sessions.py)."""
        prompt = self._prompt(prompt_ids, images)
        params = _sampling_params(max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos=ignore_eos)
        self.inflight += 1
        try:
            if session is not None and not images:
                st = await self.backend.generate(prompt, params, (session, last_turn))
            else:
                st = await self.backend.generate(prompt, params)
        finally:
            self.inflight -= 1
        first = st.versions[0] if st.versions else self.version
        return Completion(st.token_ids, st.logprobs, st.finish_reason or "stop", first, st.versions)

    async def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int | None = None,
                       stop_token_ids: list[int] | None = None) -> list[list[Completion]]:
        """For each prompt, n completions (all requests join the running batch at once)."""
        seeds = [None if seed is None else seed + i for i in range(len(prompts) * n)]
        outs = await asyncio.gather(*[
            self.generate_one(p, max_tokens, temperature, top_p, seeds[i * n + j], stop_token_ids)
            for i, p in enumerate(prompts) for j in range(n)])
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

    async def end_sessions(self, keys: list[str]) -> None:
        """The episodes of these sessions (generate_one `session`) are over: free what they hold."""
        if getattr(self.backend, "sessions", None) is not None:
            self.backend.end_sessions(keys)

    async def session_stats(self) -> dict:
        """Counters of the multi-turn sessions (rollout/sessions.py); empty without session support."""
        s = getattr(self.backend, "sessions", None)
        for _ in range(5):  # the engine thread updates them meanwhile
            try:
                return {} if s is None else {**s.stats, "live": len(s.live), "paused": len(s.paused)}
            except RuntimeError:
                continue
        return {}

    async def score(self, sequences: list[list[int]], images: list[list] | None = None) -> list[list[float]]:
        """Teacher-forced logprob of every token after the first (used to probe weight sync).
        `images`: per sequence, the images its (expanded) placeholders stand for (VL policies)."""
        prompts = [self._prompt(s, images[i] if images else None) for i, s in enumerate(sequences)]
        outs = await asyncio.gather(*[self.backend.generate(p, _score_params()) for p in prompts])
        return [[out.prompt_logprobs[i][seq[i]].logprob for i in range(1, len(seq))]
                for seq, out in zip(sequences, outs)]

    # -- weight sync (sync/: the learner sends through a transport, the worker receives) -------
    async def join_transport(self, transport: str, *args) -> bool:
        """The workers' part of the learner's `connect` of `transport` (broadcast: join its group)."""
        await self.backend.collective_rpc("join_transport", (transport, *args), reset_cache=False)
        return True

    async def receive_weights(self, transport: str, version: int, *message) -> int:
        """One bucket of policy `version`, as the learner sent it through `transport`: the workers
        receive it between two engine steps (generation goes on) and keep its tensors until
        `commit_weights`. Returns the number of tensors."""
        if self._receiving not in (None, version):
            raise RuntimeError(f"weight bucket of version {version} arrived while version {self._receiving} "
                               "was incomplete; a previous sync was interrupted")
        self._receiving = version
        return (await self.backend.collective_rpc("receive_weights", (transport, *message), interrupt=True,
                                                  reset_cache=False))[0]

    async def commit_weights(self, version: int, interrupt: bool = False) -> dict:
        """Load all received buckets (vLLM `reload_weights`), reset the prefix cache, and adopt
        `version`: once in-flight requests finish (interrupt=False), or between two engine steps
        while they continue on the new weights (interrupt=True: partial rollouts; their later
        tokens carry `version`)."""
        if self._receiving != version:
            raise RuntimeError(f"commit of version {version} without its buckets (have {self._receiving})")
        t0 = time.perf_counter()
        self._receiving = None
        inflight = self.inflight
        loaded = await self.backend.collective_rpc("load_received", (), version=version, interrupt=interrupt)
        self.version = version
        return {"tensors": loaded[0], "load_s": time.perf_counter() - t0, "inflight_at_commit": inflight}

    async def named_weights(self) -> dict:
        """The engine's parameters in vLLM's layout (tests: exact weight comparisons)."""
        return (await self.backend.collective_rpc("named_weights", ()))[0]

    async def get_version(self) -> int:
        return self.version

    async def ready(self) -> dict:
        """Warm up (the first request pays one-off kernel setup) and report the engine's setup."""
        if not _on_gpu():  # before any seeded request (rollout/vllm_ext.py install_cpu_seed_rewind)
            await self.backend.collective_rpc("install_cpu_fixes", (), reset_cache=False)
        await self.generate([[0, 1, 2]], n=1, max_tokens=2)
        return {"dtype": self.dtype, "version": self.version, "backend": self.backend_name}

    async def load(self) -> int:
        """Requests in flight (for load balancing)."""
        return self.inflight


def engine_actor(num_cpus: float, max_concurrency: int = 100_000, **options):
    """The Ray actor class for VLLMEngine (async: one event loop serves all in-flight requests).
    Ray never restarts it or retries its calls (a restarted engine needs its weights first:
    rollout/engine_pool.py does that)."""
    import ray

    options = {"max_restarts": 0, "max_task_retries": 0, **options}
    return ray.remote(num_cpus=num_cpus, max_concurrency=max_concurrency, **options)(VLLMEngine)


def run_sync(coro):
    """Drive an engine coroutine from plain (non-async) code: benchmarks, in-process use."""
    return asyncio.run(coro)
