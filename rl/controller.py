"""The controller: one driver loop wiring env pool -> engines -> learner ranks -> weight sync -> logs."""
from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common.errors import RunError
from rl.algorithms import NEEDS_CRITIC, compute_advantages, groups_with_signal, importance_weights, overlong_penalty
from rl.config import TrainConfig, validate
from rl.critic import Critic
from rl.eval import Evaluator
from rl.learner import AlgoSettings, Learner, LearnerSettings
from rl.logger import SAMPLES_KEY, RunLogger, append_env_errors
from rl.monitor import MismatchMonitor
from rl.reference import ReferencePolicy
from rollout.trajectory import collate, group_staleness


def _rendezvous() -> tuple[str, int]:
    """(IP, free port) of the node this runs on: where learner rank 0 hosts torch.distributed."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def cluster_address(setting: str | None) -> str | None:
    """Where to run: None starts a local Ray instance. `ray.address=null` joins the cluster found
    through RAY_ADDRESS or a previous `ray start` on this machine, if any."""
    if setting == "local":
        return None
    if setting:
        return setting
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - no cluster found: start a local one
        return None
    return found if found and _reachable(found) else None  # a stale address file is ignored


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def start_ray(cfg, tmp: Path, cache_root: Path) -> bool:
    """Join or start Ray (see cluster_address) with the workers' environment; False if Ray was
    already initialised (then the caller does not own it)."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda"),
                "RAY_DEDUP_LOGS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor"), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    address = cluster_address(cfg.ray.address)
    if address:  # join a running cluster: its nodes bring their own CPUs and temp dirs
        env_vars = {k: v for k, v in env_vars.items() if k not in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                 logging_level="WARNING")
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 _temp_dir=cfg.ray.temp_dir, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                 logging_level="WARNING")
    return True


def env_pool_for(e):
    """The env pool of an `env` config (EnvConfig)."""
    from rollout.env_pool import EnvPool

    return EnvPool(e.name, e._target_, e.kwargs, num_actors=e.num_actors, envs_per_actor=e.envs_per_actor,
                   num_cpus_per_actor=e.num_cpus_per_actor, step_timeout_s=e.step_timeout_s,
                   call_timeout_s=e.call_timeout_s, placement=e.placement)


def engine_config(cfg, model: str, index: int):
    """The EngineConfig of engine `index` serving `model` under cfg.rollout / cfg.policy."""
    from rollout.engine import EngineConfig

    r = cfg.rollout
    return EngineConfig(model=model, dtype=cfg.policy.engine_dtype, seed=cfg.seed + index,
                        max_model_len=r.max_model_len, kv_cache_memory_mb=r.kv_cache_memory_mb,
                        enforce_eager=r.enforce_eager, enable_prefix_caching=r.enable_prefix_caching,
                        backend=r.engine_backend, cpus=r.engine_cpus, extra=r.extra)


def info_means(trajs) -> dict[str, float]:
    """Mean of every numeric `info` value the env reported (e.g. tool_calls), as env/info/<key>."""
    keys = {k for t in trajs for k, v in t.info.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "exact"}
    return {f"env/info/{k}": statistics.mean(float(t.info.get(k, 0)) for t in trajs) for k in sorted(keys)}


def _as_dataclass(cfg) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    obj = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    return obj


