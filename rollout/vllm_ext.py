"""vLLM worker extension: receive the learner's weights (through a sync/ transport) and load them
into a running engine."""
from __future__ import annotations

import logging

# Layers with nothing to load in a reload: a tied LM head (refreshed below) and rotary embeddings.
_EXPECTED_UNLOADED = ("ParallelLMHead", "RotaryEmbedding")
# Other layers a reload got no tensors for (they keep their weights), collected while
# `load_hf_weights` runs and reported in one line: a LoRA sync (learner.lora) sends only the
# adapted modules, and vLLM would warn once per untouched layer on every sync.
_kept: list[str] | None = None


class _ExpectedReloadNoise(logging.Filter):
    """Drop per-tensor warnings that every sync would repeat: layers with nothing to load, and
    fp32 learner tensors cast into bf16 engine parameters (vLLM casts; some, e.g. GDN's A_log,
    stay fp32 in the engine, which is why the learner does not pre-cast)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.endswith("Failed to load weights") and msg.startswith(_EXPECTED_UNLOADED):
            return False
        if _kept is not None and msg.endswith("Failed to load weights"):
            _kept.append(msg.split(":")[0])
            return False
        if _kept is not None and msg.startswith("Following weights were not loaded"):
            return False
        return not (msg.startswith("Attempted to load weight") and "with dtype" in msg)


for _name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.weight_utils",
              "vllm.model_executor.models.utils", "vllm.model_executor.model_loader.reload.inplace"):
    logging.getLogger(_name).addFilter(_ExpectedReloadNoise())


class _ThreadNoise(logging.Filter):
    """vLLM's CPU worker replaces torch.set_num_threads with a warning; with the in-process engine
    its multimodal renderer calls it twice per image request (hundreds of lines per step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "doesn't allow to use `torch.set_num_threads`" not in record.getMessage()


logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_ThreadNoise())


