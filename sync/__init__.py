"""Weight sync: the one seam between the learner and the engines for moving weights (learner rank 0
-> every vLLM engine). `learner.sync_transport` picks a transport by its key in TRANSPORTS;
`learner.sync_bucket_mb` caps its buckets (`bucket_bytes`). The learner (rl/learner.py), the engine
actor (rollout/engine.py) and its vLLM worker extension (rollout/vllm_ext.py) reach transports only
through this registry; sync/ itself imports none of them.

Adding a transport (CUDA IPC, NCCL, ...) touches exactly two places:
  1. a new file sync/<name>.py with `class <Name>(Transport)` (sync/base.py): `name = "<name>"`,
     `send` (learner rank 0) and `receive` (each engine worker); `connect` / `join` when it needs a
     setup step once the engines are ready; `engines_restartable = False` and
     `no_restart_reason` when a dead engine breaks it;
  2. one line in TRANSPORTS below: `"<name>": <Name>,` (and its import above it).
Config validation (rl/config.py) then accepts `learner.sync_transport=<name>`.
"""
from sync.base import Transport
from sync.broadcast import Broadcast
from sync.buckets import bucket_bytes
from sync.object_store import ObjectStore

TRANSPORTS: dict[str, type[Transport]] = {
    "object_store": ObjectStore,
    "broadcast": Broadcast,
}


def get_transport(name: str) -> type[Transport]:
    """The transport class registered under `name` (ValueError naming the choices otherwise)."""
    if name not in TRANSPORTS:
        raise ValueError(f"learner.sync_transport={name!r}; use one of: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[name]


__all__ = ["TRANSPORTS", "Transport", "bucket_bytes", "get_transport"]
