"""The learner at GPU speed: the platform's own DeepSpeed bf16 GRPO learner (rl/learner.py) on a
Qwen3.5-0.8B-shaped model (random weights), fast kernels against the PyTorch fallback, same run.

Phases (one process, results written after each step of the way so a cut-off run keeps them):
1. software versions and the measured bf16 matmul peak;
2. correctness before timing: fla's Gated DeltaNet kernel (forward + gradients, packed rows with
   cu_seqlens) and each fused kernel the learner uses (RMSNorm, gated RMSNorm, SwiGLU, varlen causal
   conv, LM head -> logprobs + entropy) against a float64 reference, next to the PyTorch bf16 path's
   own error against the same reference (the bf16 tolerance);
3. learner variants: `Learner.train()` (forward, GRPO loss, backward, optimizer step) on synthetic
   rollouts, tokens/s, MFU = 6 * N * tokens/s / 790 TFLOP/s (the H200's measured bf16 matmul peak),
   peak memory; `torch` (PyTorch ops everywhere: the fallback) is measured in the same run.

    python bench/learner_gpu.py                       # everything, 0.8b shape (GPU)
    python bench/learner_gpu.py --variants torch,auto --skip-checks
    python bench/learner_gpu.py --shape small --variants torch --samples 4 --length 256 --prompt 64   # CPU smoke run
        # -> bench/results/learner_gpu{suffix}.{json,md} (and $OUT when set)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
T0 = time.perf_counter()  # progress lines carry the seconds since start: a slow phase shows in the log
PEAK_TFLOPS = 790.0  # H200 bf16 matmul on random data, 8192^3 (measured here: 769-798)

# name -> LearnerSettings fields; `torch` is the fallback, `auto` the platform's GPU default
VARIANTS = {
    "torch": dict(kernels="torch", fused_logprobs=False, fused_optimizer=False),
    "gdn": dict(kernels="gdn", fused_logprobs=False, fused_optimizer=False),
    "gdn+logprobs": dict(kernels="gdn", fused_logprobs=True, fused_optimizer=False),
    "gdn+logprobs+adamw": dict(kernels="gdn", fused_logprobs=True, fused_optimizer=True),
    "auto": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True),
    "auto+ckpt": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, gradient_checkpointing=True),
    "auto+micro16": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, micro_batch_size=16),
    "auto+zero0": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, zero_stage=0),
    "auto+unpacked": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, packing=False),
    "auto+micro32": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, micro_batch_size=32),
    "auto+micro16-conv": dict(kernels="gdn,rms_norm,rms_norm_gated,swiglu", fused_logprobs=True, fused_optimizer=True,
                              micro_batch_size=16),
    "auto+micro16+ckpt": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, micro_batch_size=16,
                              gradient_checkpointing=True),
    "auto+micro16+keep": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, micro_batch_size=16,
                              keep_head_logits=True),
    "auto+keep": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, keep_head_logits=True),
    "auto+micro16+keep+ds-step": dict(kernels="auto", fused_logprobs=True, fused_optimizer=True, micro_batch_size=16,
                                      keep_head_logits=True, _deepspeed_step=True),
}
DESCRIBE = {
    "torch": "PyTorch everywhere (transformers' ops, PyTorch chunked delta rule, chunked fp32 logprobs, AdamW)",
    "gdn": "+ fla's Gated DeltaNet chunk kernel (tilelang backward on Hopper)",
    "gdn+logprobs": "+ fused LM head -> logprobs (Triton, no fp32 logits, rl/fused_logprobs.py)",
    "gdn+logprobs+adamw": "+ torch fused AdamW",
    "auto": "+ fla fused RMSNorm, gated RMSNorm, SwiGLU, varlen causal conv (learner.kernels=auto: the default)",
    "auto+ckpt": "auto + activation checkpointing",
    "auto+micro16": "auto with 16 samples per micro-batch",
    "auto+zero0": "auto with ZeRO stage 0 (bf16 optimizer, no partitioning; one GPU now runs stage 0 anyway)",
    "auto+unpacked": "auto with right-padded micro-batches (learner.packing=false)",
    "auto+micro32": "auto with 32 samples per micro-batch",
    "auto+micro16-conv": "auto+micro16 with the PyTorch conv (F.conv1d + per-sample fix-ups) instead of fla's",
    "auto+micro16+ckpt": "auto+micro16 + activation checkpointing",
    "auto+micro16+keep": "auto+micro16, the LM head's logits kept for backward (learner.keep_head_logits)",
    "auto+keep": "auto, the LM head's logits kept for backward",
    "auto+micro16+keep+ds-step": "auto+micro16+keep with DeepSpeed's own stage-0 step (per-parameter inf/NaN check, "
                                 "per-parameter step, gradient all-reduce) instead of rl/ds_worker.py's multi-tensor one",
}


class Results:
    """Accumulates results and rewrites the json/md files (and copies under $OUT) after every update."""

    def __init__(self, stem: Path, meta: dict):
        self.stem, self.data = stem, {**meta, "checks": {}, "variants": {}}

    def update(self, section: str, key: str, value) -> None:
        self.data[section][key] = value
        self.flush()

    def flush(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=2) + "\n"
        md = render_md(self.data)
        self.stem.with_suffix(".json").write_text(text)
        self.stem.with_suffix(".md").write_text(md)
        out = os.environ.get("OUT")
        if out:
            Path(out, self.stem.name + ".json").write_text(text)
            Path(out, self.stem.name + ".md").write_text(md)


def versions(dev: torch.device) -> dict:
    import importlib.metadata as md

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "deepspeed", "triton", "flash-linear-attention", "fla-core", "tilelang"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    if dev.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(dev)
        try:
            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            v["driver"] = None
    return v


def matmul_tflops(dev: torch.device, n: int = 8192, reps: int = 20) -> float | None:
    if dev.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(dev)
    return round(2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)


# ---------------------------------------------------------------- correctness (float64 references)
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _grads(fn, inputs: dict, upstream):
    """Run fn(**inputs) (leaf tensors), backprop `upstream` (a tensor or a tuple matching the outputs);
    returns (outputs, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    torch.autograd.backward([o for o in outs], [u.to(o.dtype) for o, u in zip(outs, ups)])
    return outs, {k: v.grad for k, v in leaves.items() if v.grad is not None}


def compare(name: str, fast, torch_bf16, ref, inputs: dict, upstream) -> dict:
    """Relative errors of `fast` and `torch_bf16` (bf16 inputs) against `ref` (float64 inputs)."""
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() and v.dtype == torch.float32 else v)
            for k, v in inputs.items()}
    keep32 = getattr(fast, "keep_fp32", ())
    for k in keep32:  # inputs the model keeps in fp32 (e.g. the GDN gate g)
        cast[k] = inputs[k]
    r_out, r_grad = _grads(ref, {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}, upstream)
    row = {}
    for label, fn in (("fast", fast), ("torch_bf16", torch_bf16)):
        if fn is None:
            continue
        o, g = _grads(fn, cast, upstream)
        errs = {f"out{i}": rel(a, b) for i, (a, b) in enumerate(zip(o, r_out))}
        errs.update({f"d{k}": rel(g[k], r_grad[k]) for k in r_grad if k in g})
        row[label] = {k: float(f"{v:.3e}") for k, v in errs.items()}
    worst_fast = max(row["fast"].values())
    worst_ref = max(row["torch_bf16"].values()) if "torch_bf16" in row else 0.0
    tol = max(1e-2, 2 * worst_ref)
    row.update({"worst_fast": worst_fast, "worst_torch_bf16": worst_ref, "tolerance": tol,
                "pass": bool(worst_fast == worst_fast and worst_fast <= tol)})
    print(f"[{time.perf_counter() - T0:.0f}s] check {name}: fast {worst_fast:.2e} torch-bf16 {worst_ref:.2e} tol {tol:.1e} -> "
          f"{'PASS' if row['pass'] else 'FAIL'}", flush=True)
    return row


