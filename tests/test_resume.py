"""Checkpoints and resume: an interrupted (Ctrl-C) and resumed run repeats the uninterrupted one
exactly (fp32 learner on CPU); a learner rank that dies stops the run naming the last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, short_tmp

SMALL = ["logger=console", "logger.progress=false", "rollout.prompts_per_step=8", "rollout.group_size=4",
         "learner.micro_batch_size=32", "export_final=false", "steps=6"]
# wall-clock and throughput figures differ between any two runs; everything else must be equal
NOT_COMPARED = ("timing/", "sync/", "rollout/tokens_per_s", "rollout/wall_s")


def cli(tmp_path, cache_dir, run, *overrides):
    cmd = [sys.executable, "-m", "rl.train", f"cache_dir={cache_dir}", f"ray.temp_dir={short_tmp()}",
           *overrides] + ([f"run_dir={run}"] if run else [])
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


def hf_weights(checkpoint):
    return load_file(str(checkpoint / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, cache_dir, train, capsys):
    """The uninterrupted run and the resumed one run in-process on a warm engine (conftest `train`),
    the interrupted one through the CLI on a fresh engine (a real SIGINT to its process group): equal
    metrics also show that a borrowed engine samples exactly what a fresh one does."""
    from rl.train import resume_args

    once, split = tmp_path / "once", tmp_path / "split"
    train(*SMALL, "checkpoint.every=2", "checkpoint.keep_last=2", run_dir=once)
    assert sorted(p.name for p in (once / "checkpoints").iterdir()) == ["step_000004", "step_000006"]  # keep_last

    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once 2 steps are logged
    proc = cli(tmp_path, cache_dir, split, *SMALL, "checkpoint.every=0")
    metrics = split / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 128 + signal.SIGINT, err[-3000:]
    [ckpt] = list((split / "checkpoints").iterdir())
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped_at < 6 and ckpt.name == f"step_{stopped_at:06d}" and (ckpt / "COMPLETE").is_file()
    assert f"checkpoint: {ckpt}" in err and f"resume={split}" in err, err[-2000:]
    assert len(rows(split)) == stopped_at

    # resume from the run folder as `python -m rl.train resume=<run>` does: the run's own overrides
    # (its overrides.json, written by the CLI) re-applied (steps=6 etc.), the checkpoint resolved
    capsys.readouterr()
    args = resume_args([f"resume={split}"])
    assert f"run_dir={split.resolve()}" in args and f"resume={ckpt.resolve()}" in args and "steps=6" in args
    train(*args, run_dir=split)
    assert f"resumed from {ckpt.resolve()} (step {stopped_at}, policy version {stopped_at})" in capsys.readouterr().out
    a, b = rows(once), rows(split)
    assert [r["step"] for r in b] == list(range(6))  # no step logged twice, none missing
    for ra, rb in zip(a, b):
        assert comparable(ra) == comparable(rb), (ra["step"], {k: (v, rb.get(k)) for k, v in comparable(ra).items()
                                                               if rb.get(k) != v})
    wa, wb = hf_weights(once / "checkpoints" / "step_000006"), hf_weights(split / "checkpoints" / "step_000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the weights did move: a resume that silently restarted from the initial policy would differ
    w0 = hf_weights(ckpt)
    assert any(not torch.equal(w0[k], wb[k]) for k in wb)


def test_learner_rank_death_stops_the_run_naming_the_last_checkpoint(tmp_path, train):
    """Rank 1 of 2 (ZeRO-2) is SIGKILLed after step 2; rank 0 then waits in a collective that never
    completes: the run must stop at once with the dead rank and the checkpoint to resume from."""
    import ray

    from common.errors import RunError

    run = tmp_path / "run"
    killed = {}

    def kill_rank_1(ctl, metrics):
        if ctl.step == 2:
            killed["learners"] = list(ctl.learners)
            killed["pid"] = ray.get(ctl.learners[1].pid.remote())
            os.kill(killed["pid"], signal.SIGKILL)

    with pytest.raises(RunError) as err:
        train(*SMALL, "learner.num_ranks=2", "learner.num_cpus_per_rank=0.25", "checkpoint.every=2", "checkpoint.hf=false",
              "eval.every=0", run_dir=run, on_step=kill_rank_1)
    msg = str(err.value)
    assert killed and "learner rank 1 died during step 2" in msg, msg
    assert f"Last checkpoint: {(run / 'checkpoints' / 'step_000002').resolve()}" in msg, msg
    assert f"python -m rl.train resume={run.resolve()}" in msg, msg
    assert [r["step"] for r in rows(run)] == [0, 1]  # nothing logged for the failed step
    assert (run / "report.md").is_file()  # the report of the steps that finished is still written
    with pytest.raises(ray.exceptions.RayActorError):  # the live rank was stopped too (not left hanging)
        ray.get(killed["learners"][0].get_version.remote(), timeout=60)


def _fake_checkpoint(run, step, complete=True):
    from rl import checkpoint as ck

    d = ck.step_dir(run, step)
    d.mkdir(parents=True)
    ck.write_state(d, {"step": step})
    if complete:
        (d / ck.MARKER).write_text("ok\n")
    return d


def test_checkpoint_folders_resolve_prune_and_truncate(tmp_path, monkeypatch):
    """Which checkpoint resume= picks (half-written ones never), keep-last-K, and the log rows dropped."""
    from rl import checkpoint as ck
    from rl.train import resume_args

    run = tmp_path / "outputs" / "day" / "run1"
    for step in (2, 4, 6):
        _fake_checkpoint(run, step)
    half = _fake_checkpoint(run, 8, complete=False)  # a crash while saving step 8
    tmp_save = ck.step_dir(run, 10).with_name("step_000010.tmp")
    tmp_save.mkdir()
    assert ck.resolve_resume(str(run)) == ck.step_dir(run, 6)
    assert ck.resolve_resume(str(ck.step_dir(run, 4))) == ck.step_dir(run, 4)
    monkeypatch.chdir(tmp_path)
    assert ck.resolve_resume("latest") == ck.step_dir(run, 6)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.resolve_resume(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ck.resolve_resume(str(tmp_path / "nope"))
    removed = ck.prune(run, keep_last=2)
    assert set(removed) == {ck.step_dir(run, 2), tmp_save}
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000004", "step_000006"] and half.is_dir()

    log = run / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(9)))
    assert ck.truncate_jsonl(log, 6) == 3 and [r["step"] for r in rows(run)] == list(range(6))

    (run / "overrides.json").write_text(json.dumps(["steps=6", "env=countdown", f"run_dir={run}"]))
    args = resume_args([f"resume={run}", "steps=10"])
    assert args == ["env=countdown", "steps=10", f"run_dir={run.resolve()}", f"resume={ck.step_dir(run, 6).resolve()}"]
