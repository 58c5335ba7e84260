"""Broadcast weight sync over NCCL between two GPUs, with the platform's own transfer code
(sync/broadcast.py, sync/buckets.py): rank 0 (the learner's role) packs a Qwen3.5-0.8B-shaped bf16
state dict into size-capped buckets and broadcasts them; rank 1 (the engine worker's role) receives,
unpacks and copies every tensor into its own parameter. Checked exact (per-tensor checksums), timed
against a device-to-device copy and a GPU0 -> GPU1 peer copy of the same bytes in the same run.
vLLM itself is too large to carry to the GPU machine, so the receiver is a plain process.

    python bench/gpu_broadcast.py       # on a 2-GPU machine -> bench/results/gpu_broadcast.{json,md}
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
BUCKETS_MB = [64, 256, 1024]
REPEATS = 3


def shapes() -> dict[str, tuple]:
    """Parameter shapes of a Qwen3.5-0.8B-shaped text model (24 layers, hidden 1024, 248K vocab)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                            linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                            tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _rank(rank: int, port: int, out) -> None:
    from sync.broadcast import broadcast, init_group
    from sync.buckets import SendBuffer, unpack

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    group = init_group("127.0.0.1", port, rank, 2, "nccl")
    g = torch.Generator(device=dev).manual_seed(0)
    params = {n: torch.randn(s, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16) if rank == 0
              else torch.zeros(s, device=dev, dtype=torch.bfloat16) for n, s in shapes().items()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    res = {"bytes": total, "params": sum(p.numel() for p in params.values())}
    for mb in BUCKETS_MB:
        times = []
        for _ in range(REPEATS + 1):  # first round warms NCCL up
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            if rank == 0:
                sb = SendBuffer(mb << 20, dev)
                for name, p in params.items():
                    if sb.used and not sb.fits(p):
                        buf, meta, n = sb.take()
                        _send(group, buf, meta, n, dev)
                    sb.add(name, p)
                buf, meta, n = sb.take()
                _send(group, buf, meta, n, dev)
                _send_done(group, dev)
            else:
                while True:
                    header = torch.zeros(2, dtype=torch.int64, device=dev)
                    broadcast(group, header)
                    if int(header[0]) < 0:
                        break
                    meta_buf = torch.zeros(int(header[1]), dtype=torch.uint8, device=dev)
                    broadcast(group, meta_buf)
                    meta = json.loads(bytes(meta_buf.cpu().tolist()).decode())
                    buf = torch.empty(int(header[0]), dtype=torch.uint8, device=dev)
                    broadcast(group, buf)
                    for name, t in unpack(buf, meta):
                        params[name].copy_(t)  # what the engine's weight load does
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        res[f"bucket_{mb}MiB_s"] = statistics.median(times[1:])
    sums = {n: float(p.double().sum()) for n, p in params.items()}
    res["checksums"] = sums
    if rank == 0:  # baselines: one device copy and one peer copy of the same bytes
        flat = torch.empty(total, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(flat)
        peer = torch.empty(total, dtype=torch.uint8, device=torch.device("cuda", 1))
        for key, fn in (("d2d_copy_s", lambda: dst.copy_(flat)), ("peer_copy_s", lambda: peer.copy_(flat))):
            ts = []
            for _ in range(REPEATS + 1):
                torch.cuda.synchronize(dev)
                torch.cuda.synchronize(1)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(dev)
                torch.cuda.synchronize(1)
                ts.append(time.perf_counter() - t0)
            res[key] = statistics.median(ts[1:])
    out[rank] = res


def _send(group, buf, meta, nbytes, dev):
    from sync.broadcast import broadcast

    meta_bytes = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8, device=dev)
    broadcast(group, torch.tensor([nbytes, meta_bytes.numel()], dtype=torch.int64, device=dev))
    broadcast(group, meta_bytes)
    broadcast(group, buf)


def _send_done(group, dev):
    from sync.broadcast import broadcast

    broadcast(group, torch.tensor([-1, 0], dtype=torch.int64, device=dev))


def main() -> None:
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(port, out), nprocs=2, start_method="spawn")
        out = dict(out)
    send, recv = out[0], out[1]
    exact = send["checksums"] == recv["checksums"]
    total = send["bytes"]
    rows = {mb: {"s": recv[f"bucket_{mb}MiB_s"], "GBps": total / recv[f"bucket_{mb}MiB_s"] / 1e9,
                 "vs_peer_copy": recv[f"bucket_{mb}MiB_s"] / send["peer_copy_s"]} for mb in BUCKETS_MB}
    result = {"command": "python bench/gpu_broadcast.py", "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "params": send["params"], "bytes": total, "exact": exact,
              "d2d_copy_GBps": total / send["d2d_copy_s"] / 1e9, "peer_copy_GBps": total / send["peer_copy_s"] / 1e9,
              "broadcast": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_broadcast.json").write_text(json.dumps(result, indent=2))
    lines = [f"# NCCL broadcast weight sync, {result['gpu']} x2 (torch {result['torch']}, NCCL {result['nccl']})", "",
             "Command: `python bench/gpu_broadcast.py` (on the lent 2-GPU machine)", "",
             f"Qwen3.5-0.8B-shaped state dict: {send['params'] / 1e6:.0f}M parameters, {total / 1e9:.2f} GB bf16. "
             "Sender packs size-capped buckets (sync/buckets.py) and broadcasts; receiver unpacks and copies into "
             f"its parameters. Exact (per-tensor checksums equal): **{exact}**.", "",
             f"Baselines, same run: device-to-device copy {result['d2d_copy_GBps']:.0f} GB/s, GPU0 -> GPU1 peer copy "
             f"{result['peer_copy_GBps']:.0f} GB/s.", "",
             "| bucket | sync s | GB/s | time vs peer copy |", "|---|---|---|---|"]
    for mb, r in rows.items():
        lines.append(f"| {mb} MiB | {r['s']:.4f} | {r['GBps']:.1f} | {r['vs_peer_copy']:.2f}x |")
    (RESULTS / "gpu_broadcast.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
