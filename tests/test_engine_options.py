"""vLLM engine options for hybrid Qwen3.5: the GPU preset turns prefix caching on with the mamba
cache aligned to blocks (else 0% prefix hits on hybrid models, vLLM #51250); the CPU default stays
conservative (eager, no prefix caching). The keys are checked against vLLM's own EngineArgs."""
import dataclasses

from omegaconf import OmegaConf

from rl.cli import compose


def test_gpu_preset_enables_prefix_caching_with_aligned_mamba_cache():
    r = OmegaConf.to_object(compose(["rollout=gpu"])).rollout
    assert r.enable_prefix_caching is True and r.enforce_eager is False
    assert r.extra["mamba_cache_mode"] == "align"
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = set(r.extra) - fields
    assert not unknown, f"rollout.extra keys vLLM's EngineArgs does not know: {unknown}"
    args = EngineArgs(model="unused", enable_prefix_caching=True, **r.extra)
    assert args.mamba_cache_mode == "align"


def test_cpu_default_is_conservative():
    r = OmegaConf.to_object(compose([])).rollout
    assert r.enable_prefix_caching is False and r.enforce_eager is True
    assert "mamba_cache_mode" not in r.extra
