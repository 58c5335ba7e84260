"""Weight-sync bandwidth, learner -> one vLLM engine, for several model sizes, against a plain memory
copy of the same bytes measured in the same run.

Transports: `object_store` (buckets through Ray's shared-memory object store) and `broadcast`
(a gloo process group of learner rank 0 and the engine worker: the code path NCCL uses on GPUs).
Each sync = transfer of all buckets + the engine's load (vLLM `reload_weights`, which re-runs its
weight processing); both are reported. Models: tiny Qwen3 (fp32 engine) of growing width/depth.

    .venv/bin/python bench/weight_sync.py    # -> bench/results/weight_sync.{json,md}
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
SIZES = {  # name: (hidden, layers)
    "h256-l8": (256, 8),
    "h512-l8": (512, 8),
    "h1024-l8": (1024, 8),
    "h1024-l16": (1024, 16),
}
REPEATS, BUCKET_MB = 3, 64.0


def memcpy_s(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import ray

    from policies.build import resolve_policy_path
    from policies.tiny import TinySpec
    from common.net import free_port
    from rl.learner import Learner
    from rl.settings import algo_settings, learner_settings
    from rollout.engine import engine_actor
    from rl.settings import engine_config

    tmp = Path(tempfile.mkdtemp(prefix="qrl-bench-sync-"))
    ray_tmp = tempfile.mkdtemp(prefix="qrs", dir="/tmp")
    ray.init(num_cpus=4, _temp_dir=ray_tmp, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}})
    rows = {}
    for name, (hidden, layers) in SIZES.items():
        spec = TinySpec(family="qwen3", hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1), head_dim=64,
                        initializer_range=0.02)
        path = resolve_policy_path("tiny:bench", asdict(spec), tmp / "cache")
        eng = engine_actor(num_cpus=1).remote(engine_config(model=path, dtype="float32", max_model_len=256))
        ray.get(eng.ready.remote())
        res = {}
        version = 0
        for transport in ("object_store", "broadcast"):  # a learner per transport (learner.sync_transport)
            settings = learner_settings(micro_batch_size=1, zero_stage=2, sync_transport=transport,
                                        sync_bucket_mb=BUCKET_MB)
            learner = ray.remote(num_cpus=1)(Learner).remote(path, settings, algo_settings(), 0, 1, "127.0.0.1",
                                                              free_port(), 1)
            ray.get(learner.connect_engines.remote([eng]))
            runs = []
            for _ in range(REPEATS):
                version += 1
                runs.append(ray.get(learner.push_weights.remote([eng], version)))
            ray.kill(learner)
            total = runs[0]["sync/bytes"]
            sync_s = statistics.median(r["sync/s"] for r in runs)
            load_s = statistics.median(r["sync/engine_load_s"] for r in runs)
            res[transport] = {"sync_s": sync_s, "engine_load_s": load_s, "transfer_s": sync_s - load_s,
                              "buckets": runs[0]["sync/buckets"], "bytes": total}
        copy_s = memcpy_s(res["object_store"]["bytes"])
        for r in res.values():
            r["transfer_GBps"] = r["bytes"] / r["transfer_s"] / 1e9
            r["sync_GBps"] = r["bytes"] / r["sync_s"] / 1e9
            r["transfer_vs_memcpy"] = r["transfer_s"] / copy_s
        rows[name] = {"params_M": res["object_store"]["bytes"] / 4 / 1e6, "bytes": res["object_store"]["bytes"],
                      "memcpy_s": copy_s, "memcpy_GBps": res["object_store"]["bytes"] / copy_s / 1e9, **res}
        print(name, json.dumps(rows[name]), flush=True)
        ray.kill(eng)
    ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "weight_sync.json").write_text(json.dumps({"command": "python bench/weight_sync.py",
                                                          "bucket_mb": BUCKET_MB, "repeats": REPEATS,
                                                          "results": rows}, indent=2))
    lines = ["# Weight sync: learner -> vLLM engine (2-core CPU, fp32 Qwen3, 64 MiB buckets, median of 3)", "",
             "Command: `.venv/bin/python bench/weight_sync.py`", "",
             "transfer = all buckets delivered into the engine process; load = vLLM `reload_weights` of them "
             "(re-runs its weight processing); memcpy = one plain copy of the same bytes in this run.", "",
             "| model | params | MB | memcpy GB/s | transport | buckets | transfer s | transfer GB/s | transfer / memcpy | load s | sync total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for transport in ("object_store", "broadcast"):
            t = r[transport]
            lines.append(f"| {name} | {r['params_M']:.1f}M | {r['bytes'] / 1e6:.0f} | {r['memcpy_GBps']:.1f} | {transport} | "
                         f"{t['buckets']} | {t['transfer_s']:.3f} | {t['transfer_GBps']:.2f} | {t['transfer_vs_memcpy']:.1f}x | "
                         f"{t['engine_load_s']:.3f} | {t['sync_s']:.3f} |")
    (RESULTS / "weight_sync.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