class Controller:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path):
        self.cfg = cfg = _as_dataclass(cfg)
        validate(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from envs.registry import make_env, resolve_env_class
        from policies.build import load_processor, load_tokenizer, resolve_policy_path
        from policies.presets import check_checkpoint_shape

        # Fail fast on bad inputs, before Ray or any model starts.
        self.env_cls = resolve_env_class(cfg.env.name, cfg.env._target_)
        probe = make_env(cfg.env.name, cfg.env._target_, cfg.env.kwargs)  # bad env.kwargs / missing files
        getattr(probe, "close", lambda: None)()
        self.policy_path = resolve_policy_path(cfg.policy.path, asdict(cfg.policy.tiny), cfg.cache_dir)
        if cfg.algorithm.critic.path and cfg.algorithm.advantage in NEEDS_CRITIC:
            resolve_policy_path(cfg.algorithm.critic.path, {}, cfg.cache_dir, key="algorithm.critic.path")
        check_checkpoint_shape(self.policy_path, cfg.policy.shape)  # qwen3_5_* presets vs the folder's config.json
        self.tokenizer = load_tokenizer(self.policy_path)
        self.processor = load_processor(self.policy_path)  # vision-language policies only (else None)
        if cfg.learner.lora.rank > 0:  # bad learner.lora.target_modules fail here, not in a Ray actor
            from policies.lora import check_targets

            check_targets(self.policy_path, cfg.learner.lora.target_modules)
        self.step = 0
        self.version = 0
        self.prompts_drawn = 0  # env seeds used so far (dynamic sampling draws extra prompts)
        self.critic: list = []
        self.ref = None
        self.last_checkpoint: Path | None = None  # newest checkpoint saved or resumed from
        self.wandb_run_id: str | None = None  # kept in checkpoints: a resumed run logs into the same W&B run
        self.placement_groups: list = []
        self.engine_version = 0
        self.mismatch_monitor = MismatchMonitor()
        self._pending = None  # one_step_off: the next batch's rollout, running
        self._streaming = False  # async: the producer runs
        self._replaced_groups = 0
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        # Held around learner updates and weight pushes in the overlapped modes, so that a restarted
        # engine's resync (from the rollout thread) gets consistent weights + version
        self._learner_lock = threading.Lock()
        self._started = False

    def _cache_root(self) -> Path:
        from policies.build import default_cache_dir

        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()

    # -- setup ----------------------------------------------------------------------------
    def start(self) -> None:
        import ray

        cfg = self.cfg
        tmp = self.run_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        self._owns_ray = start_ray(cfg, tmp, self._cache_root())
        from rollout.engine import engine_actor
        from rollout.engine_pool import EnginePool
        from rollout.episodes import EpisodeRunner, RolloutSettings

        r, e = cfg.rollout, cfg.env
        try:
            self.env_pool = env_pool_for(e)
        except TimeoutError as err:
            raise RunError(str(err)) from err
        eng_cls = engine_actor(r.engine_num_cpus)
        no_restart = ("learner.sync_transport=broadcast (its transfer group includes the dead engine's worker); "
                      "use learner.sync_transport=object_store to let engines restart"
                      if cfg.learner.sync_transport == "broadcast" else None)
        self.engine_pool = EnginePool.start(eng_cls, [
            engine_config(cfg, self.policy_path, i) for i in range(r.num_engines)
        ], resync=self._resync_engine, max_restarts=r.max_engine_restarts, cannot_restart=no_restart)
        self.engines = self.engine_pool.engines  # one list, shared with the episode runner; replaced in place
        l, a = cfg.learner, cfg.algorithm
        ls = LearnerSettings(zero_stage=l.zero_stage, dtype=l.dtype, lr=l.lr, weight_decay=l.weight_decay,
                             grad_clip=l.grad_clip, micro_batch_size=l.micro_batch_size, mini_batches=l.mini_batches,
                             logprob_chunk_tokens=l.logprob_chunk_tokens, packing=l.packing, gradient_checkpointing=l.gradient_checkpointing,
                             kernels=l.kernels, fused_logprobs=l.fused_logprobs, fused_optimizer=l.fused_optimizer,
                             keep_head_logits=l.keep_head_logits,
                             num_threads=l.num_threads, cpus=l.cpus, seed=cfg.seed, ds_extra=l.ds_extra,
                             lora=l.lora)
        algo = AlgoSettings(policy_loss=a.policy_loss, clip_low=a.clip_low, clip_high=a.clip_high,
                            loss_agg=a.loss_agg, loss_norm_tokens=self.loss_norm_tokens,
                            kl_coef=0.0 if a.kl_in_reward else a.kl_coef, kl_estimator=a.kl_estimator,
                            entropy_coef=a.entropy_coef)
        B = r.prompts_per_step * r.group_size
        self.learners = self._ranks(Learner, "learner", l.num_cpus_per_rank,
                                    lambda rank, addr, port: (self.policy_path, ls, algo, rank, l.num_ranks, addr, port, B))
        waits = [x.get_version.remote() for x in self.learners]
        if a.advantage in NEEDS_CRITIC:  # PPO: a value model on its own DeepSpeed ranks
            from policies.build import resolve_policy_path

            c = a.critic
            critic_path = resolve_policy_path(c.path, {}, cfg.cache_dir) if c.path else self.policy_path
            cs = dataclasses.replace(ls, lr=c.lr, seed=cfg.seed + 1)
            self.critic = self._ranks(Critic, "critic", c.num_cpus_per_rank,
                                      lambda rank, addr, port: (critic_path, cs, c.value_clip, rank, l.num_ranks, addr, port, B))
            waits += [x.ready.remote() for x in self.critic]
        if a.kl_coef > 0:  # the frozen reference policy, only when KL is used at all
            self.ref = ray.remote(num_cpus=a.ref_num_cpus, max_restarts=0, max_task_retries=0)(ReferencePolicy).remote(
                self.policy_path, l.dtype, l.micro_batch_size, l.logprob_chunk_tokens, l.num_threads)
            waits.append(self.ref.ready.remote())
        ray.get([e.ready.remote() for e in self.engines] + waits)
        if l.sync_transport == "broadcast":
            ray.get([x.init_transfer.remote(self.engines) for x in self.learners])
        self.runner = EpisodeRunner(self.env_pool, self.engine_pool, self.tokenizer, RolloutSettings(
            group_size=r.group_size, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
            max_turns=r.max_turns, max_context=r.max_model_len, max_retries=r.max_retries,
            max_inflight=r.max_inflight), processor=self.processor)
        self.evaluator = Evaluator(cfg, self.runner, self.run_dir)  # eval.every: held-out seeds, rl/eval.py
        self._started = True

    def _ranks(self, cls, role: str, num_cpus: float, args) -> list:
        """`learner.num_ranks` actors of `cls` in their own PACK placement group, with their
        torch.distributed rendezvous on rank 0's node (a port free there): 127.0.0.1 and a
        driver-side port are wrong once the ranks (or the driver) sit on different nodes."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = self.cfg.learner.num_ranks
        pg = placement_group([{"CPU": max(num_cpus, 0.01)}] * n, strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=self.cfg.env.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RunError(
                f"the cluster cannot place {n} {role} rank(s) of {num_cpus} CPUs each next to the rest of the run "
                f"(free now: {ray.available_resources().get('CPU', 0):.2f} CPUs); lower learner.num_cpus_per_rank / "
                "algorithm.critic.num_cpus_per_rank / rollout.engine_num_cpus, or give Ray more CPUs (ray.num_cpus)"
            ) from None
        self.placement_groups.append(pg)

        def bundle(i):
            return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

        addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous).options(scheduling_strategy=bundle(0)).remote())
        actor = ray.remote(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)(cls)  # a dead rank stops the run
        return [actor.options(scheduling_strategy=bundle(rank), name=None).remote(*args(rank, addr, port))
                for rank in range(n)]

    @property
    def loss_norm_tokens(self) -> float:
        a, r = self.cfg.algorithm, self.cfg.rollout
        return float(a.loss_norm_tokens or r.max_tokens * r.max_turns)

    # -- one step -------------------------------------------------------------------------
    def _next_seed(self) -> int:
        """The next env seed (one per prompt; every mode draws from the same sequence)."""
        seed = self.cfg.seed * 1_000_003 + self.prompts_drawn
        self.prompts_drawn += 1
        return seed

    def _next_seeds(self) -> list[int]:
        return [self._next_seed() for _ in range(self.cfg.rollout.prompts_per_step)]

    @property
    def max_response_tokens(self) -> int:
        r = self.cfg.rollout
        return r.max_tokens * r.max_turns

    def _shaped_rewards(self, trajs) -> torch.Tensor:
        """Episode rewards plus DAPO's overlong penalty (when algorithm.overlong_buffer_frac > 0)."""
        a = self.cfg.algorithm
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        if a.overlong_buffer_frac > 0:
            L = self.max_response_tokens
            rewards = rewards + overlong_penalty(torch.tensor([t.num_policy_tokens for t in trajs]), L,
                                                 a.overlong_buffer_frac * L, a.overlong_penalty)
        return rewards

    def _check_errors(self, trajs) -> None:
        failed = [t for t in trajs if t.error]
        self._log_env_errors()
        if len(failed) > self.cfg.env.max_error_frac * len(trajs):
            raise RunError(
                f"env {self.cfg.env._target_ or self.cfg.env.name!r} failed on {len(failed)}/{len(trajs)} episodes "
                f"after {self.cfg.rollout.max_retries} retries; first error: {failed[0].error}. "
                "Fix the environment (or raise env.max_error_frac to tolerate failures)"
            )

    SUMMED_ROLLOUT_STATS = ("rollout/episodes", "env/errors", "env/retries", "env/failed_episodes",
                            "env/failed_groups", "rollout/generated_tokens", "rollout/wall_s",
                            "rollout/engine_restarts", "rollout/engine_retried_episodes", "rollout/context_truncated")

    def _collect(self):
        """Rollouts for one step -> (batch trajectories, groups whose advantage is forced to 0, all
        sampled trajectories, stats). With dynamic sampling, groups whose rewards are all equal
        are dropped and more prompts are rolled out (up to algorithm.max_sample_rounds rounds);
        if still short, dropped groups fill the batch with zero advantage (counted)."""
        a, G, P = self.cfg.algorithm, self.cfg.rollout.group_size, self.cfg.rollout.prompts_per_step
        kept, dropped, everything, stats, rounds = [], [], [], {}, 0
        while True:
            trajs = self.runner.run(self._next_seeds())
            rounds += 1
            self._check_errors(trajs)
            everything += trajs
            for k, v in self.runner.stats.items():
                stats[k] = stats.get(k, 0) + v if k in self.SUMMED_ROLLOUT_STATS and k in stats else v
            groups = [trajs[g * G:(g + 1) * G] for g in range(P)]
            if not a.dynamic_sampling:
                kept = groups
                break
            signal = groups_with_signal(self._shaped_rewards(trajs), G)
            for g, grp in enumerate(groups):
                (kept if bool(signal[g]) and not any(t.error for t in grp) else dropped).append(grp)
            if len(kept) >= P or rounds >= a.max_sample_rounds:
                break
        stats["rollout/tokens_per_s"] = stats["rollout/generated_tokens"] / max(stats["rollout/wall_s"], 1e-9)
        if a.dynamic_sampling:
            stats["dynamic/rounds"] = rounds
        return (*self._assemble(kept, dropped, stats), everything, stats)

    def _assemble(self, kept: list, dropped: list, stats: dict):
        """Batch of exactly prompts_per_step groups, renumbered: kept groups first, then (if short)
        dropped ones as zero-advantage padding. Returns (trajectories, zero-advantage groups)."""
        P = self.cfg.rollout.prompts_per_step
        padded = max(0, P - len(kept))
        batch_groups = kept[:P] + dropped[:padded]
        zero_groups = {g for g, grp in enumerate(batch_groups) if g >= len(kept[:P]) or any(t.error for t in grp)}
        batch = []
        for g, grp in enumerate(batch_groups):
            for t in grp:
                t.group = g
                batch.append(t)
        if self.cfg.algorithm.dynamic_sampling:
            stats.update({"dynamic/kept_groups": min(len(kept), P), "dynamic/dropped_groups": len(dropped),
                          "dynamic/padded_groups": padded})
        return batch, zero_groups

    # -- asynchronous modes ---------------------------------------------------------------------
    def _stream_budget(self) -> int:
        """Groups the producer may have started: enough for `max_staleness + 1` batches ahead of
        the current policy version, plus every group dropped so far (they are replaced)."""
        P = self.cfg.rollout.prompts_per_step
        return (self.version + self.cfg.trainer.max_staleness + 1) * P + self._replaced_groups

    def _collect_stream(self):
        """Async mode: take finished groups (completion order) until a batch is full. Groups whose
        oldest token is more than trainer.max_staleness versions behind the learner are dropped
        (stale_policy=drop) or kept for importance-sampling correction (stale_policy=correct);
        with dynamic sampling, groups without reward signal are dropped too. Dropped groups are
        replaced by new ones."""
        cfg, a = self.cfg, self.cfg.algorithm
        t, G, P = cfg.trainer, cfg.rollout.group_size, cfg.rollout.prompts_per_step
        kept, no_signal, everything, stale = [], [], [], 0
        while len(kept) < P:
            grp = self.runner.take_group(timeout=cfg.trainer.wait_timeout_s)
            everything += grp
            self._check_errors(grp)
            if group_staleness(grp, self.version) > t.max_staleness and t.stale_policy == "drop":
                stale += 1
                self._replaced_groups += 1
                self.runner.notify()
                continue
            if a.dynamic_sampling and not (bool(groups_with_signal(self._shaped_rewards(grp), G)[0])
                                           and not any(tr.error for tr in grp)):
                no_signal.append(grp)
                self._replaced_groups += 1
                self.runner.notify()
                continue
            kept.append(grp)
        stats = self.runner.take_stream_stats(everything)
        self._log_env_errors()
        self.runner.errors = []
        stats["async/stale_groups_dropped"] = stale
        return (*self._assemble(kept, no_signal, stats), everything, stats)

    def _sync_weights(self, interrupt: bool) -> dict:
        t0 = time.perf_counter()
        self.engine_pool.replace_dead()  # an engine that died since the rollout is replaced (and resynced) first
        push = "push_weights_broadcast" if self.cfg.learner.sync_transport == "broadcast" else "push_weights"
        with self._learner_lock:
            sync = _get_all([getattr(x, push).remote(self.engines, self.version, self.cfg.learner.sync_bucket_mb, interrupt)
                             for x in self.learners])[0]
        self.engine_version = self.version
        return {**sync, "timing/sync_s": time.perf_counter() - t0}

    def _resync_engine(self, engine) -> int:
        """A restarted engine (rollout/engine_pool.py) gets the learner's current weights and adopts
        its version: in sync mode that is the version the other engines have; in the overlapped modes
        it waits for a running update and may be one version ahead of them until the next sync."""
        with self._learner_lock:
            version = self.version
            _get_all([x.push_weights.remote([engine], version, self.cfg.learner.sync_bucket_mb, False)
                      for x in self.learners])
        return version

    def train_step(self) -> dict:
        """One training step in the configured trainer.mode:
        sync          rollout -> update -> weight sync (samples of step k come from version k);
        one_step_off  the rollout of step k+1 runs (on version k) while step k trains;
        async         groups stream in continuously; after each update the weights go to the
                      engines mid-flight (partial rollouts) and samples are at most
                      trainer.max_staleness versions old."""
        mode = self.cfg.trainer.mode
        t0 = time.perf_counter()
        if mode == "sync":
            collected = self._collect()
            t_rollout = time.perf_counter() - t0
            metrics = self._learn(*collected)
            sync = self._sync_weights(False) if metrics["policy/trained"] else {"timing/sync_s": 0.0}
        elif mode == "one_step_off":
            if self._pending is None:
                self._pending = self._executor.submit(self._collect)
            collected = self._pending.result()
            t_rollout = time.perf_counter() - t0  # time spent waiting for the rollout
            sync = {"timing/sync_s": 0.0}
            if self.engine_version < self.version:  # engines idle now: bring them to the learner's version
                sync = self._sync_weights(False)
            self._pending = self._executor.submit(self._collect) if self.step + 1 < self.cfg.steps else None
            with self._learner_lock:
                metrics = self._learn(*collected)
        else:  # async
            if not self._streaming:
                self.runner.start_stream(self._next_seed, self._stream_budget)
                self._streaming = True
            collected = self._collect_stream()
            t_rollout = time.perf_counter() - t0
            with self._learner_lock:
                metrics = self._learn(*collected)
            sync = {"timing/sync_s": 0.0}
            if metrics["policy/trained"]:
                sync = self._sync_weights(True)
                self.runner.notify()  # the budget grew with the version
        metrics.update(sync)
        metrics["timing/rollout_s"] = t_rollout  # in the overlapped modes: time waiting for rollouts
        metrics["timing/step_s"] = time.perf_counter() - t0
        if self.evaluator.due(self.step):
            metrics.update(self.evaluate())
        self.step += 1
        return metrics

    def evaluate(self) -> dict:
        """eval/* metrics of the learner's current policy on the held-out seeds (rl/eval.py); draws
        no training seed. one_step_off: the next batch's rollout (which owns the runner's event loop)
        finishes first, then the engines are synced to the learner (the next step skips its sync)."""
        t0 = time.perf_counter()
        if self._pending is not None:
            self._pending.result()
        if self.engine_version < self.version:
            self._sync_weights(False)
        return {**self.evaluator.run(self.step), "timing/eval_s": time.perf_counter() - t0}

    def _learn(self, trajs, zero_groups, sampled, rollout_stats) -> dict:
        """Score, compute advantages, update the policy (and critic); returns the step's metrics
        (the weight sync is the caller's)."""
        import ray

        cfg, a = self.cfg, self.cfg.algorithm
        G = cfg.rollout.group_size
        t0 = time.perf_counter()

        rewards = self._shaped_rewards(trajs)
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
        value_refs = [c.values.remote(batch_ref) for c in self.critic]
        ref_lp_ref = self.ref.logprobs.remote(batch_ref) if self.ref is not None else None
        scored = _get_all(score_refs)
        old_lp, stats = torch.cat([lp for lp, _ in scored]), dict(scored[0][1])
        values = torch.cat(_get_all(value_refs)) if self.critic else None
        ref_lp = ray.get(ref_lp_ref) if ref_lp_ref is not None else None
        t_score = time.perf_counter() - t1

        adv, returns, adv_stats = compute_advantages(a, rewards, batch["loss_mask"], G, old_lp, ref_lp, values)
        # A group with an episode that failed after all retries is not trained on (its baseline
        # would be wrong; reported in env/failed_groups and env_errors.jsonl), nor is a group that
        # only pads a dynamically sampled batch.
        for g in zero_groups:
            adv[g * G:(g + 1) * G] = 0.0
        batch.update(old_logprobs=old_lp, advantages=adv)
        if a.is_correction != "none":
            batch["is_weights"], is_stats = importance_weights(old_lp, batch["behaviour_logprobs"], batch["loss_mask"],
                                                               a.is_correction, a.is_cap)
            adv_stats.update(is_stats)
        if ref_lp is not None and not a.kl_in_reward:
            batch["ref_logprobs"] = ref_lp
        if self.critic:
            batch.update(values=values, returns=returns)
        t2 = time.perf_counter()
        train_policy = self.step >= a.critic.warmup_steps or not self.critic
        batch_ref = ray.put(batch)
        train_refs = [x.train.remote(batch_ref) for x in self.learners] if train_policy else []
        critic_refs = [c.train.remote(batch_ref) for c in self.critic]
        if train_refs:
            stats.update(_get_all(train_refs)[0])
        if critic_refs:
            stats.update(_get_all(critic_refs)[0])
        t_train = time.perf_counter() - t2
        learner_version = self.version
        if train_policy:
            self.version += 1
        ok = [t for t in sampled if not t.error] or sampled
        rewards_ok = torch.tensor([t.reward for t in ok])
        behaviour_versions = [v for t in trajs for v in t.versions if v >= 0]
        staleness = [learner_version - v for v in behaviour_versions] or [0]
        metrics = {
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
            "timing/score_s": t_score, "timing/train_s": t_score + t_train, "timing/update_s": t_train,
            "timing/learn_s": time.perf_counter() - t0,
            **rollout_stats, **adv_stats, **stats,
        }
        lg = cfg.logger
        if lg.samples_every > 0 and self.step % lg.samples_every == 0:
            metrics[SAMPLES_KEY] = self._rollout_samples(ok, lg.samples_per_step)
        warning = self.mismatch_monitor.update(metrics["mismatch/kl"])
        metrics["mismatch/jump"] = int(warning is not None)
        if warning:
            print(f"[qrl] warning (step {self.step}): {warning}", flush=True)
        return metrics

    # -- checkpoints (rl/checkpoint.py) -------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """<run>/checkpoints/step_<steps done>: learner (+critic) DeepSpeed state and RNGs, the
        driver's counters (env seed position, version, monitor history) and, with checkpoint.hf,
        the policy as an HF folder. Written to a .tmp folder and renamed when complete."""
        import shutil

        from rl import checkpoint as ck

        c = self.cfg.checkpoint
        final = ck.step_dir(self.run_dir, self.step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self._learner_lock:  # an engine restarted by a running rollout pushes from the learners too
            _get_all([x.save_checkpoint.remote(str(tmp / "learner")) for x in self.learners])
            if self.critic:
                _get_all([x.save_checkpoint.remote(str(tmp / "critic")) for x in self.critic])
            if c.hf:
                _get_all([x.save_hf.remote(str(tmp / "hf"), self.policy_path) for x in self.learners])
        torch.save(ck.rng_state(), tmp / "driver_rng.pt")
        ck.write_state(tmp, {
            "step": self.step, "version": self.version, "engine_version": self.engine_version,
            "prompts_drawn": self.prompts_drawn, "replaced_groups": self._replaced_groups,
            "mismatch_history": self.mismatch_monitor.history, "trainer_mode": self.cfg.trainer.mode,
            "num_ranks": self.cfg.learner.num_ranks, "zero_stage": self.cfg.learner.zero_stage,
            "critic": bool(self.critic), "policy_path": self.policy_path,
            "wandb_run_id": self.wandb_run_id})
        ck.finish(tmp, final)
        ck.prune(self.run_dir, c.keep_last)
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, folder: str | Path) -> dict:
        """Continue from a checkpoint: learner (+critic) state, counters and RNGs restored, then the
        engines get the restored weights (so sampling continues exactly where it stopped)."""
        from rl import checkpoint as ck

        folder = Path(folder)
        state = ck.read_state(folder)
        l = self.cfg.learner
        if (state["num_ranks"], state["zero_stage"]) != (l.num_ranks, l.zero_stage):
            raise RunError(f"checkpoint {folder} was saved with learner.num_ranks={state['num_ranks']} "
                           f"learner.zero_stage={state['zero_stage']}; resume with the same values "
                           f"(now {l.num_ranks} / {l.zero_stage})")
        if state["critic"] != bool(self.critic):
            raise RunError(f"checkpoint {folder} was saved {'with' if state['critic'] else 'without'} a critic; "
                           f"resume with the algorithm it was saved with (now algorithm.advantage={self.cfg.algorithm.advantage!r})")
        _get_all([x.load_checkpoint.remote(str(folder / "learner")) for x in self.learners])
        if self.critic:
            _get_all([x.load_checkpoint.remote(str(folder / "critic")) for x in self.critic])
        self.step, self.version = state["step"], state["version"]
        self.prompts_drawn, self._replaced_groups = state["prompts_drawn"], state["replaced_groups"]
        self.mismatch_monitor.history = list(state["mismatch_history"])
        ck.set_rng_state(torch.load(folder / "driver_rng.pt", weights_only=False))
        self._sync_weights(False)  # engines start from the initial weights: bring them to the checkpoint's
        self.last_checkpoint = folder
        return state

    def export(self, folder: str | Path) -> str:
        """An HF checkpoint folder of the current policy (weights + config + tokenizer/processor);
        LoRA runs export merged weights."""
        out = _get_all([x.save_hf.remote(str(folder), self.policy_path) for x in self.learners])
        return out[0]

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

    def _log_env_errors(self) -> None:
        """Every env failure of this step (also the retried ones) goes to env_errors.jsonl."""
        append_env_errors(self.run_dir, self.step, self.runner.errors)

    def close(self) -> None:
        import ray

        if self._streaming:
            self.runner.stop_stream()
        if self._pending is not None:
            self._pending.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._started:
            for h in self.engines + self.learners + self.critic + ([self.ref] if self.ref is not None else []):
                try:
                    ray.kill(h)
                except Exception:  # noqa: BLE001
                    pass
            self.env_pool.shutdown()
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001
                    pass
        if getattr(self, "_owns_ray", False):
            ray.shutdown()


def _get_all(refs: list):
    """ray.get of every ref, raising the first failure as soon as it happens: when one DeepSpeed rank
    dies, the others block in a collective, and a plain ray.get would wait on them for ever."""
    import ray

    pending, done = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done[ready[0]] = ray.get(ready[0])  # raises at once if that task failed
    return [done[r] for r in refs]


def _write_report(run_dir) -> None:
    """report.png + report.md of whatever steps finished (also after a failure); never masks an error."""
    from rl.report import write_report

    try:
        png, _ = write_report(run_dir)
        print(f"[qrl] report: {png.resolve()}", flush=True)
    except Exception as e:  # noqa: BLE001 - a missing plot must not hide the run's own outcome
        print(f"[qrl] no report written ({type(e).__name__}: {e}); later: python -m rl.report {run_dir}", flush=True)


class RunInterrupted(RunError):
    """Ctrl-C / SIGTERM: the run stopped after a step and saved a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag (the current step finishes, a checkpoint is saved, the run
    stops); a second Ctrl-C aborts at once."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.signum = None
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[qrl] {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again aborts without one)", flush=True)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _who_died(ctl: Controller, err: BaseException) -> str:
    """'learner rank 1' / 'critic rank 0' / 'reference policy' / 'engine 0' for a RayActorError."""
    dead = getattr(err, "actor_id", None)
    roles = [("learner rank", ctl.__dict__.get("learners", [])), ("critic rank", ctl.critic),
             ("engine", ctl.__dict__.get("engines", [])), ("reference policy", [ctl.ref] if ctl.ref else [])]
    for role, handles in roles:
        for i, h in enumerate(handles):
            if dead is not None and h._actor_id.hex() == dead:
                return role if role == "reference policy" else f"{role} {i}"
    return "a Ray actor of the run"


def _resume_hint(ctl: Controller, run_dir: Path) -> str:
    last = ctl.last_checkpoint
    if last is None:
        return (f"No checkpoint was written before it (checkpoint.every={ctl.cfg.checkpoint.every}); "
                "a new run starts from scratch")
    return f"Last checkpoint: {Path(last).resolve()}; continue with: python -m rl.train resume={run_dir.resolve()}"


def run_training(cfg, run_dir: str | Path, on_step=None) -> Path:
    """Full run (or the rest of one, with `resume`): returns the path of metrics.jsonl.
    `on_step(controller, metrics)` is called after every logged step."""
    import ray

    from rl import checkpoint as ck

    cfg = _as_dataclass(cfg)
    run_dir = Path(run_dir)
    resume_from = ck.resolve_resume(cfg.resume) if cfg.resume else None  # a bad path fails before anything starts
    ctl = Controller(cfg, run_dir)
    state = ck.read_state(resume_from) if resume_from else {}
    first = state.get("step", 0)
    if resume_from:  # steps logged after the checkpoint are run again: drop their rows
        for name in ("metrics.jsonl", "samples.jsonl", "env_errors.jsonl"):
            ck.truncate_jsonl(run_dir / name, first)
    logger = RunLogger(run_dir, cfg.logger.backend, cfg.logger.project, cfg.logger.run_name, cfg.logger.mode,
                       config=asdict(cfg), total_steps=cfg.steps, progress=cfg.logger.progress,
                       initial_step=first, wandb_id=state.get("wandb_run_id"))
    ctl.wandb_run_id = logger.run_id
    print(f"[qrl] run folder: {run_dir.resolve()}  metrics: {logger.metrics_path.resolve()}", flush=True)
    stop = _StopRequest(cfg.checkpoint.on_interrupt)
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
                raise RunInterrupted(f"stopped by {__import__('signal').Signals(stop.signum).name} after step "
                                     f"{ctl.step}; checkpoint: {path.resolve()}; continue with: "
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
        raise RunError(f"{_who_died(ctl, e)} died during step {ctl.step} ({cause}); the run stopped. "
                       f"{_resume_hint(ctl, run_dir)}") from e
    finally:
        stop.restore()
        logger.close()
        ctl.close()
        _write_report(run_dir)
    print(f"[qrl] done; metrics written to {logger.metrics_path.resolve()}", flush=True)
    return logger.metrics_path
