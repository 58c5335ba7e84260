import os
from dataclasses import asdict
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    tmp = Path(short_tmp())
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    ray.init(num_cpus=2, _temp_dir=str(tmp), include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="WARNING")
    yield ray
    ray.shutdown()


def short_tmp() -> str:
    """Ray's socket paths must stay under 107 bytes: keep its temp dir short."""
    import tempfile

    return tempfile.mkdtemp(prefix="qr", dir="/tmp")


def cli_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp_path), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)})
    return env
