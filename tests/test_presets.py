"""Qwen3.5 size presets (policy=qwen3_5_0_8b|2b|4b|9b): Hydra loads them with their typed shapes, the
shapes build meta-device models with the published parameter counts, and a checkpoint folder whose
config.json differs from its preset fails at start, naming the fields."""
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from policies.presets import (PRESETS, QWEN3_5_9B_CHECKPOINT_PARAMS, ModelShape, check_checkpoint_shape,
                              meta_model, num_params)
from tests.conftest import REPO, cli_env

NAMES = ["qwen3_5_0_8b", "qwen3_5_2b", "qwen3_5_4b", "qwen3_5_9b"]


def test_every_size_has_a_preset():
    assert sorted(PRESETS) == sorted(NAMES)
    assert all((REPO / "conf" / "policy" / f"{n}.yaml").is_file() for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_composes_with_its_typed_shape(name):
    from rl.config import TrainConfig
    from rl.cli import compose

    cfg = OmegaConf.to_object(compose([f"policy={name}"]))
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.policy.shape, ModelShape)
    assert cfg.policy.shape == PRESETS[name].shape  # the yaml and policies/presets.py agree, field by field
    assert cfg.policy.path == PRESETS[name].hub_id and cfg.policy.engine_dtype == "bfloat16"


@pytest.mark.slow
def test_cli_prints_the_preset(tmp_path):
    cmd = [sys.executable, "-m", "rl.train", "policy=qwen3_5_4b", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shape = OmegaConf.create(out.stdout).policy.shape
    assert (shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size, shape.linear_num_value_heads) == (2560, 32, 9216, 32)


def test_a_misspelt_shape_key_fails_to_compose():
    from rl.cli import compose, explain_config_error

    with pytest.raises(Exception) as e:
        compose(["policy=qwen3_5_4b", "policy.shape.hiden_size=1"])
    assert "unknown config key 'policy.shape.hiden_size'" in explain_config_error(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_give_the_published_parameter_count(name):
    p = PRESETS[name]
    n = num_params(meta_model(name))
    assert abs(n / p.text_params - 1) < 0.01, f"{name}: {n:,} params from the shapes vs {p.text_params:,} published"
    assert p.shape.layer_types().count("full_attention") == p.shape.num_hidden_layers // 4


def test_9b_checkpoint_total_matches_its_safetensors_index():
    """Text + vision tower (meta model) + one MTP layer (fc 2h->h, 3 norms, one full-attention layer) against
    the published checkpoint's bf16 size: checks the 9B's vision shape and untied head too."""
    full = meta_model("qwen3_5_9b", vision=True)
    h = PRESETS["qwen3_5_9b"].shape.hidden_size
    layer = full.model.language_model.layers[3]
    assert hasattr(layer, "self_attn") and not hasattr(layer, "linear_attn")  # a full-attention layer
    mtp = 2 * h * h + 3 * h + num_params(layer)
    total = num_params(full) + mtp
    assert abs(total / QWEN3_5_9B_CHECKPOINT_PARAMS - 1) < 0.001, f"{total:,} vs {QWEN3_5_9B_CHECKPOINT_PARAMS:,}"


def published_style_config(name: str) -> dict:
    """config.json as Qwen publishes it: multimodal wrapper, text under text_config, RoPE in rope_parameters."""
    s, v = PRESETS[name].shape, PRESETS[name].vision
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "tie_word_embeddings": s.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen3_5_text", "attn_output_gate": True, "hidden_size": s.hidden_size,
            "num_hidden_layers": s.num_hidden_layers, "layer_types": s.layer_types(), "full_attention_interval": 4,
            "num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads, "head_dim": 256,
            "intermediate_size": s.intermediate_size, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": s.linear_num_value_heads, "linear_value_head_dim": 128,
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "vocab_size": 248320,
            "tie_word_embeddings": s.tie_word_embeddings,
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                                "rope_theta": 10000000, "partial_rotary_factor": 0.25},
        },
        "vision_config": {"model_type": "qwen3_5_vision", "depth": v.depth, "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
                          "out_hidden_size": v.out_hidden_size},
    }


@pytest.fixture
def folder_9b(tmp_path):
    d = tmp_path / "qwen3.5-9b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(published_style_config("qwen3_5_9b")))
    (d / "model.safetensors").write_bytes(b"")  # a stand-in: the shape check comes before any weight loads
    return d


def test_matching_checkpoint_passes(folder_9b):
    check_checkpoint_shape(str(folder_9b), PRESETS["qwen3_5_9b"].shape)
    check_checkpoint_shape(str(folder_9b), None)  # policy.shape=null: no check at all
    check_checkpoint_shape("nobody/not-downloaded", PRESETS["qwen3_5_4b"].shape)  # hub id not in the local cache


def test_4b_preset_on_a_9b_folder_names_the_fields_and_the_right_preset(folder_9b):
    with pytest.raises(ValueError) as e:
        check_checkpoint_shape(str(folder_9b), PRESETS["qwen3_5_4b"].shape)
    msg = str(e.value)
    for part in ["policy=qwen3_5_4b", "hidden_size: preset 2560, checkpoint 4096",
                 "intermediate_size: preset 9216, checkpoint 12288", "tie_word_embeddings: preset True, checkpoint False",
                 "use policy=qwen3_5_9b", "policy.shape=null"]:
        assert part in msg, (part, msg)
    assert "num_hidden_layers" not in msg and "linear_num_value_heads" not in msg  # equal fields are not listed


def test_tiny_folder_and_other_families_are_named(tiny_path, tmp_path):
    with pytest.raises(ValueError) as e:  # the tiny random-weight Qwen3.5: every size field differs
        check_checkpoint_shape(tiny_path("qwen3_5"), PRESETS["qwen3_5_0_8b"].shape)
    msg = str(e.value)
    assert "hidden_size: preset 1024, checkpoint 64" in msg and "num_hidden_layers: preset 24, checkpoint 4" in msg
    assert "use policy=" not in msg  # no preset matches a tiny model
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "q3")
    with pytest.raises(ValueError, match=r"model_type: preset qwen3_5_text .*checkpoint qwen3\b"):
        check_checkpoint_shape(str(tmp_path / "q3"), PRESETS["qwen3_5_2b"].shape)


@pytest.mark.slow
def test_run_with_a_mismatching_folder_fails_at_start(folder_9b, tmp_path):
    cmd = [sys.executable, "-m", "rl.train", "policy=qwen3_5_4b", f"policy.path={folder_9b}", "logger=console",
           f"run_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "does not match policy=qwen3_5_4b" in out.stderr and "use policy=qwen3_5_9b" in out.stderr


def test_gpu_learner_and_rollout_presets_compose_typed():
    """conf/learner/gpu.yaml and conf/rollout/gpu.yaml use only keys the typed config has."""
    from rl.config import TrainConfig
    from rl.cli import compose

    cfg = OmegaConf.to_object(compose(["learner=gpu", "rollout=gpu"]))
    assert isinstance(cfg, TrainConfig)
    assert cfg.learner.dtype == "bfloat16" and cfg.learner.kernels == "auto" and cfg.learner.keep_head_logits is False
