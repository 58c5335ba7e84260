"""Weight transfer by collective broadcast: learner rank 0 -> every engine worker, one size-capped
bucket at a time, over a process group of its own (gloo on CPU machines; the same code runs NCCL
with tensors on the GPU). Under ZeRO-3 each module's parameters are gathered and copied straight
into the fixed send buffer inside the gather, so no rank ever holds the whole model.

Both ends share `pack_meta` / `unpack` so that a bucket is described once: (name, dtype, shape,
byte offset, byte size) for every tensor in the flat uint8 buffer.
"""
from __future__ import annotations

from datetime import timedelta

import torch

ALIGN = 64  # bytes: every tensor starts at an offset that any dtype view accepts


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buf], opts).wait()


def unpack(buf: torch.Tensor, meta: list) -> list[tuple[str, torch.Tensor]]:
    """Views into `buf` (uint8) for every (name, dtype, shape, offset, nbytes) of `meta`."""
    out = []
    for name, dtype, shape, off, nbytes in meta:
        out.append((name, buf[off:off + nbytes].view(getattr(torch, dtype)).view(shape)))
    return out


class SendBuffer:
    """A reusable flat buffer of `cap` bytes; `add` copies a tensor in (returns False when it does
    not fit: flush first). A tensor larger than the cap gets a buffer of its own."""

    def __init__(self, cap: int, device: torch.device):
        self.cap, self.device = cap, device
        self.buf = torch.empty(cap, dtype=torch.uint8, device=device)
        self.meta: list = []
        self.used = 0

    def fits(self, t: torch.Tensor) -> bool:
        return self.used + _aligned(t.numel() * t.element_size()) <= self.cap

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if nbytes > self.cap - self.used:
            if self.used:
                raise ValueError("flush before adding a tensor that does not fit")
            self.buf = torch.empty(_aligned(nbytes), dtype=torch.uint8, device=self.device)  # oversized tensor
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        self.buf[self.used:self.used + nbytes].copy_(flat)
        self.meta.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), self.used, nbytes))
        self.used += _aligned(nbytes)

    def take(self) -> tuple[torch.Tensor, list, int]:
        """(buffer slice to send, meta, bytes) and reset."""
        out = (self.buf[:self.used], self.meta, self.used)
        if self.buf.numel() > self.cap:
            self.buf = torch.empty(self.cap, dtype=torch.uint8, device=self.device)
        self.meta, self.used = [], 0
        return out