def _prepack_cpu_moe_on_reload(model) -> None:
    """vLLM 0.32 CPU MoE (Qwen3.5-MoE on CPU): on a weight update `UnquantizedFusedMoEMethod._setup_kernel`
    skips the experts' `process_weights_after_loading`, the CPU kernel's prepack of w13/w2, so a reload
    leaves the routed experts in checkpoint layout under a kernel that reads them prepacked (measured:
    logprobs off by up to 2.6 nats vs a fresh engine of the same weights). Make every reprocessing of a
    CPU MoE layer end with that prepack; layers a sync does not touch are not reprocessed, so never
    packed twice. No-op elsewhere (GPU kernels need no prepack)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for layer in model.modules():
        qm = getattr(layer, "quant_method", None)
        experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(qm, "_qrl_prepack_on_reload", False):
            continue
        original = qm.process_weights_after_loading

        def process(layer, _original=original, _qm=qm):
            update = _qm.moe_kernel is not None  # set on the first load: this is a reload
            _original(layer)
            if update:
                _qm.moe_kernel.fused_experts.process_weights_after_loading(layer)

        qm.process_weights_after_loading = process
        qm._qrl_prepack_on_reload = True


class _Rewind:
    """Stands in for a CPU torch.Generator while vLLM rewinds it (see install_cpu_seed_rewind)."""

    def __init__(self, gen, state):
        self.gen, self.state = gen, state

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        self.gen.set_state(self.state)  # back to before this step's (discarded) sample


def install_cpu_seed_rewind(runner) -> bool:
    """vLLM 0.32 bug on CPU: a request with a sampling seed whose prompt is prefilled in chunks gets a
    throw-away sample per partial chunk, after which vLLM rewinds the request's generator with
    `Generator.set_offset`, which CPU (Mersenne Twister) generators lack: "CPU Generator does not use
    offset" kills the engine. Here the seeded generators' states are saved before each sampling step
    and restored for the discarded samples: the same rewind, so a seeded request draws the same
    tokens whether or not its prompt was chunked (what makes rollouts reproducible)."""
    if getattr(runner, "_qrl_seed_rewind", False) or not hasattr(runner, "_bookkeeping_sync"):
        return False
    import numpy as np

    sample_tokens, bookkeeping = runner.sample_tokens, runner._bookkeeping_sync
    saved: dict = {}

    def sample_tokens_saving_states(*args, **kwargs):
        saved.clear()
        saved.update({i: g.get_state() for i, g in runner.input_batch.generators.items() if g.device.type == "cpu"})
        return sample_tokens(*args, **kwargs)

    def bookkeeping_with_rewind(*args, **kwargs):
        gens = runner.input_batch.generators
        discarded = np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]
        swapped = {int(i): gens[int(i)] for i in discarded if int(i) in gens and int(i) in saved}
        for i, g in swapped.items():
            gens[i] = _Rewind(g, saved[i])
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            gens.update(swapped)

    runner.sample_tokens, runner._bookkeeping_sync = sample_tokens_saving_states, bookkeeping_with_rewind
    runner._qrl_seed_rewind = True
    return True


class WeightSyncExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); `self` is the worker."""

    def install_cpu_fixes(self) -> bool:
        """CPU engines: install_cpu_seed_rewind on this worker's model runner (idempotent)."""
        import torch

        if torch.cuda.is_available():
            return False
        return install_cpu_seed_rewind(self.model_runner)

    def load_hf_weights(self, named_tensors) -> int:
        # `reload_weights` re-runs vLLM's weight processing (CPU repacking, fused qkv, ...), which a
        # plain `model.load_weights` after start-up does not.
        named_tensors = list(named_tensors)
        _prepack_cpu_moe_on_reload(self.model_runner.model)
        global _kept
        _kept = []
        try:
            self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        finally:
            kept, _kept = _kept, None
        if kept:
            from collections import Counter

            layers = ", ".join(f"{k} x{n}" for k, n in sorted(Counter(kept).items()))
            logging.getLogger("vllm.weight_sync").info(
                "weight reload: %d tensors; %d layers were not in this sync and kept their weights (%s)",
                len(named_tensors), len(kept), layers)
        self._refresh_tied_lm_head()
        return len(named_tensors)

    # -- weight sync (sync/): each transport's receiving end in this worker; loaded on commit --------
    def join_transport(self, transport: str, *args) -> bool:
        self._transport(transport).join(*args)
        return True

    def receive_weights(self, transport: str, *message) -> int:
        """Receive one bucket and keep its tensors until `load_received`."""
        named = self._transport(transport).receive(*message)
        self.__dict__.setdefault("_received", []).extend(named)
        return len(named)

    def receive_weights_from_file(self, transport: str, path: str) -> int:
        """Same, for a bucket of tensors saved to a safetensors file (engines whose workers run in
        other processes: vLLM's RPC path cannot pickle tensors it received zero-copy)."""
        from safetensors.torch import load_file

        return self.receive_weights(transport, list(load_file(path).items()))

    def load_received(self) -> int:
        named, self._received = self.__dict__.get("_received", []), []
        return self.load_hf_weights(named)

    def _transport(self, name: str):
        """This worker's receiving end of transport `name`, made on its first message."""
        import torch

        from sync import get_transport

        ends = self.__dict__.setdefault("_transports", {})
        if name not in ends:
            ends[name] = get_transport(name)(torch.device("cpu") if self.device.type == "cpu" else self.device)
        return ends[name]

    def named_weights(self) -> dict:
        """A copy of every engine parameter, in vLLM's own (fused, processed) layout: for tests
        that compare two engines' weights exactly. Small models only. On CPU, linear layers keep
        their weights prepacked inside a kernel (the `weight` parameter is emptied): those are read
        back by multiplying the identity, as a fused [out, in] matrix (no bias)."""
        import torch

        out = {}
        modules = dict(self.model_runner.model.named_modules())
        for n, p in self.model_runner.model.named_parameters():
            mod_name, _, leaf = n.rpartition(".")
            mod = modules.get(mod_name)
            if leaf == "weight" and p.numel() == 0 and hasattr(mod, "cpu_linear"):
                eye = torch.eye(getattr(mod, "input_size_per_partition", mod.input_size), dtype=p.dtype)  # Replicated: input_size
                out[n] = mod.cpu_linear(eye, p, None).t().contiguous()
            else:
                out[n] = p.detach().to("cpu", copy=True)
        return out

    def _refresh_tied_lm_head(self) -> None:
        """With tied embeddings no `lm_head.*` weight is loaded, so a layerwise reload leaves the LM
        head's processed kernel (on CPU: a prepacked copy of the *old* embedding) stale. Re-tie it
        and re-run its weight processing from the freshly loaded embedding."""
        model = self.model_runner.model
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        if not getattr(cfg, "tie_word_embeddings", False):
            return
        modules = dict(model.named_modules())
        heads = [m for n, m in modules.items() if n.endswith("lm_head")]
        embeds = [m for n, m in modules.items() if n.endswith("embed_tokens")]
        if len(heads) != 1 or len(embeds) != 1:
            raise RuntimeError(
                f"tied embeddings: expected one lm_head and one embed_tokens module, found "
                f"{len(heads)} and {len(embeds)}; weight sync cannot refresh the LM head"
            )
        head, embed = heads[0], embeds[0]
        head.weight = embed.weight
        head.quant_method.process_weights_after_loading(head)
