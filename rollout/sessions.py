"""Multi-turn episodes keep their request in the engine between turns (in-process backend).

Without this, turn k+1 of an episode is a new vLLM request whose prompt is the whole conversation
so far, and the engine prefills all of it again: on the 3-turn `guess_number` task that is ~32
prefill tokens per generated token, and prefill was >90% of the engine's time
(bench/results/multiturn.md). Here each episode's turns form one vLLM streaming-input session
(`resumable` requests, vLLM v1): when a turn's completion ends, the request pauses in the
scheduler with its KV cache and Gated DeltaNet state, and the next turn appends only the tokens
that are new (the last sampled token, which vLLM never fed back, the closing EOS if any, the env's
reply and the next assistant header) and prefills those.

The episode side is unchanged: every turn still sends the full token ids. The engine keeps, per
session, exactly the tokens the paused request holds (prompt + completion minus its last token,
checked against the scheduler), continues the session only when the new prompt extends them, and
otherwise (or when anything below says so) ends it and runs the turn as a fresh request over the
full prompt, as before. So a session changes where a prefix's KV comes from, never which tokens the
episode sees. Each turn keeps its own sampling seed: vLLM would continue the first turn's
generator, so `install_session_reseed` reseeds it per turn, as for a fresh request, and a turn
samples the same tokens with or without a session (up to the engine's floating-point noise: the
cached prefix was computed in another batch shape; in fp32 the logprobs agree to ~1e-6, in bf16
to ~1e-2).

Sessions never hold KV across a weight change or against other work:
- before any control call (weight buckets, weight loads, named_weights) every paused session is
  ended and every continuation that holds KV but is not running yet is restarted as a fresh request
  (running ones are preempted and recomputed by vLLM's own reset), so the prefix-cache reset after
  a load always succeeds and no turn continues from KV computed with older weights;
- paused sessions count against vLLM's running-request limit and hold KV blocks: while new
  requests wait for a slot, they keep at most half of the slots, and while the KV cache is over 90%
  full half of them are ended (the least recently paused first);
- a session ends with its episode (`end`), after a turn sent as the last one (`last_turn`), or when
  its turn stopped for any reason other than EOS or max_tokens.
"""
from __future__ import annotations

import copy
import inspect
from collections import Counter, OrderedDict
from dataclasses import dataclass


def install_session_reseed(worker) -> bool:
    """Worker side (through collective_rpc): when a session's next turn arrives, vLLM's model runner
    keeps the request's sampling generator from the first turn; give it a generator seeded with
    this turn's seed, as a fresh request gets (none for an unseeded turn). Idempotent."""
    import torch

    runner = worker.model_runner
    update = getattr(runner, "_update_streaming_request", None)
    if update is None:
        return False
    if getattr(runner, "_qrl_session_reseed", False):
        return True

    def update_reseeded(req_id, new_req_data):
        state = update(req_id, new_req_data)
        params = state.sampling_params
        if params is not None:
            state.generator = (torch.Generator(device=runner.device).manual_seed(params.seed)
                               if params.seed is not None else None)
        return state

    runner._update_streaming_request = update_reseeded
    runner._qrl_session_reseed = True
    return True


@dataclass
class _Session:
    rid: str  # the external request id: outputs of every turn arrive under it
    internal: str  # vLLM's internal request id
    prompt: list[int]  # the full prompt of the turn in flight
    params: object  # its SamplingParams
    last: bool  # no turn follows: end when this one finishes
    epoch: int  # EngineSessions.epoch when the turn was sent
    held: list[int] | None = None  # paused: the tokens whose KV the engine holds


