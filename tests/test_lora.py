"""LoRA (learner.lora): only adapters train, and the engines follow through merged weights.

Real parts throughout: peft on the transformers model, DeepSpeed (ZeRO-2 in-process, ZeRO-3 on two
Ray ranks), vLLM CPU engines loading the merged weights with `reload_weights`, the CLI.
"""
import pytest
import torch

from policies.lora import PACKED, LoraConfig, check_targets, sync_modules
from common.net import free_port
from rl.learner import Learner
from rl.settings import algo_settings, learner_settings
from tests.test_weight_sync import diff, probe_batch, sync
from rollout.engine import VLLMEngine
from rl.settings import engine_config

PARITY_TOL = 1e-4


def test_packed_groups_are_vllms():
    """The sibling groups a sync completes are exactly the HF modules vLLM fuses into one layer."""
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
    from vllm.model_executor.models.qwen3_5 import Qwen3_5ForCausalLM

    for cls in (Qwen3ForCausalLM, Qwen3_5ForCausalLM):
        for fused, parts in cls.packed_modules_mapping.items():
            assert PACKED[fused] == tuple(parts), (cls.__name__, fused)


def test_unknown_target_fails_listing_valid_names(tiny_path):
    with pytest.raises(ValueError) as err:
        check_targets(tiny_path("qwen3_5"), ["q_proj", "qkv_proj"])
    msg = str(err.value)
    assert "learner.lora.target_modules" in msg and "['qkv_proj']" in msg
    for name in ("in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "o_proj", "gate_proj", "down_proj"):
        assert name in msg
    assert "lm_head" not in msg.split("valid names:")[1]


def test_default_targets_are_every_linear_layer_the_model_has(tiny_path):
    from transformers import AutoModelForCausalLM

    from policies.lora import resolve_targets

    for family, expected in [("qwen3_5", {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj",
                                          "o_proj", "gate_proj", "up_proj", "down_proj"}),
                             ("qwen3", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})]:
        model = AutoModelForCausalLM.from_pretrained(tiny_path(family))
        names = resolve_targets(model, None)
        assert {n.rsplit(".", 1)[1] for n in names} == expected, family
        n_layers = model.config.num_hidden_layers
        assert len(names) == (25 if family == "qwen3_5" else 7 * n_layers)


@pytest.mark.slow
def test_cli_bad_lora_settings_fail_at_start(tmp_path):
    from tests.test_bad_input import error_line
    from tests.test_bad_input import run_cli as run_bad

    line = error_line(run_bad(tmp_path, "learner.lora.rank=8", "learner.lora.target_modules=[q_proj,qkv]"))
    assert "learner.lora.target_modules" in line and "'qkv'" in line and "in_proj_qkv" in line
    line = error_line(run_bad(tmp_path, "learner.lora.rank=-1"))
    assert "learner.lora" in line and "rank=-1" in line
    line = error_line(run_bad(tmp_path, "learner.lora.rnk=8"))
    assert "learner.lora.rnk" in line and "rank" in line


def test_only_adapters_train(tiny_path):
    """ZeRO-2, in-process: after two steps every base weight is bit-identical and the adapters moved;
    the optimizer holds only adapter parameters; exports carry HF names only (merged weights)."""
    path = tiny_path("qwen3_5")
    s = learner_settings(micro_batch_size=8, lr=1e-2, zero_stage=2, lora=LoraConfig(rank=4))
    learner = Learner(path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), 8)
    model = learner.engine.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt_params = {id(p) for g in learner.engine.optimizer.optimizer.param_groups for p in g["params"]}
    n_opt = sum(p.numel() for g in learner.engine.optimizer.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert not any(id(p) in opt_params for n, p in model.named_parameters() if n not in trainable)

    _, batch = probe_batch()
    for _ in range(2):
        learner.train(batch)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)

    from safetensors.torch import load_file

    base = load_file(f"{path}/model.safetensors")
    exported = learner.hf_state_dict()
    assert set(exported) == set(base)  # HF names only: no base_layer / lora_ names
    merged = {n for n in exported if not torch.equal(exported[n], base[n])}
    adapted = {f"{m}.weight" for m in learner.lora}
    assert merged and merged <= adapted
    synced = dict(learner.iter_hf_weights(sync=True))
    assert set(synced) == {f"{m}.weight" for m in sync_modules(model)} and set(synced) <= set(base)
    assert not any(".embed_tokens." in n or "norm" in n for n in synced)


def _fused(hf: dict, engine_names) -> dict:
    """HF tensors assembled into vLLM's fused layers (PACKED), for the engine's parameter names."""
    out = {}
    for name in engine_names:
        mod, leaf = name.rsplit(".", 1)
        parent, layer = mod.rsplit(".", 1)
        parts = [f"{parent}.{p}.{leaf}" for p in PACKED.get(layer, (layer,))]
        if all(p in hf for p in parts):
            out[name] = torch.cat([hf[p] for p in parts])
    return out


