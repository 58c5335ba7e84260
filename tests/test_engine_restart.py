"""Fault injection into a real in-process run: the vLLM engine actor's process is SIGKILLed while a
rollout is in flight. The engine is replaced once (16 concurrent failed requests, one restart),
brought to the learner's weights and version, and every episode whose request failed is retried
from reset without using the env retry budget; a death past rollout.max_engine_restarts stops
the run with a RunError."""
import asyncio
import os
import signal

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, short_tmp


def kill_engine_at_first_request(ctl) -> int:
    """SIGKILL engine 0's process right after the next rollout's first engine request is sent
    (envs reset, episodes in flight). Returns the killed pid."""
    import ray

    client = ctl.runner.engine
    pid = ray.get(ctl.engines[0].__ray_call__.remote(lambda engine: os.getpid()))
    send = client.generate

    async def generate(*args, **kwargs):
        client.generate = send  # only the first request
        request = asyncio.ensure_future(send(*args, **kwargs))
        await asyncio.sleep(0)  # submitted to the engine
        os.kill(pid, signal.SIGKILL)
        return await request

    client.generate = generate
    return pid


@pytest.mark.slow
def test_killed_engine_is_restarted_resynced_and_its_episodes_retried(cache_dir, tmp_path, monkeypatch):
    import ray

    from common.errors import RunError
    from rl.controller import Controller
    from rl.cli import compose

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # Ray workers import this checkout
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # fp32 Qwen3 on both sides: engine == learner to ~1e-7 nats, so an engine left on the initial
    # weights after the restart would show as a large mismatch once lr has moved the policy
    cfg = OmegaConf.to_object(compose([
        "logger=console", "policy=tiny_qwen3", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "learner.micro_batch_size=16", "learner.lr=0.05", "rollout.max_engine_restarts=1", "export_final=false",
        "ray.address=local", f"ray.temp_dir={short_tmp()}", f"cache_dir={cache_dir}"]))
    ctl = Controller(cfg, tmp_path / "run")
    try:
        ctl.start()
        m0 = ctl.train_step()
        assert m0["rollout/engine_restarts"] == 0 and m0["rollout/engine_retried_episodes"] == 0

        old_pid = kill_engine_at_first_request(ctl)
        m1 = ctl.train_step()
        print({k: m1[k] for k in ("rollout/engine_restarts", "rollout/engine_retried_episodes", "env/retries",
                                  "mismatch/kl", "mismatch/max_abs_logprob_diff")}, "before the kill:",
              m0["mismatch/kl"], m0["mismatch/max_abs_logprob_diff"])
        assert m1["rollout/episodes"] == 16 and m1["env/failed_episodes"] == 0  # nothing lost
        assert m1["rollout/engine_restarts"] == 1  # 16 concurrent failures, one restart
        assert m1["rollout/engine_retried_episodes"] > 0 and m1["env/retries"] == 0  # env budget untouched
        (restart,) = ctl.actors.engine_pool.history
        assert restart["engine"] == 0 and "ActorDiedError" in restart["error"]
        assert restart["version"] == m0["policy/version"] == 1  # adopted the learner's version
        # step 1 was sampled from the learner's version-1 weights, not the initial ones (lr moved them)
        assert m1["mismatch/kl"] < max(10 * m0["mismatch/kl"], 1e-5), (m0["mismatch/kl"], m1["mismatch/kl"])
        assert m1["mismatch/max_abs_logprob_diff"] < 1e-3
        assert m1["async/staleness_max"] == 0  # ... and every token is tagged version 1
        assert not ctl.actors.engine_pool.replace(0, 0, "late failure of the old engine")  # that death is handled
        assert ctl.actors.engine_pool.restarts == 1
        new_pid = ray.get(ctl.engines[0].__ray_call__.remote(lambda engine: os.getpid()))
        assert new_pid != old_pid and ctl.runner.engine.engines is ctl.engines  # one shared list
        # the sync after step 1 went to the new engine
        assert ray.get(ctl.engines[0].get_version.remote()) == ray.get(ctl.learners[0].get_version.remote()) == 2

        kill_engine_at_first_request(ctl)  # a second death: past rollout.max_engine_restarts=1
        with pytest.raises(RunError, match=r"vLLM engine 0 died \(ActorDiedError.*max_engine_restarts=1 and 1 restart"):
            ctl.train_step()
    finally:
        ctl.close()


def test_one_replacement_per_engine_death_and_a_clear_stop():
    """EnginePool's bookkeeping alone (no actor is touched on these paths): concurrent failures of
    one engine generation share one replacement attempt, a failure of an already replaced
    generation is a no-op, and an engine that may not be restarted stops the run naming why."""
    from common.errors import RunError
    from rollout.engine_pool import EnginePool

    pool = EnginePool(["engine 0", "engine 1"], cannot_restart="learner.sync_transport=broadcast (...)")
    pool.generation[1] = 1  # engine 1 was replaced once already
    assert not pool.replace(1, 0, "late failure of the old engine 1")

    async def fail_together():
        return await asyncio.gather(*[pool.replace_async(0, 0, "ActorDiedError: boom") for _ in range(8)],
                                    return_exceptions=True)

    errors = asyncio.run(fail_together())
    assert len(pool._replacing) == 1  # one attempt for the 8 failures
    assert all(isinstance(e, RunError) for e in errors) and len({id(e) for e in errors}) == 1
    assert str(errors[0]).startswith("vLLM engine 0 died (ActorDiedError: boom) and is not restarted: "
                                     "learner.sync_transport=broadcast")
    assert pool.restarts == 0 and pool.engines == ["engine 0", "engine 1"]
