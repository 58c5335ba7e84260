"""The weight-sync transports' parts (sync/) without Ray or vLLM: the registry and the bucket size
(`learner.sync_transport`, `learner.sync_bucket_mb`), and the broadcast primitives across real
processes over gloo: packing into one send buffer, a tensor larger than the bucket cap, mixed dtypes,
exact unpacking on every receiver. The same code runs over NCCL with CUDA tensors
(bench/gpu_broadcast.py). Whole syncs into vLLM engines: tests/test_weight_sync.py."""
import math

import pytest
import torch
import torch.multiprocessing as mp

from common.net import free_port
from sync import TRANSPORTS, bucket_bytes, get_transport
from sync.broadcast import broadcast, init_group
from sync.buckets import ALIGN, SendBuffer, unpack

CAP = 4096


def tensors():
    g = torch.Generator().manual_seed(0)
    return [("w1", torch.randn(3, 5, generator=g)), ("ids", torch.arange(7, dtype=torch.int64)),
            ("half", torch.randn(100, generator=g).to(torch.bfloat16)),
            ("big", torch.randn(64, 64, generator=g)),  # 16 KiB > cap: a bucket of its own
            ("tail", torch.randn(10, generator=g))]


def buckets():
    """Fill buffers the way the learner does: flush when the next tensor does not fit."""
    sb, out = SendBuffer(CAP, torch.device("cpu")), []
    for name, t in tensors():
        if sb.used and not sb.fits(t):
            out.append(sb.take())
        sb.add(name, t)
    out.append(sb.take())
    return [(buf.clone(), meta, n) for buf, meta, n in out]


def _rank(rank, port, world, results):
    group = init_group("127.0.0.1", port, rank, world, "gloo", timeout_s=60)
    got = {}
    for buf, meta, nbytes in buckets():
        recv = buf if rank == 0 else torch.zeros(nbytes, dtype=torch.uint8)
        broadcast(group, recv)
        got.update(dict(unpack(recv, meta)))
    results[rank] = {n: t.clone() for n, t in got.items()}


@pytest.mark.slow
def test_broadcast_buckets_arrive_exactly_on_every_rank():
    port = free_port("")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(port, 3, results), nprocs=3, start_method="spawn")
        results = dict(results)
    expected = dict(tensors())
    assert sorted(results) == [0, 1, 2]
    for rank, got in results.items():
        assert set(got) == set(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (rank, name)


def test_send_buffer_layout():
    bs = buckets()
    assert len(bs) == 3  # [w1, ids, half] | [big] alone | [tail]
    assert [m[0] for m in bs[0][1]] == ["w1", "ids", "half"] and [m[0] for m in bs[1][1]] == ["big"]
    for _, meta, nbytes in bs:
        assert all(off % ALIGN == 0 for _, _, _, off, _ in meta) and nbytes % ALIGN == 0
    assert bs[1][2] >= 64 * 64 * 4 > CAP


def test_registry_names_every_transport_and_rejects_unknown_ones():
    assert all(cls.name == key for key, cls in TRANSPORTS.items())
    assert get_transport("broadcast") is TRANSPORTS["broadcast"]
    assert get_transport("object_store").engines_restartable
    broadcast_cls = get_transport("broadcast")
    assert not broadcast_cls.engines_restartable and "sync_transport=object_store" in broadcast_cls.no_restart_reason
    with pytest.raises(ValueError, match=r"learner.sync_transport='nccl'.*object_store, broadcast"):
        get_transport("nccl")


@pytest.mark.parametrize("bad", [0, -1, -0.5, math.nan, math.inf, "64", None])
def test_bucket_size_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="learner.sync_bucket_mb"):
        bucket_bytes(bad)


def test_bucket_size_in_bytes():
    assert bucket_bytes(64) == 64 << 20 and bucket_bytes(0.5) == 1 << 19
