"""Episode runner: drives episodes between env pool and engine(s), keeping exact token bookkeeping.

Each episode: reset -> chat template -> token ids -> engine samples a turn (with logprobs and
policy version) -> decode -> env.step -> (multi-turn: env reply tokens appended, masked) -> ...
GRPO groups are `group_size` episodes reset with the same seed. Failed episodes are retried on a
fresh env up to `max_retries`; if still failing they are returned with `error` set (reward 0,
nothing trained on) and counted, never dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rl.trajectory import Trajectory


@dataclass
class RolloutSettings:
    group_size: int = 8
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 1
    max_context: int = 1024
    max_retries: int = 1


class EpisodeRunner:
    def __init__(self, env_pool, engines: list, tokenizer, settings: RolloutSettings):
        self.pool, self.engines, self.tok, self.s = env_pool, engines, tokenizer, settings
        self.stats: dict[str, float] = {}

    # -- token helpers --------------------------------------------------------------------
    def _prompt_ids(self, obs) -> list[int]:
        messages = [{"role": "user", "content": obs}] if isinstance(obs, str) else obs
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _env_turn_ids(self, obs, policy_ids: list[int]) -> list[int]:
        """Tokens for an env reply in the middle of an episode: close the policy's turn (its EOS
        if it stopped on its own), then the env's messages and the next assistant header, exactly
        as the chat template renders them. The policy's own tokens are never re-tokenised."""
        eos = self.tok.eos_token_id
        close = [] if policy_ids and policy_ids[-1] == eos else [eos]
        return close + self.tok.encode("\n", add_special_tokens=False) + self._prompt_ids(obs)

    def _generate(self, contexts: list[list[int]], max_tokens: list[int]):
        import ray

        n_eng = len(self.engines)
        buckets = [list(range(i, len(contexts), n_eng)) for i in range(n_eng)]
        refs = []
        for eng, idx in zip(self.engines, buckets):
            if not idx:
                refs.append(None)
                continue
            mt = max(max_tokens[i] for i in idx)
            refs.append(eng.generate.remote([contexts[i] for i in idx], 1, mt, self.s.temperature, self.s.top_p))
        out = [None] * len(contexts)
        for ref, idx in zip(refs, buckets):
            if ref is None:
                continue
            for i, group in zip(idx, ray.get(ref)):
                c = group[0]
                if len(c.token_ids) > max_tokens[i]:  # per-episode context limit
                    c.token_ids, c.logprobs, c.finish_reason = c.token_ids[: max_tokens[i]], c.logprobs[: max_tokens[i]], "length"
                out[i] = c
        return out

    # -- episodes -------------------------------------------------------------------------
    def run(self, seeds: list[int]) -> list[Trajectory]:
        """One batch: len(seeds) groups × group_size episodes."""
        t0 = time.perf_counter()
        G = self.s.group_size
        slots = list(range(len(seeds) * G))
        seed_of = [seeds[s // G] for s in slots]
        trajs: dict[int, Trajectory] = {}
        errors = retries = 0
        pending = list(slots)
        attempts = {s: 0 for s in slots}
        gen_tokens = 0
        t_gen = 0.0
        while pending:
            # reset
            resets = self.pool.reset([(s, seed_of[s]) for s in pending])
            active: dict[int, Trajectory] = {}
            failed: dict[int, str] = {}
            for s, r in zip(pending, resets):
                if "error" in r:
                    failed[s] = r["error"]
                    continue
                ids = self._prompt_ids(r["obs"])
                active[s] = Trajectory(prompt_ids=ids, group=s // G, seed=seed_of[s], info=r["info"])
            turn = 0
            while active and turn < self.s.max_turns:
                order = list(active)
                ctx_len = [len(active[s].prompt_ids) + len(active[s].response_ids) for s in order]
                room = [min(self.s.max_tokens, self.s.max_context - n) for n in ctx_len]
                for s, r in zip(order, room):
                    if r <= 0:
                        active[s].finish_reason = "context"
                ok = [(s, r) for s, r in zip(order, room) if r > 0]
                tg = time.perf_counter()
                comps = self._generate([active[s].prompt_ids + active[s].response_ids for s, _ in ok], [r for _, r in ok])
                t_gen += time.perf_counter() - tg
                for (s, _), c in zip(ok, comps):
                    active[s].add_policy_tokens(list(c.token_ids), list(c.logprobs), c.version)
                    active[s].finish_reason = c.finish_reason
                    gen_tokens += len(c.token_ids)
                acts = [(s, self.tok.decode(c.token_ids, skip_special_tokens=True)) for (s, _), c in zip(ok, comps)]
                steps = self.pool.step(acts) if acts else []
                done_now = [s for s in order if active[s].finish_reason == "context"]
                for (s, _), r in zip(acts, steps):
                    tr = active[s]
                    tr.turns += 1
                    if "error" in r:
                        failed[s] = r["error"]
                        continue
                    tr.reward += r["reward"]
                    tr.info.update(r["info"])
                    if r["terminated"] or r["truncated"]:
                        done_now.append(s)
                    elif r["obs"]:
                        tr.add_env_tokens(self._env_turn_ids(r["obs"], tr.response_ids))
                for s in done_now:
                    trajs[s] = active.pop(s)
                for s in failed:
                    active.pop(s, None)
                turn += 1
            for s, tr in active.items():  # ran out of turns
                tr.finish_reason = tr.finish_reason or "max_turns"
                trajs[s] = tr
            pending = []
            for s, err in failed.items():
                errors += 1
                attempts[s] += 1
                if attempts[s] <= self.s.max_retries:
                    retries += 1
                    pending.append(s)
                else:
                    trajs[s] = Trajectory(prompt_ids=self._fallback_prompt(), group=s // G, seed=seed_of[s],
                                          error=err, finish_reason="error")
        wall = time.perf_counter() - t0
        self.stats = {
            "env/errors": errors, "env/retries": retries,
            "env/failed_episodes": sum(t.error is not None for t in trajs.values()),
            "rollout/generated_tokens": gen_tokens, "rollout/generate_s": t_gen,
            "rollout/tokens_per_s": gen_tokens / max(t_gen, 1e-9), "rollout/wall_s": wall,
        }
        return [trajs[s] for s in slots]

    def _fallback_prompt(self) -> list[int]:
        return self._prompt_ids("")