class EngineSessions:
    """Session bookkeeping for one `LLMEngine`; every method runs on the engine thread."""

    PRESSURE = 0.9  # KV cache usage above which paused sessions are ended

    def __init__(self, engine):
        self.engine = engine
        self.sched = engine.engine_core.engine_core.scheduler
        self.max_model_len = engine.model_config.max_model_len
        self.max_active = getattr(self.sched, "max_num_active_reqs", None) or self.sched.max_num_running_reqs
        self.live: dict[str, _Session] = {}  # session key -> session
        self.by_rid: dict[str, str] = {}  # request id -> session key
        self.paused: OrderedDict[str, None] = OrderedDict()  # keys, least recently paused first
        self.epoch = 0
        self.stats: Counter = Counter()

    @staticmethod
    def supported(llm) -> bool:
        """vLLM with streaming-input sessions (v1 scheduler, resumable requests) and the per-turn
        reseed installed in the worker; speculative decoding and async scheduling keep tokens in
        flight that the held-token bookkeeping below does not model, so they turn sessions off."""
        engine = llm.llm_engine
        try:
            sched = engine.engine_core.engine_core.scheduler
            vcfg = engine.vllm_config
            if not hasattr(sched, "num_waiting_for_streaming_input") or not hasattr(sched, "kv_holding_waiting"):
                return False
            if "resumable" not in inspect.signature(engine.input_processor.process_inputs).parameters:
                return False
            if vcfg.speculative_config is not None or getattr(vcfg.scheduler_config, "async_scheduling", False):
                return False
            return all(llm.collective_rpc(install_session_reseed))
        except Exception:  # noqa: BLE001 - anything unexpected: no sessions, full prompts as before
            return False

    # -- turns ------------------------------------------------------------------------------------
    def add(self, rid: str, prompt: list[int], params, key: str, last: bool) -> str:
        """Queue one turn of session `key`; returns the request id its outputs carry (the session's
        first request id when the turn continues it, else `rid`)."""
        s = self.live.get(key)
        if s is not None and s.held is not None and s.epoch == self.epoch and len(s.held) < len(prompt) \
                and len(prompt) + params.max_tokens <= self.max_model_len and prompt[:len(s.held)] == s.held:
            req = self._process(s.rid, prompt[len(s.held):], params)
            req.request_id, req.external_req_id = s.internal, s.rid
            self._submit(req)
            self.paused.pop(key, None)
            self.stats["turns_continued"] += 1
            self.stats["prefill_tokens_reused"] += len(s.held)
            s.prompt, s.params, s.last, s.epoch, s.held = list(prompt), params, last, self.epoch, None
            return s.rid
        if s is not None:
            self.stats["diverged" if s.held is not None else "ended_stale"] += 1
            self._end(key)
        req = self._process(rid, list(prompt), params)
        self.engine.input_processor.assign_request_id(req)
        self._submit(req)
        self.live[key] = _Session(rid, req.request_id, list(prompt), params, last, self.epoch)
        self.by_rid[rid] = key
        self.stats["opened"] += 1
        return rid

    def finished(self, rid: str, stream) -> None:
        """A turn of the request `rid` ended (stream: its tokens): pause the session, or end it."""
        key = self.by_rid.get(rid)
        if key is None:
            return
        s = self.live[key]
        if s.last or s.epoch != self.epoch or stream.finish_reason not in ("stop", "length") or not stream.token_ids:
            self._end(key)
            return
        held = s.prompt + stream.token_ids[:-1]  # vLLM keeps all but the last sampled token
        req = self.sched.requests.get(s.internal)
        if req is None or req.num_computed_tokens != len(held):
            self.stats["held_mismatch"] += 1
            self._end(key)
            return
        s.held = held
        self.paused[key] = None

    def end(self, keys) -> None:
        """The episodes of these sessions are over."""
        for key in keys:
            if key in self.live:
                self._end(key)

    # -- keeping the engine free ------------------------------------------------------------------
    def evict(self) -> None:
        """Before an engine step: while new requests wait because every running slot is taken
        (paused sessions hold one each), paused sessions keep at most half of the slots; while the
        KV cache is nearly full, half of them are ended. The least recently paused go first."""
        if not self.paused:
            return
        n = 0
        if len(self.sched.waiting) and len(self.sched.running) + len(self.paused) >= self.max_active:
            n = len(self.paused) - self.max_active // 2
        if self.sched.kv_cache_manager.usage > self.PRESSURE:
            n = max(n, (len(self.paused) + 1) // 2)
        for key in list(self.paused)[:max(n, 0)]:
            self.stats["evicted"] += 1
            self._end(key)

    def release(self) -> list[tuple[str, list[int], object]]:
        """Before a control call (the weights may change): end every paused session, and abort every
        continuation that holds KV but is not running yet; these come back as (request id, full
        prompt, params) for the caller to run as fresh requests. Turns in flight then end their
        session when they finish (epoch)."""
        self.epoch += 1
        for key in list(self.paused):
            self._end(key)
        running = {r.request_id for r in self.sched.running}
        restart = []
        for key, s in list(self.live.items()):
            req = self.sched.requests.get(s.internal)
            if req is not None and req.num_computed_tokens > 0 and s.internal not in running:
                restart.append((s.rid, s.prompt, s.params))
                self.stats["restarted"] += 1
                self._end(key)
        return restart

    def clear(self) -> None:
        """The engine aborted everything (a failed step)."""
        self.live.clear()
        self.by_rid.clear()
        self.paused.clear()

    # -- vLLM plumbing ----------------------------------------------------------------------------
    def _process(self, rid: str, prompt: list[int], params):
        e = self.engine
        return e.input_processor.process_inputs(rid, {"prompt_token_ids": prompt}, params,
                                                supported_tasks=e.get_supported_tasks(), resumable=True)

    def _submit(self, req) -> None:
        """What LLMEngine.add_request does for one request. In-process, the output processor and the
        scheduler would share the prompt list, and each extends it by every later turn: give each
        its own copy."""
        out = copy.copy(req)
        out.prompt_token_ids = list(req.prompt_token_ids)
        core = copy.copy(req)
        core.prompt_token_ids = list(req.prompt_token_ids)
        self.engine.output_processor.add_request(out, None, None, 0)
        self.engine.engine_core.add_request(core)

    def _end(self, key: str) -> None:
        s = self.live.pop(key)
        self.by_rid.pop(s.rid, None)
        self.paused.pop(key, None)
        self.engine.abort_request([s.internal], internal=True)
        self.stats["ended"] += 1
