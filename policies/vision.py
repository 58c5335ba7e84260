"""Images in rollouts and batches (vision-language policies such as Qwen3.5's
`Qwen3_5ForConditionalGeneration`), from the env's chat message to the learner's forward pass.

- driver: an observation's image content parts ({"type": "image", "image": PIL.Image}) are rendered
  by the chat template as `<|vision_start|><|image_pad|><|vision_end|>`; the processor expands each
  `<|image_pad|>` to one token per merged patch and computes `pixel_values` / `image_grid_thw`. The
  trajectory keeps the expanded ids (what the model sees) and those tensors (`Trajectory.mm_inputs`).
- engine: vLLM expands every `<|image_pad|>` of a token prompt itself (a pre-expanded prompt would
  be expanded again), so each run of them is collapsed to one (`engine_prompt`) and the images go
  along as `multi_modal_data`; vLLM's prompt then equals the trajectory's ids.
- learner: `collate` pads the per-sample tensors to [B, max patches, D] and [B, max images, 3]
  (`pad_mm_inputs`); `model_inputs` runs the vision tower on a micro-batch's images, merges them into
  the token embeddings and computes the multimodal RoPE positions (transformers' `get_rope_index`,
  which vLLM mirrors) for the decoder.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

MM_KEYS = ("pixel_values", "image_grid_thw")


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image" or "image" in part or "image_url" in part)


def images_in(messages) -> list:
    """The images of a chat-message observation, in order (PIL images)."""
    if isinstance(messages, str):
        return []
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                if _is_image_part(part):
                    img = part.get("image")
                    if not hasattr(img, "convert") or not hasattr(img, "size"):
                        raise TypeError(
                            f"an image content part needs a PIL image under 'image' (got {type(img).__name__}); "
                            "return {'type': 'image', 'image': PIL.Image.Image} from the env"
                        )
                    out.append(img)
    return out


def render_key(obs, tools) -> str | None:
    """A cache key for a (possibly image-bearing) observation: images stand in by a digest of their
    pixels (episodes of a group share the observation). None if not JSON-able otherwise."""
    import json

    def enc(o):
        if hasattr(o, "tobytes") and hasattr(o, "size"):
            return ["<image>", o.mode, list(o.size), hashlib.sha1(o.tobytes()).hexdigest()]
        raise TypeError

    try:
        return json.dumps([obs, tools], sort_keys=True, default=enc)
    except (TypeError, ValueError):
        return None


def process_prompt(processor, text: str, images: list) -> tuple[list[int], dict]:
    """(expanded prompt ids, {"pixel_values": [patches, D], "image_grid_thw": [images, 3]})."""
    out = processor(text=[text], images=images, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    return ids, {k: out[k] for k in MM_KEYS}


def engine_prompt(ids: list[int], image_token_id: int, num_images: int) -> list[int]:
    """Collapse the first `num_images` runs of `<|image_pad|>` (the prompt's expanded placeholders)
    to one token each: vLLM expands them again from the images. Later ones (sampled by the policy)
    stay as they are."""
    out, runs, prev = [], 0, None
    for t in ids:
        if t != image_token_id:
            out.append(t)
        elif prev != image_token_id:  # a run starts
            runs += 1
            out.append(t)
        elif runs > num_images:  # inside a run that is not a prompt placeholder
            out.append(t)
        prev = t
    return out


def pad_mm_inputs(per_sample: list[dict]) -> dict[str, torch.Tensor]:
    """[B, max patches, D] pixel values and [B, max images, 3] grids, zero-padded; {} when no sample
    has images. A zero grid row means "no image"; a sample's patches are the first sum(t*h*w) rows."""
    if not any(mm.get("image_grid_thw") is not None and len(mm["image_grid_thw"]) for mm in per_sample):
        return {}
    B = len(per_sample)
    pv = [mm.get("pixel_values") for mm in per_sample]
    grids = [mm.get("image_grid_thw") for mm in per_sample]
    D = next(p.shape[-1] for p in pv if p is not None)
    P = max((p.shape[0] for p in pv if p is not None), default=0)
    N = max((g.shape[0] for g in grids if g is not None), default=0)
    pixel_values = torch.zeros(B, P, D, dtype=torch.float32)
    image_grid_thw = torch.zeros(B, N, 3, dtype=torch.long)
    for i, (p, g) in enumerate(zip(pv, grids)):
        if p is not None and g is not None:
            pixel_values[i, : p.shape[0]] = p.float()
            image_grid_thw[i, : g.shape[0]] = g
    return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


def _prompt_image_mask(input_ids: torch.Tensor, grids: torch.Tensor, image_token_id: int, merge: int):
    """[B, T] int: 1 at each row's first sum(t*h*w)/merge^2 `<|image_pad|>` tokens (its prompt's
    placeholders), 0 elsewhere, so an image-pad token the policy *sampled* stays text (as in vLLM)."""
    mask = torch.zeros_like(input_ids, dtype=torch.int)
    for i in range(input_ids.shape[0]):
        n = int(grids[i].prod(-1).sum()) // merge**2
        if n:
            pos = (input_ids[i] == image_token_id).nonzero().squeeze(1)[:n]
            if len(pos) < n:
                raise ValueError(f"row {i} has {len(pos)} image placeholder tokens for images of {n} tokens; the "
                                 "prompt ids must hold the processor's expanded placeholders")
            mask[i, pos] = 1
    return mask


def model_inputs(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Decoder keyword arguments for a (micro-)batch of a VL model (`Qwen3_5ForConditionalGeneration`,
    or a value model on its decoder, `.backbone`): `inputs_embeds` with the vision tower's outputs in
    the prompts' image placeholders (differentiable: the tower trains) and the multimodal RoPE
    `position_ids` [3, B, T] of transformers' `get_rope_index`. {} for text-only batches.

    Embeddings are merged here rather than by the model's forward, which would take every
    `<|image_pad|>` in input_ids for a placeholder, also one the policy sampled."""
    grids = batch.get("image_grid_thw")
    if grids is None or not bool((grids.prod(-1) > 0).any()):
        return {}
    base = model.backbone if hasattr(model, "backbone") else model.model  # the *Model with .visual
    cfg = model.config
    ids = batch["input_ids"]
    token_type = _prompt_image_mask(ids, grids, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
    pvs, gs = [], []
    for i in range(ids.shape[0]):
        g = grids[i][grids[i].prod(-1) > 0]
        if len(g):
            pvs.append(batch["pixel_values"][i, : int(g.prod(-1).sum())])
            gs.append(g)
    grid = torch.cat(gs)
    embeds = base.get_input_embeddings()(ids)
    feats = torch.cat(base.get_image_features(torch.cat(pvs), grid, return_dict=True).pooler_output)
    mask = token_type.bool().unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    position_ids, _ = base.get_rope_index(ids, token_type, image_grid_thw=grid)
    return {"inputs_embeds": embeds, "position_ids": position_ids}