def run_checks(dev: torch.device, res: Results, shape: dict) -> bool:
    import torch.nn.functional as F
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qm

    from policies import fast_kernels as fk
    from policies.gdn_varlen import pytorch_rule, varlen_causal_conv
    from rl.fused_logprobs import fused_head_logprobs
    from rl.logprobs import head_logprobs

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dev)

    H, Dk, Dv = shape["linear_num_key_heads"], shape["linear_key_head_dim"], shape["linear_value_head_dim"]
    lens = [300, 77, 645]
    cu = torch.tensor([0, 300, 377, 1022], dtype=torch.long, device=dev)
    N = sum(lens)
    ok = True

    # 1. the Gated DeltaNet rule on a packed row (fresh state per sample), forward and gradients
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    A_log = torch.log(torch.empty(H).uniform_(1, 16, generator=g)).to(dev)
    a_raw = rnd(1, N, H)
    inputs = {"q": rnd(1, N, H, Dk), "k": rnd(1, N, H, Dk), "v": rnd(1, N, H, Dv),
              "g": (-A_log.exp() * F.softplus(a_raw + 1.0)).float(), "beta": torch.sigmoid(rnd(1, N, H))}
    upstream = rnd(1, N, H, Dv)

    def per_sample(rule):
        def fn(q, k, v, g, beta):
            outs = []
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                o, _ = rule(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], initial_state=None,
                            output_final_state=False, use_qk_l2norm_in_kernel=True)
                outs.append(o)
            return torch.cat(outs, 1)
        return fn

    def fla_fn(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g=g, beta=beta, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)[0]

    fla_fn.keep_fp32 = ("g",)
    res.update("checks", "gated_deltanet_rule", compare(
        "gated_deltanet_rule (fla chunk, varlen)", fla_fn, per_sample(pytorch_rule(qm.torch_chunk_gated_delta_rule)),
        per_sample(pytorch_rule(qm.torch_recurrent_gated_delta_rule)), inputs, upstream))
    ok &= res.data["checks"]["gated_deltanet_rule"]["pass"]

    # 2. fused kernels the learner switches to (policies/fast_kernels.py, rl/fused_logprobs.py)
    Hd = shape["hidden_size"]
    from types import SimpleNamespace as NS

    from torch.func import functional_call

    def module_fn(cls, *args):  # the transformers module with its weight as an input (gradient checked too)
        m = cls(*args, eps=1e-6).to(dev)
        return lambda *xs, w: functional_call(m, {"weight": w}, xs)

    norm_t = module_fn(qm.Qwen3_5RMSNorm, Hd)
    res.update("checks", "rms_norm", compare(
        "rms_norm", lambda x, w: fk._rms_norm(NS(weight=w, eps=1e-6), x), lambda x, w: norm_t(x, w=w),
        lambda x, w: norm_t(x, w=w), {"x": rnd(4096, Hd), "w": (rnd(Hd) * 0.1).bfloat16().float()}, rnd(4096, Hd)))
    gnorm_t = module_fn(qm.Qwen3_5RMSNormGated, Dv)
    res.update("checks", "rms_norm_gated", compare(
        "rms_norm_gated", lambda x, z, w: fk._rms_norm_gated(NS(weight=w, variance_epsilon=1e-6), x, z),
        lambda x, z, w: gnorm_t(x, z, w=w), lambda x, z, w: gnorm_t(x, z, w=w),
        {"x": rnd(N * H, Dv), "z": rnd(N * H, Dv), "w": (1 + rnd(Dv) * 0.1).bfloat16().float()}, rnd(N * H, Dv)))
    from fla.modules.activations import swiglu

    inter = shape["intermediate_size"]
    res.update("checks", "swiglu", compare("swiglu", lambda a, b: swiglu(a, b), lambda a, b: F.silu(a) * b, lambda a, b: F.silu(a) * b,
                                           {"a": rnd(4096, inter), "b": rnd(4096, inter)}, rnd(4096, inter)))
    from fla.modules.causal_conv1d import causal_conv1d

    C = 2 * H * Dk + H * Dv
    conv_in = {"x": rnd(1, N, C), "w": rnd(C, 4, scale=0.5)}

    def conv_fast(x, w):
        return causal_conv1d(x, w, None, activation="silu", cu_seqlens=cu)[0]

    def conv_torch(x, w):
        return varlen_causal_conv(x[0].transpose(0, 1), w, None, "silu", cu).transpose(0, 1).unsqueeze(0)

    res.update("checks", "causal_conv_varlen", compare("causal_conv_varlen", conv_fast, conv_torch, conv_torch,
                                                       conv_in, rnd(1, N, C)))
    V, n_tok = shape["vocab_size"], 2048
    targets = torch.randint(0, V, (n_tok,), generator=g).to(dev)
    lp_in = {"h": rnd(n_tok, Hd), "w": rnd(V, Hd, scale=0.02)}

    class Head(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = w

        def forward(self, h):
            return h @ self.weight.t()

    def lp_torch(h, w):
        return head_logprobs(Head(w), h, targets, 1024, with_entropy=True)

    def lp_fast(h, w):
        return fused_head_logprobs(h, w, targets, 1024, with_entropy=True)

    def lp_kept(h, w):
        return fused_head_logprobs(h, w, targets, 1024, with_entropy=True, keep_logits=True)

    res.update("checks", "head_logprobs_entropy", compare(
        "head_logprobs_entropy (fused)", lp_fast, lp_torch, lp_torch, lp_in, (rnd(n_tok), rnd(n_tok))))
    res.update("checks", "head_logprobs_entropy_kept", compare(
        "head_logprobs_entropy (fused, logits kept)", lp_kept, lp_torch, lp_torch, lp_in, (rnd(n_tok), rnd(n_tok))))
    ok &= all(v["pass"] for v in res.data["checks"].values())
    return ok


# ---------------------------------------------------------------- learner variants
def build_model_folder(shape_name: str, folder: Path, dev: torch.device) -> int:
    """A random-weight Qwen3.5 of `shape_name` saved as an HF folder; returns its parameter count."""
    from bench.packing import SHAPES
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    s = SHAPES[shape_name]
    n = s["num_hidden_layers"]
    cfg = Qwen3_5TextConfig(layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)], **s)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen3_5ForCausalLM(cfg)
    count = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    if not (folder / "config.json").exists():
        model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32).save_pretrained(folder)
    del model
    return count


