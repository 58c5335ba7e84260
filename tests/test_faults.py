"""Fault injection into a real run: env raises, hangs (soft and hard), and its actor process dies.
Every episode is accounted for: retried on a fresh env, counted, and, when retries run out, its group
is reported and left out of the update."""
import json

from tests.test_e2e import run_cli


def test_faults_are_retried_counted_and_no_episode_is_lost(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = "{0:raise,1:hang,2:die,3:hang_hard,4:always_raise}"
    _, metrics = run_cli(
        tmp_path, "steps=1", "logger=console", "~env", "env._target_=tests.helpers.bad_envs:FaultInjectionEnv",
        f"+env.kwargs.marker_dir={markers}", f"+env.kwargs.faults={faults}", "env.step_timeout_s=2",
        "env.call_timeout_s=3", "env.num_actors=2", "rollout.prompts_per_step=6", "rollout.group_size=4",
        "learner.micro_batch_size=8", "rollout.max_retries=3")
    (m,) = metrics
    assert m["rollout/episodes"] == 24  # every episode came back
    # seed 4 fails on every attempt: its 4 episodes are reported as one failed group
    assert m["env/failed_episodes"] == 4 and m["env/failed_groups"] == 1
    # each one-off fault cost at least one retry; the dead actor and the hard-hung one were replaced
    assert m["env/actor_restarts"] >= 2
    assert m["env/retries"] >= 4 * 3 + 4 and m["env/errors"] >= m["env/retries"]
    errors = [json.loads(l)["error"] for l in (tmp_path / "run" / "env_errors.jsonl").read_text().splitlines()]
    text = "\n".join(errors)
    assert "injected failure for seed 0" in text
    assert "timed out after 2.0s" in text  # the soft hang, interrupted inside the actor
    assert "did not answer within" in text  # the hard hang: actor replaced
    assert "ActorDiedError" in text or "RayActorError" in text or "died" in text  # the dead actor
    assert "seed 4 always fails" in text
    assert sorted(p.name for p in markers.iterdir()) == ["die-2", "hang-1", "hang_hard-3", "raise-0"]
