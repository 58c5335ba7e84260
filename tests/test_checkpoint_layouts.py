"""Published Qwen3.5 checkpoint layouts (policies/checkpoint.py) with the real parts: tiny dense and
MoE models saved as the multimodal class saves them (`model.language_model.*`, `model.visual.*`,
`mtp.*`; experts fused or per expert) load into the DeepSpeed learner with exactly the saved values
and into vLLM; after a learner step and a sync, the engine holds exactly what a fresh engine loaded
from the learner's weights holds."""
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.checkpoint import (TEXT_PREFIX, Layout, checkpoint_state_dict, engine_layout, layout_of, save_in_layout,
                                 saved_names, to_checkpoint_names)
from common.net import free_port
from rl.learner import Learner
from rl.settings import algo_settings, learner_settings
from rollout.engine import VLLMEngine
from rl.settings import engine_config
from tests.test_weight_sync import probe_batch


# -- the name mapping (pure) ---------------------------------------------------------------------
def test_to_checkpoint_names_prefix_and_expert_split():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(4, 6, 5, generator=g), torch.randn(4, 5, 3, generator=g)
    per = Layout(prefixed=True, experts="per_expert")
    out = dict(to_checkpoint_names("model.layers.2.mlp.experts.gate_up_proj", gate_up, per))
    assert sorted(out) == sorted(f"model.language_model.layers.2.mlp.experts.{e}.{p}_proj.weight"
                                 for e in range(4) for p in ("gate", "up"))
    for e in range(4):  # gate rows first, then up rows, as transformers fuses them
        base = f"model.language_model.layers.2.mlp.experts.{e}"
        assert torch.equal(torch.cat([out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"]]), gate_up[e])
    out = dict(to_checkpoint_names("model.layers.2.mlp.experts.down_proj", down, per))
    assert torch.equal(torch.stack([out[f"model.language_model.layers.2.mlp.experts.{e}.down_proj.weight"]
                                    for e in range(4)]), down)
    fused = Layout(prefixed=True)
    assert to_checkpoint_names("model.layers.2.mlp.experts.down_proj", down, fused)[0][0] == \
        "model.language_model.layers.2.mlp.experts.down_proj"
    w = torch.zeros(2)
    for name, want in [("model.norm.weight", "model.language_model.norm.weight"), ("lm_head.weight", "lm_head.weight"),
                       ("model.visual.blocks.0.norm1.weight", "model.visual.blocks.0.norm1.weight"),
                       ("model.language_model.norm.weight", "model.language_model.norm.weight"),
                       ("model.layers.0.mlp.shared_expert.up_proj.weight",
                        "model.language_model.layers.0.mlp.shared_expert.up_proj.weight")]:
        assert to_checkpoint_names(name, w, per) == [(want, w)]
    assert to_checkpoint_names("model.norm.weight", w, Layout()) == [("model.norm.weight", w)]
    assert to_checkpoint_names("model.layers.0.mlp.experts.down_proj", None, per) == \
        [("model.language_model.layers.0.mlp.experts.down_proj", None)]  # non-zero ZeRO-3 ranks: no tensor
    with pytest.raises(ValueError, match="gate_up_proj"):
        to_checkpoint_names("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 5), per)
    with pytest.raises(ValueError, match="experts="):
        Layout(experts="split")


# -- tiny published checkpoints ------------------------------------------------------------------
CASES = {  # name: (family, Layout, multimodal config)
    "dense-text-prefixed": ("qwen3_5", Layout(prefixed=True), False),
    "dense-multimodal": ("qwen3_5", Layout(prefixed=True), True),
    "moe-multimodal-fused": ("qwen3_5_moe", Layout(prefixed=True, experts="fused"), True),  # Qwen3.5-35B-A3B
    "moe-multimodal-per_expert": ("qwen3_5_moe", Layout(prefixed=True, experts="per_expert"), True),  # -FP8, fine-tunes
    "moe-text-per_expert": ("qwen3_5_moe", Layout(prefixed=True, experts="per_expert"), False),
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Builds (once per module) each case's tiny checkpoint; returns (folder, source model's state dict)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policies.build import resolve_policy_path
    from policies.tiny import TinySpec

    root = tmp_path_factory.mktemp("published")
    made = {}

    def get(case: str):
        if case not in made:
            family, layout, multimodal = CASES[case]
            src = resolve_policy_path("tiny:default", asdict(TinySpec(family=family)), root / "cache")
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            folder = save_in_layout(model, root / case, layout, multimodal=multimodal, mtp=True,
                                    tokenizer=AutoTokenizer.from_pretrained(src))
            made[case] = (str(folder), model.state_dict())
        return made[case]

    return get


def text_weights(sd: dict) -> dict:
    """Text weights under their published (prefixed, fused) names, whatever class held them."""
    return {k: v for k, v in checkpoint_state_dict(sd, Layout(prefixed=True)).items()
            if k.startswith(TEXT_PREFIX) or k == "lm_head.weight"}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_in_the_published_layout(published, case):
    folder, _ = published(case)
    family, layout, multimodal = CASES[case]
    names = saved_names(folder)
    assert layout_of(folder) == layout
    assert any(n.startswith("model.language_model.layers.") for n in names)
    assert not any(n.startswith("model.layers.") for n in names)
    assert any(n.startswith("mtp.") for n in names)
    assert any(n.startswith("model.visual.") for n in names) == multimodal
    assert engine_layout(folder) == Layout(prefixed=multimodal)
    if family == "qwen3_5_moe":
        per_expert = "model.language_model.layers.0.mlp.experts.3.gate_proj.weight" in names
        fused = "model.language_model.layers.0.mlp.experts.gate_up_proj" in names
        assert (per_expert, fused) == (layout.experts == "per_expert", layout.experts == "fused")


def _learner(path: str, zero_stage: int = 2) -> Learner:
    return Learner(path, learner_settings(zero_stage=zero_stage, micro_batch_size=8, lr=1e-2), algo_settings(),
                   0, 1, "127.0.0.1", free_port(), 8)


@pytest.mark.parametrize("case,zero_stage", [(c, 2) for c in CASES] + [("moe-multimodal-per_expert", 3)])
def test_learner_loads_published_layout_exactly(published, case, zero_stage):
    """transformers maps `model.language_model.*` and per-expert tensors itself (conversion mapping
    of qwen3_5(_moe)_text), also under ZeRO-3's partitioned load; every text weight equals the source."""
    folder, source = published(case)
    learner = _learner(folder, zero_stage)
    loaded, want = text_weights(learner.hf_state_dict()), text_weights(source)
    want.pop("lm_head.weight", None)  # tied to the embedding (ZeRO-3 yields a tied weight once)
    loaded.pop("lm_head.weight", None)
    assert set(loaded) == set(want) and len(want) > 40
    unequal = [k for k in want if not torch.equal(loaded[k], want[k])]
    assert not unequal, unequal


def test_learner_load_with_unmapped_names_fails_naming_them(published, tmp_path):
    """A checkpoint whose names transformers cannot place stops the learner (transformers itself only
    logs the keys and leaves them at random init)."""
    folder, _ = published("moe-multimodal-per_expert")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(folder).iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(Path(folder) / "model.safetensors"))
    save_file({k.replace("model.language_model.layers.1.", "model.language_model.blocks.1."): v for k, v in sd.items()},
              str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"missing \d+ \[model\.(language_model\.)?layers\.1\.") as err:
        _learner(str(bad))
    assert "unexpected" in str(err.value) and "docs/qwen3_5.md" in str(err.value)


# -- engines: load the published layouts, then a learner step and a sync -------------------------
def _engine(ray, path: str):
    extra = {"language_model_only": True} if engine_layout(path).prefixed else {}  # no processor in tiny folders
    eng = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, dtype="auto", max_model_len=256,
                                                                   kv_cache_memory_mb=128, extra=extra))
    assert ray.get(eng.ready.remote())["dtype"] == "bfloat16"
    return eng


def _export_like(folder: str, state: dict, out: Path) -> str:
    """`state` (a learner's weights, any class's names) saved exactly as checkpoint `folder` is laid out."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    text_cfg = cfg.get_text_config()
    model = AutoModelForCausalLM.from_config(text_cfg, dtype=torch.float32)
    mem = {("model." + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v for k, v in text_weights(state).items()}
    missing, unexpected = model.load_state_dict(mem, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    layout = layout_of(folder)
    save_in_layout(model, out, layout, multimodal=engine_layout(folder).prefixed, mtp=True,
                   tokenizer=AutoTokenizer.from_pretrained(folder))
    return str(out)


@pytest.mark.parametrize("case,zero_stage", [("dense-text-prefixed", 2), ("moe-multimodal-per_expert", 3)])
def test_engine_loads_published_layout_and_sync_is_exact(ray_cluster, published, tmp_path, case, zero_stage):
    """The engine serves the published checkpoint with the learner's weights (bf16 engine vs fp32
    learner: noise level); after one learner step and a sync (learner names mapped to the engine's
    layout: `model.language_model.*` for the multimodal class, which refuses `model.*`), every engine
    parameter equals, bit for bit, that of a fresh engine loaded from the learner's new weights saved in
    the same layout, and both score alike."""
    ray = ray_cluster
    folder, _ = published(case)
    seqs, batch = probe_batch()
    eng = _engine(ray, folder)
    settings = learner_settings(zero_stage=zero_stage, micro_batch_size=8, lr=1e-2, sync_bucket_mb=0.05)
    learner = ray.remote(num_cpus=0.25)(Learner).remote(folder, settings, algo_settings(), 0, 1, "127.0.0.1",
                                                        free_port(), 8)
    before = torch.tensor(ray.get(eng.score.remote(seqs)))
    learner_lp = ray.get(learner.compute_logprobs.remote(batch))
    assert (before - learner_lp).abs().mean().item() < 0.1  # the engine loaded the same weights (bf16 noise)
    ray.get(learner.train.remote(batch))
    stats = ray.get(learner.push_weights.remote([eng], 1))
    assert stats["sync/buckets"] > 3 and ray.get(eng.get_version.remote()) == 1
    synced_scores = torch.tensor(ray.get(eng.score.remote(seqs)))
    assert (synced_scores - before).abs().max().item() > 0.05  # the update reached the engine
    synced = ray.get(eng.named_weights.remote())
    state = ray.get(learner.hf_state_dict.remote())
    ray.kill(eng)
    export = _export_like(folder, state, tmp_path / "export")
    fresh = _engine(ray, export)
    reference = ray.get(fresh.named_weights.remote())
    fresh_scores = torch.tensor(ray.get(fresh.score.remote(seqs)))
    ray.kill(fresh)
    assert set(synced) == set(reference) and len(synced) > 10
    unequal = [n for n in synced if not torch.equal(synced[n], reference[n])]
    assert not unequal, unequal
    assert (synced_scores - fresh_scores).abs().max().item() < 1e-6
    learner_lp = ray.get(learner.compute_logprobs.remote(batch))
    assert (fresh_scores - learner_lp).abs().mean().item() < 0.1
