"""Everything a run starts on Ray: joining or starting the cluster, and the run's actors (env pool,
vLLM engines, learner ranks, critic ranks, reference policy) with their placement. `RunActors.start`
returns once every actor is ready; `close` kills them again (and shuts Ray down if the run started
it). The controller never places or kills an actor itself."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

from common.errors import RunError
from rl.algorithms import NEEDS_CRITIC
from rl.config import TrainConfig
from rl.critic import Critic
from rl.learner import Learner
from rl.reference import ReferencePolicy
from rl.settings import algo_settings, critic_settings, engine_config, env_pool, learner_settings


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


def start_ray(cfg: TrainConfig, tmp: Path, cache_root: Path) -> bool:
    """Join or start Ray (see cluster_address) with the workers' environment; False if Ray was
    already initialised (then the caller does not own it)."""
    import ray
    import torch

    if ray.is_initialized():
        return False
    env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
                "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu"),
                "RAY_DEDUP_LOGS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor"),
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
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


def _rendezvous() -> tuple[str, int]:
    """(IP, free port) of the node this runs on: where learner rank 0 hosts torch.distributed."""
    import ray

    from common.net import free_port

    return ray.util.get_node_ip_address(), free_port("")


def start_env_pool(env_cfg):
    try:
        return env_pool(env_cfg)
    except TimeoutError as err:  # the placement could not be met: the message names the settings
        raise RunError(str(err)) from err


class RunActors:
    """The Ray actors of one training run (and the Ray instance, if the run started it)."""

    def __init__(self, cfg: TrainConfig, policy_path: str, engines: list | None = None):
        """`engines`: running engine actors of this policy and rollout config to use instead of
        starting new ones (kept alive at close; the controller loads the run's initial weights
        into them first)."""
        self.cfg, self.policy_path = cfg, policy_path
        self.borrowed_engines = list(engines or [])
        self.owns_ray = False
        self.env_pool = self.engine_pool = None
        self.engines: list = []  # EnginePool.engines: replaced in place when an engine restarts
        self.learners: list = []
        self.critic: list = []
        self.ref = None
        self.placement_groups: list = []

    def start(self, tmp: Path, cache_root: Path, resync: Callable) -> None:
        """Start Ray (unless joined), the env pool, the engines (restarted engines get their weights
        through `resync(handle) -> version`) and the DeepSpeed ranks; wait until all are ready."""
        import ray

        from rollout.engine import engine_actor
        from rollout.engine_pool import EnginePool
        from sync import get_transport

        cfg = self.cfg
        r, l, a = cfg.rollout, cfg.learner, cfg.algorithm
        self.owns_ray = start_ray(cfg, tmp, cache_root)
        self.env_pool = start_env_pool(cfg.env)
        transport = get_transport(l.sync_transport)
        configs = [engine_config(cfg, self.policy_path, i) for i in range(r.num_engines)]
        if self.borrowed_engines and len(self.borrowed_engines) != r.num_engines:
            raise ValueError(f"{len(self.borrowed_engines)} running engines given for rollout.num_engines={r.num_engines}")
        actor_cls = engine_actor(r.engine_num_cpus)
        self.engine_pool = EnginePool(self.borrowed_engines or [actor_cls.remote(c) for c in configs], configs, actor_cls,
                                      resync=resync, max_restarts=r.max_engine_restarts,
                                      cannot_restart=None if transport.engines_restartable else transport.no_restart_reason)
        self.engines = self.engine_pool.engines
        batch = r.prompts_per_step * r.group_size
        ls = learner_settings(cfg)
        algo = algo_settings(cfg)
        self.learners = self._ranks(Learner, "learner", l.num_cpus_per_rank,
                                    lambda rank, addr, port: (self.policy_path, ls, algo, rank, l.num_ranks, addr, port, batch))
        waits = [x.get_version.remote() for x in self.learners]
        if a.advantage in NEEDS_CRITIC:  # PPO: a value model on its own DeepSpeed ranks
            from policies.build import resolve_policy_path

            c = a.critic
            critic_path = resolve_policy_path(c.path, {}, cfg.cache_dir) if c.path else self.policy_path
            cs = critic_settings(cfg)
            self.critic = self._ranks(Critic, "critic", c.num_cpus_per_rank,
                                      lambda rank, addr, port: (critic_path, cs, c.value_clip, rank, l.num_ranks, addr, port, batch))
            waits += [x.ready.remote() for x in self.critic]
        if a.kl_coef > 0:  # the frozen reference policy, only when KL is used at all
            self.ref = ray.remote(num_cpus=a.ref_num_cpus, max_restarts=0, max_task_retries=0)(ReferencePolicy).remote(
                self.policy_path, l.dtype, l.micro_batch_size, l.logprob_chunk_tokens, l.num_threads)
            waits.append(self.ref.ready.remote())
        ray.get([e.ready.remote() for e in self.engines] + waits)
        ray.get([x.connect_engines.remote(self.engines) for x in self.learners])

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

    def role_of(self, actor_id: str | None) -> str:
        """'learner rank 1' / 'critic rank 0' / 'reference policy' / 'engine 0' for a dead actor's id."""
        roles = [("learner rank", self.learners), ("critic rank", self.critic), ("engine", self.engines),
                 ("reference policy", [self.ref] if self.ref is not None else [])]
        for role, handles in roles:
            for i, h in enumerate(handles):
                if actor_id is not None and h._actor_id.hex() == actor_id:
                    return role if role == "reference policy" else f"{role} {i}"
        return "a Ray actor of the run"

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        borrowed = {id(h) for h in self.borrowed_engines}
        for h in self.engines + self.learners + self.critic + ([self.ref] if self.ref is not None else []):
            if id(h) in borrowed:
                continue
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.env_pool is not None:
            self.env_pool.shutdown()
        for pg in self.placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
        if self.owns_ray:
            ray.shutdown()


def get_all(refs: list) -> list:
    """ray.get of every ref, raising the first failure as soon as it happens: when one DeepSpeed rank
    dies, the others block in a collective, and a plain ray.get would wait on them for ever."""
    import ray

    pending, done = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done[ready[0]] = ray.get(ready[0])  # raises at once if that task failed
    return [done[r] for r in refs]
