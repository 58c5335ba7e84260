"""Multi-turn engine sessions' bookkeeping (rollout/sessions.py) against a stand-in for vLLM's
LLMEngine: when a turn continues its session and what it sends, when a session ends, what is given
back before a weight load, and when paused sessions make room. The real engine: tests/test_multiturn.py."""
from types import SimpleNamespace

from rollout.engine import _Stream
from rollout.sessions import EngineSessions


class FakeEngine:
    def __init__(self, max_active: int = 8, max_model_len: int = 512):
        self.sched = SimpleNamespace(requests={}, waiting=[], running=[], max_num_running_reqs=max_active,
                                     kv_cache_manager=SimpleNamespace(usage=0.0))
        self.engine_core = SimpleNamespace(engine_core=SimpleNamespace(scheduler=self.sched),
                                           add_request=self._core_add)
        self.model_config = SimpleNamespace(max_model_len=max_model_len)
        self.input_processor = SimpleNamespace(process_inputs=self._process, assign_request_id=self._assign)
        self.output_processor = SimpleNamespace(add_request=lambda *a: None)
        self.submitted, self.aborted = [], []

    def get_supported_tasks(self):
        return ("generate",)

    @staticmethod
    def _process(rid, prompt, params, supported_tasks, resumable):
        assert resumable
        return SimpleNamespace(request_id=rid, external_req_id=None, prompt_token_ids=list(prompt["prompt_token_ids"]))

    @staticmethod
    def _assign(req):
        req.external_req_id, req.request_id = req.request_id, req.request_id + "-int"

    def _core_add(self, req):
        self.submitted.append((req.request_id, list(req.prompt_token_ids)))
        self.sched.requests.setdefault(req.request_id, SimpleNamespace(request_id=req.request_id, num_computed_tokens=0))

    def abort_request(self, ids, internal=False):
        assert internal
        self.aborted += ids
        for i in ids:
            self.sched.requests.pop(i, None)

    def computed(self, internal: str, n: int):
        """What the scheduler reports after a turn: the tokens it computed (and keeps)."""
        self.sched.requests[internal].num_computed_tokens = n


def params(max_tokens: int = 4):
    return SimpleNamespace(max_tokens=max_tokens)


def stream(ids, reason="length"):
    return _Stream(token_ids=list(ids), logprobs=[0.0] * len(ids), versions=[0] * len(ids), finish_reason=reason)


def play_turn(e, s, rid, prompt, out, key="a", last=False):
    rid = s.add(rid, prompt, params(), key, last)
    internal = s.live[key].internal if key in s.live else None
    if internal:
        e.computed(internal, len(prompt) + len(out) - 1)
    s.finished(rid, stream(out))
    return rid


def test_a_turn_that_extends_the_conversation_sends_only_its_new_tokens():
    e = FakeEngine()
    s = EngineSessions(e)
    prompt, out = list(range(10)), [50, 51, 52, 53]
    rid = play_turn(e, s, "0", prompt, out)
    assert s.live["a"].held == prompt + out[:-1] and list(s.paused) == ["a"]
    nxt = prompt + out + [1, 60, 61]  # EOS-less turn closed, env reply
    assert s.add("1", nxt, params(), "a", False) == rid  # outputs keep arriving under the first id
    assert e.submitted[-1] == ("0-int", [53, 1, 60, 61])  # the last sampled token (never fed back) onwards
    assert not s.paused and s.stats["turns_continued"] == 1 and s.stats["prefill_tokens_reused"] == 13
    s.end(["a"])
    assert e.aborted == ["0-int"] and not s.live


def test_sessions_end_on_divergence_last_turn_odd_stops_and_unexpected_state():
    e = FakeEngine()
    s = EngineSessions(e)
    play_turn(e, s, "0", list(range(10)), [50, 51])
    s.add("1", [9] * 20, params(), "a", False)  # does not extend what the engine holds: fresh request
    assert e.aborted == ["0-int"] and e.submitted[-1] == ("1-int", [9] * 20) and s.stats["diverged"] == 1
    e.computed("1-int", 21)
    s.finished("1", stream([7, 8]))
    s.add("2", [9] * 20 + [7, 8, 3], params(max_tokens=500), "a", False)  # past max_model_len: fresh
    assert e.submitted[-1] == ("2-int", [9] * 20 + [7, 8, 3])
    play_turn(e, s, "3", list(range(5)), [1, 2], key="b", last=True)  # no turn follows
    assert "b" not in s.live
    s.add("4", list(range(5)), params(), "c", False)
    s.finished("4", stream([1, 2], reason="abort"))
    assert "c" not in s.live
    s.add("5", list(range(5)), params(), "d", False)
    e.computed("5-int", 3)  # not the 5 + 2 - 1 tokens a paused request keeps
    s.finished("5", stream([1, 2]))
    assert "d" not in s.live and s.stats["held_mismatch"] == 1


def test_release_before_a_weight_load():
    e = FakeEngine()
    s = EngineSessions(e)
    play_turn(e, s, "0", list(range(10)), [50, 51], key="paused")
    play_turn(e, s, "1", list(range(10)), [50, 51], key="queued")
    play_turn(e, s, "2", list(range(10)), [50, 51], key="running")
    s.add("3", list(range(10)) + [50, 51, 1, 2], params(), "queued", False)  # holds KV, not scheduled yet
    s.add("4", list(range(10)) + [50, 51, 1, 2], params(), "running", False)
    e.sched.running = [e.sched.requests["2-int"]]
    restart = s.release()
    # the paused session is ended; the queued continuation comes back to run afresh over its full prompt
    assert [(rid, prompt) for rid, prompt, _ in restart] == [("1", list(range(10)) + [50, 51, 1, 2])]
    assert set(e.aborted) == {"0-int", "1-int"} and set(s.live) == {"running"}
    # the running turn (recomputed by vLLM's reset) finishes after the load: its session ends
    e.computed("2-int", 15)
    s.finished("2", stream([7, 8]))
    assert not s.live and "2-int" in e.aborted


def test_paused_sessions_make_room():
    e = FakeEngine(max_active=8)
    s = EngineSessions(e)
    for i in range(6):
        play_turn(e, s, str(i), list(range(10)), [50, 51], key=f"k{i}")
    e.sched.waiting = ["new"]  # waiting for the token budget, slots free (6 paused + 0 running < 8)
    s.evict()
    assert len(s.paused) == 6
    e.sched.running = [object(), object()]  # every slot taken: paused keep at most half of them
    s.evict()
    assert list(s.paused) == ["k2", "k3", "k4", "k5"] and s.stats["evicted"] == 2  # oldest first
    e.sched.waiting, e.sched.running = [], []
    e.sched.kv_cache_manager.usage = 0.95  # KV nearly full: half of the paused ones go
    s.evict()
    assert list(s.paused) == ["k4", "k5"]
