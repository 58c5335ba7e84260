"""Shared test fixtures. What is expensive is started once per session and shared:
- `ray_cluster`: one local Ray instance (started again on demand if a test had to shut it down,
  e.g. tests/test_cluster.py, which needs a simulated multi-node cluster of its own);
- `warm_engines`: vLLM engine actors kept running between training runs, keyed by their exact
  EngineConfig; a run borrows them (run_training(engines=...)) and loads its own initial weights
  into them first, so a run on a warm engine samples exactly what it would on a fresh one;
- `train`: a whole training run in this process on that cluster and those engines, returning the
  rows of metrics.jsonl (the CLI itself is covered by tests/test_e2e.py and tests/test_bad_input.py).
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
RAY_CPUS = 8  # logical: warm engines hold one each; the 2 cores are shared as before


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole training run or a real engine/learner (deselect with -m 'not slow')")


def pytest_collection_modifyitems(items):
    """Tests that start Ray, an engine, a learner or a training run are `slow`; the rest (pure logic,
    configs, single envs) make the quick inner loop `pytest -m "not slow"`."""
    heavy = {"shared_ray", "ray_cluster", "train", "warm_engines", "two_node_cluster"}
    for item in items:
        if heavy & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Tiny models are built once per test session here."""
    return tmp_path_factory.mktemp("qrl-cache")


@pytest.fixture(scope="session")
def tiny_path(cache_dir):
    from policies.build import resolve_policy_path
    from policies.tiny import TinySpec

    def build(family: str) -> str:
        spec = TinySpec(family=family, num_hidden_layers=2 if family == "qwen3" else 4)
        return resolve_policy_path("tiny:default", asdict(spec), cache_dir)

    return build


class SharedRay:
    def __init__(self):
        self.tmp = short_tmp()
        self.generation = 0  # bumped at every (re)start: actors of an older one are gone

    def ensure(self):
        import ray

        if not ray.is_initialized():
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "TMPDIR": self.tmp,
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
                   "VLLM_LOGGING_LEVEL": "WARNING", "RAY_DEDUP_LOGS": "1"}
            ray.init(num_cpus=RAY_CPUS, _temp_dir=self.tmp, include_dashboard=False, runtime_env={"env_vars": env},
                     logging_level="WARNING")
            self.generation += 1
        return ray


@pytest.fixture(scope="session")
def shared_ray():
    import ray

    shared = SharedRay()
    yield shared
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(shared_ray):
    return shared_ray.ensure()


class WarmEngines:
    """Engine actors by EngineConfig, started on first use and kept (at most `keep`, least recently
    used ones are stopped)."""

    def __init__(self, shared: SharedRay, keep: int = 3):
        self.shared, self.keep = shared, keep
        self.engines: dict[str, tuple[int, list]] = {}  # config key -> (ray generation, handles)

    def get(self, cfg) -> list:
        import ray

        from policies.build import resolve_policy_path
        from rl.settings import engine_config
        from rollout.engine import engine_actor

        ray = self.shared.ensure()
        path = resolve_policy_path(cfg.policy.path, asdict(cfg.policy.tiny), cfg.cache_dir)
        configs = [engine_config(cfg, path, i) for i in range(cfg.rollout.num_engines)]
        key = json.dumps([asdict(c) for c in configs] + [cfg.rollout.engine_num_cpus], sort_keys=True, default=str)
        generation, handles = self.engines.pop(key, (None, None))
        if generation != self.shared.generation or not self._alive(handles):
            handles = [engine_actor(cfg.rollout.engine_num_cpus).remote(c) for c in configs]
            ray.get([h.ready.remote() for h in handles])
        self.engines[key] = (self.shared.generation, handles)  # most recently used last
        while len(self.engines) > self.keep:
            gen, old = self.engines.pop(next(iter(self.engines)))
            if gen == self.shared.generation:
                for h in old:
                    ray.kill(h)
        return handles

    @staticmethod
    def _alive(handles: list) -> bool:
        import ray

        try:
            ray.get([h.get_version.remote() for h in handles], timeout=30)
            return True
        except Exception:  # noqa: BLE001 - killed by a test, or never started
            return False


@pytest.fixture(scope="session")
def warm_engines(shared_ray):
    return WarmEngines(shared_ray)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def train(tmp_path, cache_dir, warm_engines):
    """train(*overrides, run_dir=None, on_step=None, warm=True) -> metrics rows: `python -m rl.train`'s
    run in this process (logger=console, the session's model cache), on a warm engine unless warm=False."""
    from omegaconf import OmegaConf

    from rl.cli import compose
    from rl.run import run_training

    def run(*overrides, run_dir=None, on_step=None, warm=True):
        run_dir = Path(run_dir or tmp_path / "run")
        cfg = OmegaConf.to_object(compose(["logger=console", "logger.progress=false", f"cache_dir={cache_dir}",
                                           f"run_dir={run_dir}", *overrides]))
        engines = warm_engines.get(cfg) if warm else None
        warm_engines.shared.ensure()
        run_training(cfg, run_dir, on_step=on_step, engines=engines)
        return metrics_rows(run_dir)

    return run


def short_tmp() -> str:
    """Ray's socket paths must stay under 107 bytes: keep its temp dir short."""
    import tempfile

    return tempfile.mkdtemp(prefix="qr", dir="/tmp")


def cli_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp_path), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)})
    return env
