"""Token logprobs (+ entropy) for a 248K-vocab head on a long sequence: the naive path (full
[tokens x vocab] fp32 logits) against rl/logprobs.py's chunked path (one chunk of logits alive,
checkpointed for backward), same inputs, same run. Reports peak memory above the inputs, time, and
the largest differences in logprobs, entropy and d(loss)/d(hidden).

Qwen3.5-0.8B-shaped head: hidden 1024, vocab 248,320, tied bf16 weights.

    python bench/chunked_logprobs.py --tokens 8192 --suffix _8k     # GPU if present
    python bench/chunked_logprobs.py --tokens 32768 --chunks 512,1024,4096 --suffix _32k
        # -> bench/results/chunked_logprobs{suffix}.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
HIDDEN, VOCAB = 1024, 248320


class HeadOnly(torch.nn.Module):
    """Quacks like a *ForCausalLM for rl.logprobs: `.model(...)` returns given hidden states."""

    def __init__(self, head: torch.nn.Linear, hidden: torch.Tensor):
        super().__init__()
        self.lm_head, self._h = head, hidden
        self.model = lambda input_ids, use_cache=False: SimpleNamespace(last_hidden_state=self._h)

    def get_output_embeddings(self):
        return self.lm_head


def naive(head, h, ids):
    logits = head(h[:, :-1]).float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def measure(fn, dev):
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    sync()
    t0 = time.perf_counter()
    lp, ent, grad = fn()
    sync()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None
    return lp, ent, grad, dt, peak


def main() -> None:
    from rl.logprobs import token_logprobs

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunks", default="512,1024,2048,4096")
    ap.add_argument("--suffix", default="", help="results file name suffix, e.g. _8k")
    args = ap.parse_args()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=dev, dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.02)
    ids = torch.randint(0, VOCAB, (1, args.tokens), device=dev)
    h0 = torch.randn(1, args.tokens, HIDDEN, device=dev, dtype=torch.bfloat16)

    def run_naive():
        h = h0.clone().requires_grad_(True)
        lp, ent = naive(head, h, ids)
        (lp.sum() + 0.01 * ent.sum()).backward()
        return lp.detach(), ent.detach(), h.grad

    def run_chunked(chunk):
        def fn():
            h = h0.clone().requires_grad_(True)
            lp, ent = token_logprobs(HeadOnly(head, h), ids, chunk, with_entropy=True)
            (lp.sum() + 0.01 * ent.sum()).backward()
            return lp.detach(), ent.detach(), h.grad
        return fn

    chunks = list(map(int, args.chunks.split(",")))
    run_chunked(chunks[0])()  # warm-up (kernel selection, allocator)
    head.weight.grad = None
    rows = {}
    try:
        lp0, ent0, g0, t_naive, peak_naive = measure(run_naive, dev)
        rows["naive"] = {"s": t_naive, "peak_bytes": peak_naive}
        reference = "naive"
    except torch.OutOfMemoryError:
        rows["naive"] = {"s": None, "peak_bytes": None, "oom": True}
        torch.cuda.empty_cache()
        lp0, ent0, g0, _, _ = measure(run_chunked(chunks[0]), dev)  # differences against the smallest chunk
        reference = f"chunk_{chunks[0]}"
    head.weight.grad = None
    for chunk in chunks:
        lp, ent, g, dt, peak = measure(run_chunked(chunk), dev)
        head.weight.grad = None
        rows[f"chunk_{chunk}"] = {"s": dt, "peak_bytes": peak, "max_abs_dlogprob": float((lp - lp0).abs().max()),
                                  "max_abs_dentropy": float((ent - ent0).abs().max()),
                                  "max_abs_dgrad_hidden": float((g.float() - g0.float()).abs().max()),
                                  "grad_hidden_scale": float(g0.float().abs().max())}
    out = {"command": f"python bench/chunked_logprobs.py --tokens {args.tokens}", "device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"),
           "torch": torch.__version__, "tokens": args.tokens, "hidden": HIDDEN, "vocab": VOCAB,
           "full_fp32_logits_bytes": args.tokens * VOCAB * 4, "differences_against": reference, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"chunked_logprobs{args.suffix}.json").write_text(json.dumps(out, indent=2))
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "n/a"  # noqa: E731
    lines = [f"# Chunked vs naive token logprobs + entropy, forward and backward ({out['device']}, torch {out['torch']})", "",
             f"Command: `{out['command']}`", "",
             f"Qwen3.5-0.8B-shaped head (hidden {HIDDEN}, vocab {VOCAB}, bf16), one sequence of {args.tokens} tokens; "
             f"the full fp32 logits alone are {out['full_fp32_logits_bytes'] / 2**30:.1f} GiB. Peak = GPU memory allocated above the inputs. "
             f"Differences are against `{reference}`.", "",
             "| path | time s | peak GiB | max abs Δ logprob | max abs Δ entropy | max abs Δ grad(hidden) (scale) |", "|---|---|---|---|---|---|",
             ("| naive | out of memory | - | - | - | - |" if rows["naive"].get("oom") else
              f"| naive | {rows['naive']['s']:.3f} | {gib(rows['naive']['peak_bytes'])} | - | - | - |")]
    for k, r in rows.items():
        if k != "naive":
            lines.append(f"| {k.replace('_', ' ')} tokens | {r['s']:.3f} | {gib(r['peak_bytes'])} | {r['max_abs_dlogprob']:.2e} | "
                         f"{r['max_abs_dentropy']:.2e} | {r['max_abs_dgrad_hidden']:.2e} ({r['grad_hidden_scale']:.2e}) |")
    (RESULTS / f"chunked_logprobs{args.suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
