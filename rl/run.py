"""A run's lifecycle around the controller: resume, logging, checkpoints on schedule and on Ctrl-C /
SIGTERM, the failure message when an actor dies, and the report that is written whatever happens."""
from __future__ import annotations

import signal
import threading
from dataclasses import asdict
from pathlib import Path

from common.errors import RunError
from rl import checkpoint as ck
from rl.controller import Controller, as_train_config
from rl.logger import RunLogger


class RunInterrupted(RunError):
    """Ctrl-C / SIGTERM: the run stopped after a step and saved a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Ctrl-C / SIGTERM set a flag (the current step finishes, a checkpoint is saved, the run
    stops); a second Ctrl-C aborts at once."""

    def __init__(self, enabled: bool):
        self.signum = None
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[qrl] {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again aborts without one)", flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def resume_hint(ctl: Controller, run_dir: Path) -> str:
    last = ctl.last_checkpoint
    if last is None:
        return (f"No checkpoint was written before it (checkpoint.every={ctl.cfg.checkpoint.every}); "
                "a new run starts from scratch")
    return f"Last checkpoint: {Path(last).resolve()}; continue with: python -m rl.train resume={run_dir.resolve()}"


def write_report(run_dir: Path) -> None:
    """report.png + report.md of whatever steps finished (also after a failure); never masks an error."""
    from rl.report import write_report as draw

    try:
        png, _ = draw(run_dir)
        print(f"[qrl] report: {png.resolve()}", flush=True)
    except Exception as e:  # noqa: BLE001 - a missing plot must not hide the run's own outcome
        print(f"[qrl] no report written ({type(e).__name__}: {e}); later: python -m rl.report {run_dir}", flush=True)


def run_training(cfg, run_dir: str | Path, on_step=None, engines: list | None = None) -> Path:
    """Full run (or the rest of one, with `resume`): returns the path of metrics.jsonl.
    `on_step(controller, metrics)` is called after every logged step. `engines`: running engine
    actors of this policy and rollout config to use (and leave running) instead of new ones."""
    import ray

    cfg = as_train_config(cfg)
    run_dir = Path(run_dir)
    resume_from = ck.resolve_resume(cfg.resume) if cfg.resume else None  # a bad path fails before anything starts
    ctl = Controller(cfg, run_dir, engines)
    state = ck.read_state(resume_from) if resume_from else {}
    first = state.get("step", 0)
    if resume_from:  # steps logged after the checkpoint are run again: drop their rows
        for name in ("metrics.jsonl", "samples.jsonl", "env_errors.jsonl"):
            ck.truncate_jsonl(run_dir / name, first)
    lg = cfg.logger
    logger = RunLogger(run_dir, lg.backend, lg.project, lg.run_name, lg.mode, config=asdict(cfg), total_steps=cfg.steps,
                       progress=lg.progress, initial_step=first, wandb_id=state.get("wandb_run_id"))
    ctl.wandb_run_id = logger.run_id
    print(f"[qrl] run folder: {run_dir.resolve()}  metrics: {logger.metrics_path.resolve()}", flush=True)
    stop = StopRequest(cfg.checkpoint.on_interrupt)
    every = cfg.checkpoint.every
    try:
        ctl.start()
        if resume_from:
            ctl.load_checkpoint(resume_from)
            print(f"[qrl] resumed from {resume_from.resolve()} (step {ctl.step}, policy version {ctl.version})",
                  flush=True)
        logger.start_progress()
        while ctl.step < cfg.steps:
            metrics = ctl.train_step()
            logger.log(metrics)
            if stop.signum is not None:
                path = ctl.save_checkpoint()
                raise RunInterrupted(f"stopped by {signal.Signals(stop.signum).name} after step {ctl.step}; "
                                     f"checkpoint: {path.resolve()}; continue with: "
                                     f"python -m rl.train resume={run_dir.resolve()}", stop.signum)
            if every and ctl.step % every == 0 and ctl.step < cfg.steps:
                print(f"[qrl] checkpoint: {ctl.save_checkpoint().resolve()}", flush=True)
            if on_step is not None:
                on_step(ctl, metrics)
        saved = ctl.last_checkpoint is not None and ctl.last_checkpoint.resolve() == ck.step_dir(run_dir, ctl.step).resolve()
        if cfg.checkpoint.at_end and not saved:
            print(f"[qrl] checkpoint: {ctl.save_checkpoint().resolve()}", flush=True)
        if cfg.export_final:
            print(f"[qrl] final checkpoint: {ctl.export(run_dir / 'final')}", flush=True)
    except ray.exceptions.RayActorError as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RunError(f"{ctl.actors.role_of(getattr(e, 'actor_id', None))} died during step {ctl.step} ({cause}); "
                       f"the run stopped. {resume_hint(ctl, run_dir)}") from e
    finally:
        stop.restore()
        logger.close()
        ctl.close()
        write_report(run_dir)
    print(f"[qrl] done; metrics written to {logger.metrics_path.resolve()}", flush=True)
    return logger.metrics_path