def _sync_modules(path: str, targets: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM

    from policies.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(path)
    apply_lora(model, LoraConfig(rank=4, target_modules=targets))
    return sync_modules(model)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_synced_qwen3_5_engine_gets_the_merged_weights_and_keeps_the_rest(ray_cluster, tiny_path, family):
    """LoRA on some modules of both layer types (q_proj, GDN in_proj_qkv/out_proj, gate_proj; in the
    MoE model the shared expert's): after two steps and a sync, every engine layer that a sync touches
    holds the learner's merged weights (fused siblings included), and every other engine weight
    (routed experts included) is bit-identical to before. Sending only the adapted module of a fused
    layer would not be safe: vLLM rebuilds the whole layer."""
    ray = ray_cluster
    path = tiny_path(family)
    targets = ["q_proj", "in_proj_qkv", "out_proj", "gate_proj"]
    eng = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, dtype="auto"))
    assert ray.get(eng.ready.remote())["dtype"] == "bfloat16"
    learner = ray.remote(num_cpus=0.25)(Learner).remote(
        path, learner_settings(micro_batch_size=8, lr=2e-2, zero_stage=2, sync_bucket_mb=0.05,
                               lora=LoraConfig(rank=4, alpha=8, target_modules=targets)),
        algo_settings(), 0, 1, "127.0.0.1", free_port(), 8)
    seqs, batch = probe_batch()
    w0 = ray.get(eng.named_weights.remote())
    scores0 = torch.tensor(ray.get(eng.score.remote(seqs)))
    for _ in range(2):
        ray.get(learner.train.remote(batch))
    stats = sync(ray, [learner], eng, 1)
    w1 = ray.get(eng.named_weights.remote())
    merged = ray.get(learner.hf_state_dict.remote())
    sent = {f"{m}.weight" for m in _sync_modules(path, targets)}
    expected = _fused({n: t for n, t in merged.items() if n in sent}, w1)
    assert expected and ray.get(eng.get_version.remote()) == 1
    kinds = {n.split(".")[-2] for n in expected}
    assert kinds == {"qkv_proj", "in_proj_qkvz", "out_proj", "gate_up_proj"}, kinds  # fused siblings complete
    for n, t in expected.items():
        assert torch.equal(w1[n], t.to(w1[n].dtype)), f"{n}: engine differs from the learner's merged weights"
        assert not torch.equal(w1[n], w0[n]), f"{n}: unchanged by the sync"
    kept = [n for n in w0 if n not in expected]
    assert len(kept) > 20
    changed = [n for n in kept if not torch.equal(w0[n], w1[n])]
    assert not changed, f"weights outside the synced layers changed: {changed}"
    full = sum(t.numel() * t.element_size() for t in merged.values())
    assert 0 < stats["sync/bytes"] < full and stats["sync/buckets"] > 1
    scores1 = torch.tensor(ray.get(eng.score.remote(seqs)))
    assert (scores1 - scores0).abs().max().item() > 1e-3  # the engine's outputs follow
    ray.kill(eng)
    ray.kill(learner)


def test_zero3_two_ranks_engine_matches_learner_logprobs(ray_cluster, tiny_path):
    """ZeRO-3 on 2 ranks with LoRA on every linear layer (Qwen3, fp32 on both sides): after each
    update and sync the engine's logprobs equal the learner's (merged weights == base + adapters)."""
    ray = ray_cluster
    path = tiny_path("qwen3")
    eng = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=path, dtype="float32"))
    ray.get(eng.ready.remote())
    port = free_port()
    cls = ray.remote(num_cpus=0.25)(Learner)
    learners = [cls.remote(path, learner_settings(micro_batch_size=4, lr=2e-2, zero_stage=3, sync_bucket_mb=0.02, lora=LoraConfig(rank=4)),
                           algo_settings(), r, 2, "127.0.0.1", port, 8) for r in range(2)]
    seqs, batch = probe_batch()
    assert diff(ray, eng, learners, seqs, batch) < PARITY_TOL  # B = 0: merged == base at start
    for v in (1, 2):
        ray.get([x.train.remote(batch) for x in learners])
        assert diff(ray, eng, learners, seqs, batch) > 1e-3  # the learner moved, the engine is stale
        stats = sync(ray, learners, eng, v)
        assert stats["sync/buckets"] > 1
        assert diff(ray, eng, learners, seqs, batch) < PARITY_TOL, f"after sync {v}"
    for x in [eng, *learners]:
        ray.kill(x)


def test_lora_run_trains_end_to_end(train):
    import ray

    adapted = {}

    def count_adapters(ctl, metrics):
        adapted["modules"] = ray.get(ctl.learners[0].__ray_call__.remote(lambda learner: len(learner.lora)))

    metrics = train("steps=2", "eval.every=0", "learner.lora.rank=8", "rollout.prompts_per_step=8",
                    "rollout.group_size=4", "learner.micro_batch_size=32", on_step=count_adapters)
    assert adapted["modules"] == 25
    assert [m["policy/version"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["train/policy_tokens"] > 0 and m["sync/bytes"] > 0 and m["mismatch/kl"] < 0.05