def synthetic_batch(samples: int, lengths: list[int], prompt: int, vocab: int, seed: int = 0) -> dict:
    """A GRPO batch as the controller builds it: right-padded ids, response loss mask, per-sequence
    advantages on response tokens (groups of 8 normalised)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (samples, T), generator=g)
    mask = torch.zeros(samples, T - 1)
    for i, L in enumerate(lengths):
        mask[i, prompt - 1 : L - 1] = 1
    adv = torch.randn(samples, generator=g)
    adv = (adv - adv.mean()) / adv.std().clamp_min(1e-6)
    return {"input_ids": ids, "lengths": torch.tensor(lengths), "loss_mask": mask,
            "advantages": adv.unsqueeze(1) * mask, "behaviour_logprobs": torch.zeros(samples, T - 1)}


@contextlib.contextmanager
def deepspeed_stage0_step():
    """Learners built inside keep DeepSpeed's stage-0 bf16 step as it ships (only the Adam start-up state
    is still dropped, a correctness fix without speed effect) and its gradient all-reduce: the baseline for
    rl/ds_worker.py's host-side fixes."""
    from rl import ds_worker

    real_fix, real_init = ds_worker.fix_unfused_optimizer, ds_worker.DeepSpeedWorker._initialize

    def init(self, model):
        real_init(self, model)
        self.engine.enable_backward_allreduce = True

    ds_worker.fix_unfused_optimizer = ds_worker.drop_startup_adam_state
    ds_worker.DeepSpeedWorker._initialize = init
    try:
        yield
    finally:
        ds_worker.fix_unfused_optimizer, ds_worker.DeepSpeedWorker._initialize = real_fix, real_init


