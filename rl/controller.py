"""The controller sequences a run's steps: rollouts (rl/batches.py) -> scoring -> advantages ->
update -> weight sync (sync/) -> metrics, in the order the training mode sets (rl/schedules.py).
Starting and placing actors is rl/cluster.py's, the run's lifecycle (signals, failures, report)
rl/run.py's."""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rl import checkpoint as ck
from rl.algorithms import compute_advantages, importance_weights
from rl.batches import BatchAssembler, Collected, shaped_rewards
from rl.cluster import RunActors, get_all
from rl.config import TrainConfig, validate
from rl.eval import Evaluator
from rl.inputs import check_inputs
from rl.logger import SAMPLES_KEY, append_env_errors
from rl.monitor import MismatchMonitor
from rl.schedules import SCHEDULES
from rl.settings import rollout_settings
from rollout.trajectory import collate
from common.errors import RunError


def info_means(trajs) -> dict[str, float]:
    """Mean of every numeric `info` value the env reported (e.g. tool_calls), as env/info/<key>."""
    keys = {k for t in trajs for k, v in t.info.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "exact"}
    return {f"env/info/{k}": statistics.mean(float(t.info.get(k, 0)) for t in trajs) for k in sorted(keys)}


def as_train_config(cfg) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg


class Controller:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, engines: list | None = None):
        """`engines`: running engine actors to use instead of starting new ones (rl/cluster.py)."""
        self.cfg = cfg = as_train_config(cfg)
        validate(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        inputs = check_inputs(cfg)  # bad inputs fail here, before Ray or any model starts
        self.policy_path, self.tokenizer, self.processor = inputs.policy_path, inputs.tokenizer, inputs.processor
        self.actors = RunActors(cfg, self.policy_path, engines)
        self.step = 0
        self.version = 0  # the learner's policy version
        self.engine_version = 0  # the version the engines hold
        self.last_checkpoint: Path | None = None  # newest checkpoint saved or resumed from
        self.wandb_run_id: str | None = None  # kept in checkpoints: a resumed run logs into the same W&B run
        self.mismatch_monitor = MismatchMonitor()
        # Held around learner updates and weight pushes in the overlapped modes, so that a restarted
        # engine's resync (from the rollout thread) gets consistent weights + version
        self.learner_lock = threading.Lock()
        self.schedule = None

    # -- setup ----------------------------------------------------------------------------
    def start(self) -> None:
        from policies.build import default_cache_dir
        from rollout.episodes import EpisodeRunner

        tmp = self.run_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        cache_root = Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()
        self.actors.start(tmp, cache_root, resync=self._resync_engine)
        self.runner = EpisodeRunner(self.actors.env_pool, self.actors.engine_pool, self.tokenizer,
                                    rollout_settings(self.cfg), processor=self.processor)
        self.batches = BatchAssembler(self.cfg, self.runner, on_errors=self._log_env_errors)
        self.evaluator = Evaluator(self.cfg, self.runner, self.run_dir)  # eval.every: held-out seeds, rl/eval.py
        self.schedule = SCHEDULES[self.cfg.trainer.mode](self)
        if self.actors.borrowed_engines:  # they hold another run's weights and version: load all of this run's
            self.sync_weights(interrupt=False, complete=True)

    @property
    def learners(self) -> list:
        return self.actors.learners

    @property
    def engines(self) -> list:
        return self.actors.engines

    # -- one step -------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One training step in the configured trainer.mode (rl/schedules.py), then an evaluation
        when one is due."""
        t0 = time.perf_counter()
        metrics = self.schedule.step()
        metrics["timing/step_s"] = time.perf_counter() - t0
        if self.evaluator.due(self.step):
            metrics.update(self.evaluate())
        self.step += 1
        return metrics

    def evaluate(self) -> dict:
        """eval/* metrics of the learner's current policy on the held-out seeds (rl/eval.py); draws
        no training seed. The engines are synced to the learner first (the next step skips its sync)."""
        t0 = time.perf_counter()
        self.schedule.before_eval()
        if self.engine_version < self.version:
            self.sync_weights(interrupt=False)
        return {**self.evaluator.run(self.step), "timing/eval_s": time.perf_counter() - t0}

    def sync_weights(self, interrupt: bool, complete: bool = False) -> dict:
        """Push the learner's weights to every engine (sync/); interrupt: in-flight requests go on
        with the new weights (partial rollouts); complete: also the weights LoRA never changes."""
        t0 = time.perf_counter()
        self.actors.engine_pool.replace_dead()  # an engine that died since the rollout is replaced (and resynced) first
        with self.learner_lock:
            stats = get_all([x.push_weights.remote(self.engines, self.version, interrupt, complete)
                             for x in self.learners])[0]
        self.engine_version = self.version
        return {**stats, "timing/sync_s": time.perf_counter() - t0}

    def _resync_engine(self, engine) -> int:
        """A restarted engine (rollout/engine_pool.py) gets the learner's current weights and adopts
        its version: in sync mode that is the version the other engines have; in the overlapped modes
        it waits for a running update and may be one version ahead of them until the next sync."""
        with self.learner_lock:
            version = self.version
            get_all([x.push_weights.remote([engine], version, False) for x in self.learners])
        return version

    def learn(self, collected: Collected) -> dict:
        """Score, compute advantages, update the policy (and critic); returns the step's metrics
        (the weight sync is the schedule's)."""
        import ray

        cfg, a, actors = self.cfg, self.cfg.algorithm, self.actors
        trajs, G = collected.batch, cfg.rollout.group_size
        rollout_stats = collected.stats
        t0 = time.perf_counter()
        rewards = shaped_rewards(cfg, trajs)
        batch = collate(trajs, self.tokenizer.pad_token_id)
        if a.mask_truncated:
            truncated = [i for i, t in enumerate(trajs) if t.finish_reason in ("length", "context")]
            batch["loss_mask"][truncated] = 0.0
            rollout_stats["response/masked_truncated"] = len(truncated)
        t1 = time.perf_counter()
        # Score the batch where the models live, in parallel: old-policy logprobs (learner ranks),
        # values (critic ranks), reference logprobs (reference actor).
        batch_ref = ray.put(batch)
        score_refs = [x.score.remote(batch_ref) for x in self.learners]
        value_refs = [c.values.remote(batch_ref) for c in actors.critic]
        ref_lp_ref = actors.ref.logprobs.remote(batch_ref) if actors.ref is not None else None
        scored = get_all(score_refs)
        old_lp, stats = torch.cat([lp for lp, _ in scored]), dict(scored[0][1])
        values = torch.cat(get_all(value_refs)) if actors.critic else None
        ref_lp = ray.get(ref_lp_ref) if ref_lp_ref is not None else None
        t_score = time.perf_counter() - t1

        adv, returns, adv_stats = compute_advantages(a, rewards, batch["loss_mask"], G, old_lp, ref_lp, values)
        # A group with an episode that failed after all retries is not trained on (its baseline
        # would be wrong; reported in env/failed_groups and env_errors.jsonl), nor is a group that
        # only pads a dynamically sampled batch.
        for g in collected.zero_groups:
            adv[g * G:(g + 1) * G] = 0.0
        batch.update(old_logprobs=old_lp, advantages=adv)
        if a.is_correction != "none":
            batch["is_weights"], is_stats = importance_weights(old_lp, batch["behaviour_logprobs"], batch["loss_mask"],
                                                               a.is_correction, a.is_cap)
            adv_stats.update(is_stats)
        if ref_lp is not None and not a.kl_in_reward:
            batch["ref_logprobs"] = ref_lp
        if actors.critic:
            batch.update(values=values, returns=returns)
        t2 = time.perf_counter()
        train_policy = self.step >= a.critic.warmup_steps or not actors.critic
        batch_ref = ray.put(batch)
        train_refs = [x.train.remote(batch_ref) for x in self.learners] if train_policy else []
        critic_refs = [c.train.remote(batch_ref) for c in actors.critic]
        if train_refs:
            stats.update(get_all(train_refs)[0])
        if critic_refs:
            stats.update(get_all(critic_refs)[0])
        t_train = time.perf_counter() - t2
        learner_version = self.version
        if train_policy:
            self.version += 1
        ok = [t for t in collected.sampled if not t.error] or collected.sampled
        metrics = self._step_metrics(trajs, ok, rewards, learner_version, train_policy)
        metrics.update({"timing/score_s": t_score, "timing/train_s": t_score + t_train, "timing/update_s": t_train,
                        "timing/learn_s": time.perf_counter() - t0, **rollout_stats, **adv_stats, **stats})
        lg = cfg.logger
        if lg.samples_every > 0 and self.step % lg.samples_every == 0:
            metrics[SAMPLES_KEY] = self._rollout_samples(ok, lg.samples_per_step)
        warning = self.mismatch_monitor.update(metrics["mismatch/kl"])
        metrics["mismatch/jump"] = int(warning is not None)
        if warning:
            print(f"[qrl] warning (step {self.step}): {warning}", flush=True)
        return metrics

    def _step_metrics(self, trajs: list, ok: list, rewards: torch.Tensor, learner_version: int,
                      train_policy: bool) -> dict:
        """Rewards over every sampled episode that did not fail (`ok`), responses and staleness over
        the trained batch (`trajs`)."""
        rewards_ok = torch.tensor([t.reward for t in ok])
        behaviour_versions = [v for t in trajs for v in t.versions if v >= 0]
        staleness = [learner_version - v for v in behaviour_versions] or [0]
        return {
            "step": self.step,
            "policy/version": self.version,
            "policy/trained": int(train_policy),
            "rollout/policy_version": max(behaviour_versions) if behaviour_versions else -1,
            "async/staleness_max": max(staleness), "async/staleness_mean": statistics.mean(staleness),
            "reward/mean": float(rewards_ok.mean()),  # over every sampled episode of the step
            "reward/std": float(rewards_ok.std()) if len(ok) > 1 else 0.0,
            "reward/max": float(rewards_ok.max()),
            "reward/train_mean": float(rewards.mean()),  # over the trained batch, after shaping
            "reward/exact_frac": statistics.mean(float(t.info.get("exact", 0)) for t in ok),
            **info_means(ok),
            "response/mean_tokens": statistics.mean(t.num_policy_tokens for t in trajs),
            "response/stop_frac": statistics.mean(t.finish_reason == "stop" for t in trajs),
            "response/truncated_frac": statistics.mean(t.finish_reason in ("length", "context") for t in trajs),
        }

    # -- checkpoints (rl/checkpoint.py) -------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """<run>/checkpoints/step_<steps done>: learner (+critic) DeepSpeed state and RNGs, the
        driver's counters (env seed position, version, monitor history) and, with checkpoint.hf,
        the policy as an HF folder. Written to a .tmp folder and renamed when complete."""
        import shutil

        c, actors = self.cfg.checkpoint, self.actors
        final = ck.step_dir(self.run_dir, self.step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self.learner_lock:  # an engine restarted by a running rollout pushes from the learners too
            get_all([x.save_checkpoint.remote(str(tmp / "learner")) for x in self.learners])
            if actors.critic:
                get_all([x.save_checkpoint.remote(str(tmp / "critic")) for x in actors.critic])
            if c.hf:
                get_all([x.save_hf.remote(str(tmp / "hf"), self.policy_path) for x in self.learners])
        torch.save(ck.rng_state(), tmp / "driver_rng.pt")
        ck.write_state(tmp, {
            "step": self.step, "version": self.version, "engine_version": self.engine_version,
            **self.batches.state(), "mismatch_history": self.mismatch_monitor.history,
            "trainer_mode": self.cfg.trainer.mode, "num_ranks": self.cfg.learner.num_ranks,
            "zero_stage": self.cfg.learner.zero_stage, "critic": bool(actors.critic), "policy_path": self.policy_path,
            "wandb_run_id": self.wandb_run_id})
        ck.finish(tmp, final)
        ck.prune(self.run_dir, c.keep_last)
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, folder: str | Path) -> dict:
        """Continue from a checkpoint: learner (+critic) state, counters and RNGs restored, then the
        engines get the restored weights (so sampling continues exactly where it stopped)."""
        folder = Path(folder)
        state = ck.read_state(folder)
        l, critic = self.cfg.learner, self.actors.critic
        if (state["num_ranks"], state["zero_stage"]) != (l.num_ranks, l.zero_stage):
            raise RunError(f"checkpoint {folder} was saved with learner.num_ranks={state['num_ranks']} "
                           f"learner.zero_stage={state['zero_stage']}; resume with the same values "
                           f"(now {l.num_ranks} / {l.zero_stage})")
        if state["critic"] != bool(critic):
            raise RunError(f"checkpoint {folder} was saved {'with' if state['critic'] else 'without'} a critic; "
                           f"resume with the algorithm it was saved with (now algorithm.advantage={self.cfg.algorithm.advantage!r})")
        get_all([x.load_checkpoint.remote(str(folder / "learner")) for x in self.learners])
        if critic:
            get_all([x.load_checkpoint.remote(str(folder / "critic")) for x in critic])
        self.step, self.version = state["step"], state["version"]
        self.batches.restore(state)
        self.mismatch_monitor.history = list(state["mismatch_history"])
        ck.set_rng_state(torch.load(folder / "driver_rng.pt", weights_only=False))
        self.sync_weights(interrupt=False)  # engines start from the initial weights: bring them to the checkpoint's
        self.last_checkpoint = folder
        return state

    def export(self, folder: str | Path) -> str:
        """An HF checkpoint folder of the current policy (weights + config + tokenizer/processor);
        LoRA runs export merged weights."""
        return get_all([x.save_hf.remote(str(folder), self.policy_path) for x in self.learners])[0]

    def _rollout_samples(self, trajs: list, n: int) -> list[dict]:
        """Up to `n` episodes of this step, one per group first (prompt, response, reward, version)."""
        by_group: dict[int, list] = {}
        for t in trajs:
            by_group.setdefault(t.group, []).append(t)
        firsts = [g[0] for g in by_group.values()]
        rest = [t for g in by_group.values() for t in g[1:]]
        dec = self.tokenizer.decode
        return [{"step": self.step, "group": t.group, "seed": t.seed, "prompt": dec(t.prompt_ids),
                 "response": dec(t.response_ids), "reward": float(t.reward), "version": t.min_version,
                 "finish_reason": t.finish_reason, "turns": t.turns} for t in (firsts + rest)[:n]]

    def _log_env_errors(self, errors: list) -> None:
        """Every env failure of this step (also the retried ones) goes to env_errors.jsonl."""
        append_env_errors(self.run_dir, self.step, errors)

    def close(self) -> None:
        if self.schedule is not None:
            self.schedule.close()
        self.actors.close()
