"""Training on a multi-node Ray cluster, simulated on this machine with `ray.cluster_utils.Cluster`
(a head node and a worker node, each its own raylet with 2 CPUs). The controller joins it the way it
joins a real cluster (`ray.address=<host:port>`, or `ray.address=null` + RAY_ADDRESS), and the env
actors' placement group (SPREAD) must put them on both nodes."""
import os
import shutil
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, short_tmp

SMALL = ["logger=console", "rollout.prompts_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=16",
         "rollout.max_tokens=4", "env.num_actors=4"]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head node and one worker node (2 CPUs each). Its raylets (and so every worker process) inherit
    this process's environment, set here; everything is torn down even if a test fails."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # an in-process ray.init left over by another test module
        ray.shutdown()
    ray_tmp = short_tmp()  # Ray's socket paths must stay < 107 bytes
    job_tmp = tmp_path_factory.mktemp("cluster-tmp")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(job_tmp),
           # Ray's default temp dir, and where Cluster records its address (ray_current_cluster): private
           # to this test, so concurrent runs on this machine with ray.address=null don't join it.
           "RAY_TMPDIR": ray_tmp}
    saved = {k: os.environ.get(k) for k in [*env, "RAY_ADDRESS"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster()  # nodes are added inside the try, so a failed start is still cleaned up
    try:
        cluster.add_node(num_cpus=2, temp_dir=os.path.join(ray_tmp, "ray"), include_dashboard=False)  # head
        cluster.add_node(num_cpus=2)  # worker node (shares the head's temp dir)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(ray_tmp, ignore_errors=True)


def make_cfg(cache_dir, *overrides):
    from rl.config import TrainConfig
    from rl.cli import compose

    cfg = OmegaConf.to_object(compose([*SMALL, f"cache_dir={cache_dir}", *overrides]))
    assert isinstance(cfg, TrainConfig)
    return cfg


def cluster_node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.list_all_nodes()}


def run_steps(cfg, run_dir, steps: int):
    """Start a controller, run `steps` training steps; returns (env actor node ids, metrics, nodes seen)."""
    import ray

    from rl.controller import Controller

    ctl = Controller(cfg, run_dir)
    try:
        ctl.start()
        assert ctl.actors.owns_ray  # it joined the cluster itself (no ray.init left over from elsewhere)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        env_nodes = [d["node_id"] for d in ctl.actors.env_pool.describe()]
        metrics = [ctl.train_step() for _ in range(steps)]
    finally:
        ctl.close()
    assert not ray.is_initialized()  # close() disconnected the driver (the cluster keeps running)
    return env_nodes, metrics, alive


def check_metrics(metrics):
    for i, m in enumerate(metrics):
        assert m["policy/version"] == i + 1 and m["step"] == i
        assert m["env/failed_episodes"] == 0, m
        assert m["reward/mean"] is not None and 0.0 <= m["reward/mean"] <= 1.0, m
        assert m["train/policy_tokens"] > 0 and m["sync/bytes"] > 0, m


def test_train_step_with_env_actors_on_both_nodes(two_node_cluster, cache_dir, tmp_path):
    cluster = two_node_cluster
    nodes = cluster_node_ids(cluster)
    assert len(nodes) == 2
    t0 = time.perf_counter()
    env_nodes, metrics, alive = run_steps(make_cfg(cache_dir, f"ray.address={cluster.address}"), tmp_path / "run", 2)
    print(f"2 steps on the 2-node cluster in {time.perf_counter() - t0:.1f}s")
    assert alive == nodes  # the driver joined this cluster, not a fresh local instance
    assert len(env_nodes) == 4 and set(env_nodes) == nodes, env_nodes  # SPREAD: actors on both nodes
    check_metrics(metrics)


def test_null_address_joins_the_running_cluster(two_node_cluster, cache_dir, tmp_path, monkeypatch):
    """`ray.address=null` (the default) joins the cluster found through RAY_ADDRESS or the address a
    running cluster recorded (what `ray start` does), instead of starting a local instance."""
    from rl.cluster import cluster_address

    cluster = two_node_cluster
    port = cluster.address.rsplit(":", 1)[1]
    found = cluster_address(None)  # via $RAY_TMPDIR/ray/ray_current_cluster, written by the head node
    assert found is not None and found.rsplit(":", 1)[1] == port, found
    assert cluster_address("local") is None and cluster_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    assert cluster_address(None) == cluster.address
    env_nodes, metrics, alive = run_steps(make_cfg(cache_dir), tmp_path / "run", 1)
    assert alive == cluster_node_ids(cluster)
    assert set(env_nodes) == cluster_node_ids(cluster), env_nodes
    check_metrics(metrics)
