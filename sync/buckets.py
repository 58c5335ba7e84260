"""What the transports share about buckets: their size cap (`learner.sync_bucket_mb`), and the flat
layout of a bucket that travels as one uint8 buffer: `SendBuffer` packs it, `unpack` reads it, and
both describe it once, as (name, dtype, shape, byte offset, byte size) for every tensor."""
from __future__ import annotations

import math

import torch

ALIGN = 64  # bytes: every tensor starts at an offset that any dtype view accepts
MiB = 1 << 20


def bucket_bytes(bucket_mb: float) -> int:
    """`learner.sync_bucket_mb` in bytes: the cap on one bucket (a tensor larger than it travels
    alone), the same for every transport."""
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not (
            math.isfinite(bucket_mb) and bucket_mb > 0):
        raise ValueError(f"learner.sync_bucket_mb={bucket_mb!r}; use a finite number of MiB > 0 "
                         "(e.g. 64 on CPU, 512 on GPU)")
    return int(bucket_mb * MiB)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def unpack(buf: torch.Tensor, meta: list) -> list[tuple[str, torch.Tensor]]:
    """Views into `buf` (uint8) for every (name, dtype, shape, offset, nbytes) of `meta`."""
    return [(name, buf[off:off + nbytes].view(getattr(torch, dtype)).view(shape))
            for name, dtype, shape, off, nbytes in meta]


class SendBuffer:
    """A reusable flat buffer of `cap` bytes; `add` copies a tensor in (flush first when it does
    not `fit`). A tensor larger than the cap gets a buffer of its own."""

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