def run_variant(name: str, folder: Path, n_params: int, a, dev: torch.device) -> dict:
    from rl.learner import Learner
    from rl.settings import algo_settings, learner_settings

    over = dict(VARIANTS[name])
    deepspeed_step = over.pop("_deepspeed_step", False)
    fields = dict(zero_stage=2, dtype="bfloat16" if dev.type == "cuda" else "float32", lr=1e-6,
                  micro_batch_size=a.micro, logprob_chunk_tokens=a.chunk, packing=True, gradient_checkpointing=False)
    fields.update(over)
    settings = learner_settings(**fields)
    t0 = time.perf_counter()
    with deepspeed_stage0_step() if deepspeed_step else contextlib.nullcontext():
        learner = Learner(str(folder), settings, algo_settings(), samples_per_step=a.samples)
    init_s = time.perf_counter() - t0
    lengths = lengths_for(a)
    batch = synthetic_batch(a.samples, lengths, a.prompt, learner.model.config.vocab_size)
    old_lp, _ = learner.score(batch)
    mask = batch["loss_mask"]
    batch["old_logprobs"] = old_lp
    batch["behaviour_logprobs"] = old_lp
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    steps = a.steps_slow if name == "torch" else a.steps
    for _ in range(a.warmup):
        learner.train(batch)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, issue, last = [], [], {}
    for _ in range(steps):
        t = time.perf_counter()
        last = learner.train(batch)
        sync()
        times.append(time.perf_counter() - t)
        issue.append(last.get("timing/learner_issue_s", 0.0))
    tokens = sum(lengths)
    step_s = statistics.median(times)
    tps = tokens / step_s
    row = {
        "settings": {k: fields[k] for k in sorted(fields)}, "describe": DESCRIBE.get(name, ""),
        "kernels_installed": getattr(learner, "kernels", {}), "init_s": round(init_s, 1),
        "tokens_per_step": tokens, "step_s": [round(x, 4) for x in times], "median_step_s": round(step_s, 4),
        "host_issue_s": [round(x, 4) for x in issue],  # host time queueing the step's work (see render_md)
        "tokens_per_s": round(tps, 1), "mfu": round(6 * n_params * tps / (PEAK_TFLOPS * 1e12), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "score_mean_logprob": round(float((old_lp * mask).sum() / mask.sum()), 5),
        "grad_norm_last": round(float(last.get("train/grad_norm", 0.0)), 4), "loss_last": last.get("train/loss"),
    }
    if a.profile == name and dev.type == "cuda":
        row["syncs"] = sync_sites(learner, batch)
        try:
            row["profile"] = profile_step(learner, batch)
        except Exception as err:  # noqa: BLE001 - keep the variant's figures
            row["profile_error"] = f"{type(err).__name__}: {err}"
    getattr(learner.engine, "destroy", lambda: None)()
    del learner, batch
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[{time.perf_counter() - T0:.0f}s] variant {name}: {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}, step {step_s:.3f}s, "
          f"peak {row['peak_mem_gib']} GiB", flush=True)
    return row


