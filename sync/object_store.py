"""Weight sync through Ray's shared-memory object store: each bucket of (name, tensor) pairs is put
once and every engine reads it from there (zero-copy on its node)."""
from __future__ import annotations

from sync.base import Transport

MAX_IN_FLIGHT = 2  # buckets in the object store at a time: the learner's extra memory is two buckets


class ObjectStore(Transport):
    name = "object_store"

    def send(self, weights, engines: list, version: int) -> dict:
        import ray

        bucket, size, in_flight = [], 0, []
        stats = {"sync/bytes": 0, "sync/buckets": 0}

        def flush():
            nonlocal bucket, size
            ref = ray.put(bucket)
            in_flight.append([e.receive_weights.remote(self.name, version, ref) for e in engines])
            stats["sync/buckets"] += 1
            while len(in_flight) > MAX_IN_FLIGHT:
                ray.get(in_flight.pop(0))
            bucket, size = [], 0

        for name, t in weights:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                flush()
            bucket.append((name, t.detach().to("cpu", copy=True)))
            size += nbytes
            stats["sync/bytes"] += nbytes
        if bucket:
            flush()
        for refs in in_flight:
            ray.get(refs)
        return stats

    def receive(self, bucket: list) -> list:
        return bucket
