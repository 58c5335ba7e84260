"""Rollout engine: a vLLM `LLM` that samples n completions per prompt with per-token logprobs and
accepts weight updates in size-capped buckets tagged with a policy version.

`VLLMEngine` is a plain class (unit-testable in-process); `EngineActor` is its Ray shell.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    version: int


@dataclass
class EngineConfig:
    model: str = ""
    dtype: str = "auto"  # auto: bfloat16 for Qwen3.5 (vLLM CPU's GDN kernel needs it), else float32 on CPU
    seed: int = 0
    max_model_len: int = 1024
    kv_cache_memory_mb: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    extra: dict = field(default_factory=dict)


def pick_engine_dtype(model_path: str, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import json
    from pathlib import Path

    cfg_file = Path(model_path) / "config.json"
    arch = []
    if cfg_file.exists():
        arch = json.loads(cfg_file.read_text()).get("architectures", [])
    is_qwen3_5 = any("Qwen3_5" in a or "Qwen3Next" in a for a in arch)
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        on_gpu = False
    if is_qwen3_5 or on_gpu:
        return "bfloat16"
    return "float32"


class VLLMEngine:
    def __init__(self, cfg: EngineConfig):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.cfg = cfg
        self.dtype = pick_engine_dtype(cfg.model, cfg.dtype)
        self.version = 0
        self._pending: list[tuple[str, Any]] = []
        self._pending_version: int | None = None
        kwargs = dict(
            model=cfg.model,
            dtype=self.dtype,
            seed=cfg.seed,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            worker_extension_cls="rollout.vllm_ext.WeightSyncExtension",
            disable_log_stats=True,
        )
        import torch

        if not torch.cuda.is_available():
            kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=cfg.kv_cache_memory_mb << 20)
        kwargs.update(cfg.extra)
        self.llm = LLM(**kwargs)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0,
        top_p: float = 1.0, seed: int | None = None, stop_token_ids: list[int] | None = None,
    ) -> list[list[Completion]]:
        """For each prompt (token ids), n completions with the logprob of every sampled token."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
            seed=seed, stop_token_ids=stop_token_ids, detokenize=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[i][tok].logprob for i, tok in enumerate(ids)]
                group.append(Completion(ids, lps, c.finish_reason or "stop", self.version))
            result.append(group)
        return result

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced logprob of every token after the first (used to probe weight sync)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outs):
            pl = out.prompt_logprobs
            scores.append([pl[i][seq[i]].logprob for i in range(1, len(seq))])
        return scores

    # -- weight sync --------------------------------------------------------------------------
    def receive_bucket(self, bucket: list[tuple[str, Any]], version: int) -> int:
        """Buffer one bucket of HF-named tensors of policy `version`."""
        if self._pending_version not in (None, version):
            raise RuntimeError(
                f"weight bucket of version {version} arrived while version {self._pending_version} "
                "was incomplete; a previous sync was interrupted"
            )
        self._pending_version = version
        self._pending.extend(bucket)
        return len(bucket)

    def commit_weights(self, version: int) -> dict:
        """Load all buffered buckets in place, reset the prefix cache, and adopt `version`."""
        if self._pending_version != version:
            raise RuntimeError(f"commit of version {version} without its buckets (have {self._pending_version})")
        t0 = time.perf_counter()
        named = self._pending
        self._pending, self._pending_version = [], None
        loaded = self.llm.collective_rpc("load_hf_weights", args=(named,))
        self.llm.reset_prefix_cache()
        self.version = version
        return {"tensors": loaded[0], "load_s": time.perf_counter() - t0}

    def get_version(self) -> int:
        return self.version

    def ready(self) -> dict:
        """Warm up (the first request pays one-off kernel setup) and report the engine's dtype."""
        self.generate([[0, 1, 2]], n=1, max_tokens=2)
        return {"dtype": self.dtype, "version": self.version}

