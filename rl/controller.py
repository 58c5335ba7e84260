"""The controller: one driver loop wiring env pool -> engines -> learner ranks -> weight sync -> logs."""
from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rl.algorithms import ADVANTAGE_ESTIMATORS
from rl.config import TrainConfig, validate
from rl.learner import AlgoSettings, Learner, LearnerSettings
from rl.logger import RunLogger
from rl.trajectory import collate


class RunError(RuntimeError):
    """A run-stopping problem with a message that names its cause and the fix."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        from envs.registry import resolve_env_class
        from policies.build import load_tokenizer, resolve_policy_path

        # Fail fast on bad inputs, before Ray or any model starts.
        self.env_cls = resolve_env_class(cfg.env.name, cfg.env._target_)
        self.policy_path = resolve_policy_path(cfg.policy.path, asdict(cfg.policy.tiny), cfg.cache_dir)
        self.tokenizer = load_tokenizer(self.policy_path)
        self.step = 0
        self.version = 0
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
        env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda"),
                    "RAY_DEDUP_LOGS": "1", "TORCHINDUCTOR_CACHE_DIR": str(self._cache_root() / "inductor"), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        address = cluster_address(cfg.ray.address)
        if not ray.is_initialized():
            if address:  # join a running cluster: its nodes bring their own CPUs and temp dirs
                env_vars = {k: v for k, v in env_vars.items() if k not in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
                ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                         logging_level="WARNING")
            else:
                ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                         _temp_dir=cfg.ray.temp_dir, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                         logging_level="WARNING")
            self._owns_ray = True
        else:
            self._owns_ray = False
        from rollout.engine import EngineConfig, engine_actor
        from rollout.env_pool import EnvPool
        from rollout.episodes import EpisodeRunner, RolloutSettings

        r, e = cfg.rollout, cfg.env
        try:
            self.env_pool = EnvPool(e.name, e._target_, e.kwargs, num_actors=e.num_actors,
                                    envs_per_actor=e.envs_per_actor, num_cpus_per_actor=e.num_cpus_per_actor,
                                    step_timeout_s=e.step_timeout_s, call_timeout_s=e.call_timeout_s,
                                    placement=e.placement)
        except TimeoutError as err:
            raise RunError(str(err)) from err
        eng_cls = engine_actor(r.engine_num_cpus)
        self.engines = [
            eng_cls.remote(EngineConfig(
                model=self.policy_path, dtype=cfg.policy.engine_dtype, seed=cfg.seed + i,
                max_model_len=r.max_model_len, kv_cache_memory_mb=r.kv_cache_memory_mb,
                enforce_eager=r.enforce_eager, enable_prefix_caching=r.enable_prefix_caching,
                backend=r.engine_backend, extra=r.extra))
            for i in range(r.num_engines)
        ]
        l, a = cfg.learner, cfg.algorithm
        ls = LearnerSettings(zero_stage=l.zero_stage, dtype=l.dtype, lr=l.lr, weight_decay=l.weight_decay,
                             grad_clip=l.grad_clip, micro_batch_size=l.micro_batch_size, mini_batches=l.mini_batches,
                             logprob_chunk_tokens=l.logprob_chunk_tokens, gradient_checkpointing=l.gradient_checkpointing,
                             num_threads=l.num_threads, seed=cfg.seed, ds_extra=l.ds_extra)
        algo = AlgoSettings(policy_loss=a.policy_loss, clip_low=a.clip_low, clip_high=a.clip_high,
                            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator)
        # torch.distributed rendezvous on rank 0's node, with a port free there: 127.0.0.1 and a
        # driver-side port are wrong once the ranks (or the driver) sit on different nodes.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.learner_pg = placement_group([{"CPU": max(l.num_cpus_per_rank, 0.01)}] * l.num_ranks, strategy="PACK")
        ray.get(self.learner_pg.ready())

        def bundle(i):
            return PlacementGroupSchedulingStrategy(placement_group=self.learner_pg, placement_group_bundle_index=i)

        addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous).options(scheduling_strategy=bundle(0)).remote())
        learner_cls = ray.remote(num_cpus=l.num_cpus_per_rank)(Learner)
        B = r.prompts_per_step * r.group_size
        self.learners = [learner_cls.options(scheduling_strategy=bundle(rank)).remote(
                             self.policy_path, ls, algo, rank, l.num_ranks, addr, port, B)
                         for rank in range(l.num_ranks)]
        ray.get([e.ready.remote() for e in self.engines] + [x.get_version.remote() for x in self.learners])
        self.runner = EpisodeRunner(self.env_pool, self.engines, self.tokenizer, RolloutSettings(
            group_size=r.group_size, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
            max_turns=r.max_turns, max_context=r.max_model_len, max_retries=r.max_retries,
            max_inflight=r.max_inflight))
        self._started = True

    # -- one step -------------------------------------------------------------------------
    def seeds_for_step(self, step: int) -> list[int]:
        P = self.cfg.rollout.prompts_per_step
        return [self.cfg.seed * 1_000_003 + step * P + i for i in range(P)]

    def train_step(self) -> dict:
        import ray

        cfg = self.cfg
        t0 = time.perf_counter()
        trajs = self.runner.run(self.seeds_for_step(self.step))
        t_rollout = time.perf_counter() - t0
        failed = [t for t in trajs if t.error]
        self._log_env_errors()
        if len(failed) > cfg.env.max_error_frac * len(trajs):
            raise RunError(
                f"env {cfg.env._target_ or cfg.env.name!r} failed on {len(failed)}/{len(trajs)} episodes "
                f"after {cfg.rollout.max_retries} retries; first error: {failed[0].error}. "
                "Fix the environment (or raise env.max_error_frac to tolerate failures)"
            )
        rewards = torch.tensor([t.reward for t in trajs])
        adv = ADVANTAGE_ESTIMATORS[cfg.algorithm.advantage](
            rewards, cfg.rollout.group_size, normalize_std=cfg.algorithm.normalize_std)
        # A group with an episode that failed after all retries is not trained on (its baseline
        # would be wrong); it is reported in env/failed_groups and env_errors.jsonl.
        for g in {t.group for t in failed}:
            adv[g * cfg.rollout.group_size:(g + 1) * cfg.rollout.group_size] = 0.0
        ok = [t for t in trajs if not t.error] or trajs
        rewards_ok = torch.tensor([t.reward for t in ok])
        batch = collate(trajs, self.tokenizer.pad_token_id)
        batch["advantages"] = adv
        t1 = time.perf_counter()
        ref = ray.put(batch)
        stats = ray.get([x.train.remote(ref) for x in self.learners])[0]
        t_train = time.perf_counter() - t1
        self.version += 1
        t2 = time.perf_counter()
        sync = ray.get([x.push_weights.remote(self.engines, self.version, cfg.learner.sync_bucket_mb)
                        for x in self.learners])[0]
        t_sync = time.perf_counter() - t2
        resp_lens = [t.num_policy_tokens for t in trajs]
        behaviour_versions = {v for t in trajs for v in t.versions if v >= 0}
        metrics = {
            "step": self.step,
            "policy/version": self.version,
            "rollout/policy_version": max(behaviour_versions) if behaviour_versions else -1,
            "reward/mean": float(rewards_ok.mean()),
            "reward/std": float(rewards_ok.std()) if len(ok) > 1 else 0.0,
            "reward/max": float(rewards_ok.max()),
            "reward/exact_frac": statistics.mean(float(t.info.get("exact", 0)) for t in ok),
            **info_means(ok),
            "response/mean_tokens": statistics.mean(resp_lens),
            "response/stop_frac": statistics.mean(t.finish_reason == "stop" for t in trajs),
            "timing/rollout_s": t_rollout, "timing/train_s": t_train, "timing/sync_s": t_sync,
            "timing/step_s": time.perf_counter() - t0,
            **self.runner.stats, **stats, **sync,
        }
        self.step += 1
        return metrics

    def _log_env_errors(self) -> None:
        """Every env failure of this step (also the retried ones) goes to env_errors.jsonl."""
        if self.runner.errors:
            import json

            with open(self.run_dir / "env_errors.jsonl", "a") as f:
                for err in self.runner.errors:
                    f.write(json.dumps({"step": self.step, **err}) + "\n")

    def close(self) -> None:
        import ray

        if self._started:
            for h in self.engines + self.learners:
                try:
                    ray.kill(h)
                except Exception:  # noqa: BLE001
                    pass
            self.env_pool.shutdown()
            if getattr(self, "learner_pg", None) is not None:
                from ray.util.placement_group import remove_placement_group

                try:
                    remove_placement_group(self.learner_pg)
                except Exception:  # noqa: BLE001
                    pass
        if getattr(self, "_owns_ray", False):
            ray.shutdown()


def run_training(cfg, run_dir: str | Path) -> Path:
    """Full run: returns the path of metrics.jsonl."""
    cfg = _as_dataclass(cfg)
    ctl = Controller(cfg, run_dir)
    logger = RunLogger(run_dir, cfg.logger.backend, cfg.logger.project, cfg.logger.run_name, cfg.logger.mode,
                       config=asdict(cfg), total_steps=cfg.steps, progress=cfg.logger.progress)
    print(f"[qrl] run folder: {Path(run_dir).resolve()}  metrics: {logger.metrics_path.resolve()}", flush=True)
    try:
        ctl.start()
        logger.start_progress()
        for _ in range(cfg.steps):
            logger.log(ctl.train_step())
    finally:
        logger.close()
        ctl.close()
    print(f"[qrl] done; metrics written to {logger.metrics_path.resolve()}", flush=True)
    return logger.metrics_path