def sync_sites(learner, batch) -> dict[str, int]:
    """The host-device synchronisations of one train() (torch's sync debug mode), by calling code."""
    import traceback
    import warnings

    sites: dict[str, int] = {}
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-4:]
        key = " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames))
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            learner.train(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def profile_step(learner, batch, top: int = 25) -> dict:
    """CUDA time of one train() by kernel (top `top`) and by category."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        learner.train(batch)
        torch.cuda.synchronize()
    ops = op_attribution(prof)
    totals = op_totals(prof)
    idle = gpu_idle(prof)
    rows = []
    for e in prof.key_averages():  # kernels only (the CPU ops that launched them are in `ops`)
        t = _self_device_us(e)
        if t > 0 and getattr(e, "device_type", None) == DeviceType.CUDA:
            rows.append((e.key, t / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    rules = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")), ("fla/tilelang", ("chunk", "fwd_kernel", "bwd_kernel",
             "recompute", "prepare_wy", "solve_tril", "l2norm", "kernel_kernel", "tl_", "main_kernel")),
             ("flash/sdpa", ("flash", "fmha", "attention")), ("optimizer", ("adam", "multi_tensor", "foreach")),
             ("logprobs", ("lse", "logprob", "log_softmax", "softmax")), ("copy/cast", ("copy", "cast", "convert")),
             ("reduce", ("reduce",)), ("elementwise", ("elementwise", "vectorized"))]
    for key, ms, _ in rows:
        low = key.lower()
        cat = next((c for c, keys in rules if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    return {"total_ms": round(sum(r[1] for r in rows), 2), "by_category_ms": {k: round(v, 2) for k, v in
            sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:120], "ms": round(ms, 3), "calls": c} for k, ms, c in rows[:top]], "ops": ops,
            "op_totals_ms": totals, "idle": idle}


def _self_device_us(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)


def op_attribution(prof, top: int = 30) -> list[dict]:
    """The PyTorch ops (aten::*) that launched the most GPU time, with their input shapes: where copies,
    adds and gathers come from."""
    out = [{"op": e.key, "ms": round(_self_device_us(e) / 1e3, 3), "calls": e.count, "shapes": str(e.input_shapes)[:160]}
           for e in prof.key_averages(group_by_input_shape=True) if _self_device_us(e) > 0 and e.key.startswith("aten::")]
    out.sort(key=lambda r: -r["ms"])
    return out[:top]


def gpu_idle(prof, top: int = 12) -> dict:
    """Where the GPU waited on the host during the profiled step: total time between kernels, and the
    longest gaps with the kernels either side."""
    from torch.autograd import DeviceType

    ks = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if getattr(e, "device_type", None) == DeviceType.CUDA), key=lambda k: k[0])
    if not ks:
        return {}
    gaps, end, prev = [], ks[0][1], ks[0][2]
    for start, stop, name in ks[1:]:
        if start > end:
            gaps.append((start - end, prev, name))
        if stop >= end:
            end, prev = stop, name
    by_next: dict[str, float] = {}
    for g, _, nxt in gaps:
        by_next[nxt[:60]] = by_next.get(nxt[:60], 0.0) + g / 1e3
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": round((max(k[1] for k in ks) - ks[0][0]) / 1e3, 2), "idle_ms": round(sum(g[0] for g in gaps) / 1e3, 2),
            "gaps_over_100us": sum(1 for g in gaps if g[0] > 100), "longest": [
                {"ms": round(g / 1e3, 3), "after": a[:70], "before": b[:70]} for g, a, b in gaps[:top]],
            "idle_ms_before_kernel": {k: round(v, 2) for k, v in sorted(by_next.items(), key=lambda kv: -kv[1])[:top]}}


def op_totals(prof, top: int = 15) -> dict[str, float]:
    """GPU ms launched (self) per PyTorch op name."""
    rows = [(e.key, _self_device_us(e) / 1e3) for e in prof.key_averages() if e.key.startswith("aten::")]
    return {k: round(ms, 2) for k, ms in sorted(rows, key=lambda r: -r[1])[:top] if ms > 0}


def lengths_for(a) -> list[int]:
    if a.length_mix:
        from bench.packing import length_mix

        return [min(x, a.length) for x in length_mix(a.samples, a.prompt * 2, a.length - a.prompt * 2)]
    return [a.length] * a.samples


def render_md(d: dict) -> str:
    v = d.get("versions", {})
    lines = [f"# Learner at GPU speed: {d.get('shape')} shape, DeepSpeed bf16 GRPO learner ({v.get('gpu', 'cpu')})", "",
             f"Command: `{d.get('command')}`", "",
             "On the H200 through `bench/h200.sh run` (wheels, environment and install commands: "
             "[docs/gpu.md](../../docs/gpu.md#reproduce-the-commands-that-produced-the-results)).", "",
             "Software: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
             f"Batch per optimizer step: {d.get('samples')} samples x {d.get('length')} tokens"
             f"{' (length mix)' if d.get('length_mix') else ''}, {d.get('micro')} per packed micro-batch (micro16/micro32 variants: 16/32); "
             f"N = {d.get('n_params'):,} parameters; MFU = 6 N tokens/s / {PEAK_TFLOPS:.0f} TFLOP/s "
             f"(measured matmul peak this run: {d.get('matmul_tflops')} TFLOP/s).", ""]
    if d["checks"]:
        lines += ["## Correctness against float64 (relative error ||x - ref|| / ||ref||, outputs and gradients)", "",
                  "| kernel | fast: worst | PyTorch bf16: worst | tolerance | pass | fast, each output / grad |",
                  "|---|---|---|---|---|---|"]
        for k, r in d["checks"].items():
            each = ", ".join(f"{n} {e:.1e}" for n, e in r["fast"].items())
            lines.append(f"| {k} | {r['worst_fast']:.2e} | {r['worst_torch_bf16']:.2e} | {r['tolerance']:.1e} | "
                         f"{'yes' if r['pass'] else '**no**'} | {each} |")
        lines += ["", "Tolerance: max(1e-2, 2 x the PyTorch bf16 path's own error).", ""]
    if d["variants"]:
        base = d["variants"].get("torch", {}).get("tokens_per_s")
        lines += ["## Learner.train() throughput", "",
                  "| variant | what | tokens/s | MFU | vs torch | step s (median) | host s to queue it | peak GiB | mean logprob |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, r in d["variants"].items():
            if "error" in r:
                lines.append(f"| {k} | {DESCRIBE.get(k, '')} | failed: {r['error'][:150]} | | | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {k} | {r['describe']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {ratio} | "
                         f"{r['median_step_s']} | {statistics.median(r.get('host_issue_s') or [0]):.4f} | "
                         f"{r['peak_mem_gib']} | {r['score_mean_logprob']} |")
        lines += ["", "Host s to queue it: time `Learner.train()` spends issuing the step's GPU work before its one "
                  "end-of-step sync; close to the step time means either a slow host or a full CUDA launch queue "
                  "(the host waiting for room): the profile's GPU idle tells which."]
        for k, r in d["variants"].items():
            if r.get("syncs") is not None:
                lines += ["", f"Host-device synchronisations in one step of {k} (torch sync debug mode): "
                          + ("; ".join(f"{n} x `{site}`" for site, n in r["syncs"].items()) or "none")]
            if r.get("profile"):
                p = r["profile"]
                lines += ["", f"### Where one step's GPU time goes ({k}, {p['total_ms']} ms of kernels)", "",
                          ", ".join(f"{c} {ms} ms" for c, ms in p["by_category_ms"].items()), "",
                          "| kernel | ms | calls |", "|---|---|---|"]
                lines += [f"| `{t['kernel']}` | {t['ms']} | {t['calls']} |" for t in p["top"]]
                if p.get("idle"):
                    i = p["idle"]
                    lines += ["", f"GPU idle inside the step: {i['idle_ms']} ms of {i['span_ms']} ms "
                              f"({i['gaps_over_100us']} gaps over 0.1 ms); longest: " + "; ".join(
                                  f"{g['ms']} ms after `{g['after'][:40]}`" for g in i["longest"][:6])]
                    if i.get("idle_ms_before_kernel"):
                        lines += ["", "Idle time by the kernel that ended it: " + ", ".join(
                            f"`{k2}` {v} ms" for k2, v in i["idle_ms_before_kernel"].items())]
                if p.get("op_totals_ms"):
                    lines += ["", "GPU time by PyTorch op (self): " + ", ".join(f"{k} {v} ms" for k, v in p["op_totals_ms"].items())]
                if p.get("ops"):
                    lines += ["", "PyTorch ops by GPU time they launched (self), with input shapes:", "",
                              "| op | ms | calls | shapes |", "|---|---|---|---|"]
                    lines += [f"| `{o['op']}` | {o['ms']} | {o['calls']} | {o['shapes']} |" for o in p["ops"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="0.8b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--length", type=int, default=2048, help="tokens per sample (max with --length-mix)")
    ap.add_argument("--length-mix", action="store_true", help="RL-like length mix instead of fixed lengths")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (no loss) per sample")
    ap.add_argument("--micro", type=int, default=8, help="samples per packed micro-batch")
    ap.add_argument("--chunk", type=int, default=4096, help="learner.logprob_chunk_tokens")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--steps-slow", type=int, default=2, help="timed steps of the torch variant")
    ap.add_argument("--profile", default="", help="variant to profile one step of")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--model-dir", default="/tmp/qrl_bench_model")
    ap.add_argument("--suffix", default="")
    a = ap.parse_args()
    if a.prompt >= a.length:
        raise SystemExit(f"--prompt {a.prompt} must be shorter than --length {a.length}: the samples need response tokens")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bench.packing import SHAPES

    folder = Path(a.model_dir) / a.shape
    n_params = build_model_folder(a.shape, folder, dev)
    meta = {"shape": a.shape, "samples": a.samples, "length": a.length, "length_mix": a.length_mix, "micro": a.micro,
            "n_params": n_params, "command": "python bench/learner_gpu.py " + " ".join(sys.argv[1:]),
            "versions": versions(dev), "matmul_tflops": matmul_tflops(dev)}
    res = Results(RESULTS / f"learner_gpu{a.suffix}", meta)
    res.flush()
    print(json.dumps(meta, indent=1), flush=True)
    if not a.skip_checks and dev.type == "cuda":
        if not run_checks(dev, res, SHAPES[a.shape]):
            print("a fast kernel failed its correctness check: timing it anyway, see the results file", flush=True)
        from rl import fused_logprobs

        res.data["fp32_addmm_epilogue"] = fused_logprobs._FP32_EPILOGUE == [True]  # head grad accumulated by cuBLAS
        res.flush()
    for name in [v for v in a.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        try:
            res.update("variants", name, run_variant(name, folder, n_params, a, dev))
        except Exception as err:  # noqa: BLE001 - record and go on with the next variant
            import traceback

            traceback.print_exc()
            res.update("variants", name, {"error": f"{type(err).__name__}: {err}"})
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(render_md(res.data))


if __name__ == "__main__":
    main()
