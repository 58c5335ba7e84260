"""Weight sync by collective broadcast: learner rank 0 -> every engine worker, one size-capped bucket
at a time, over a process group of its own (gloo on CPU machines; the same code runs NCCL with
tensors on the GPU). Each (gathered) tensor is copied into one reusable send buffer at once, so
under ZeRO-3 no rank ever holds the whole model."""
from __future__ import annotations

from datetime import timedelta

import torch

from sync.base import Transport
from sync.buckets import SendBuffer, unpack


def init_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0):
    """A process group of its own (a TCPStore at host:port hosted by rank 0), leaving
    torch.distributed's default group alone: the learner ranks and vLLM's workers each have theirs.
    backend: gloo (CPU tensors) or nccl (CUDA tensors)."""
    from torch.distributed import PrefixStore, TCPStore

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    prefix = PrefixStore(f"qrl-weights-{host}:{port}", store)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(prefix, rank, world_size, timeout)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(prefix, rank, world_size, opts)
    raise ValueError(f"weight-transfer backend {backend!r}; use gloo or nccl")


def broadcast(group, buf: torch.Tensor) -> None:
    """`buf` from rank 0 of `group` to every other rank (in place)."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buf], opts).wait()


class Broadcast(Transport):
    name = "broadcast"
    engines_restartable = False
    no_restart_reason = ("learner.sync_transport=broadcast (its process group includes the dead engine's worker); "
                         "use learner.sync_transport=object_store to let engines restart")
    group = None  # the process group, once `connect` (sender) or `join` (receiver) formed it
    num_engines = 0  # sender: the engines in it

    def connect(self, engines: list) -> None:
        """Form the process group: learner rank 0 is rank 0, engine i's worker rank i + 1."""
        import ray

        from common.net import free_port

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        host, port, world = ray.util.get_node_ip_address(), free_port(""), len(engines) + 1
        joined = [e.join_transport.remote(self.name, host, port, i + 1, world, backend) for i, e in enumerate(engines)]
        self.group = init_group(host, port, 0, world, backend)
        ray.get(joined)
        self.num_engines = len(engines)

    def send(self, weights, engines: list, version: int) -> dict:
        import ray

        if self.group is None or len(engines) != self.num_engines:
            raise RuntimeError(f"broadcast sync to {len(engines)} engine(s), but learner.connect_engines formed the "
                               f"process group with {self.num_engines}: a broadcast reaches exactly those engines")
        buf = SendBuffer(self.bucket_bytes, self.device)
        stats = {"sync/bytes": 0, "sync/buckets": 0}

        def flush():
            data, meta, nbytes = buf.take()
            received = [e.receive_weights.remote(self.name, version, meta, nbytes) for e in engines]
            broadcast(self.group, data)
            ray.get(received)
            stats["sync/buckets"] += 1
            stats["sync/bytes"] += sum(m[4] for m in meta)

        for name, t in weights:
            if buf.used and not buf.fits(t):
                flush()
            buf.add(name, t)  # still inside the ZeRO-3 gather of its module
        if buf.used:
            flush()
        return stats

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.group = init_group(host, port, rank, world_size, backend)

    def receive(self, meta: list, nbytes: int) -> list:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        broadcast(self.group, buf)
        return unpack(buf, meta)
