"""Resolve `policy.path` to a checkpoint folder (creating tiny models on first use) and load tokenizers."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from filelock import FileLock

from policies.tiny import TinySpec, build_tiny_checkpoint

TINY_PREFIX = "tiny:"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QRL_CACHE", Path.home() / ".cache" / "qrl"))


def resolve_policy_path(path: str, tiny: dict | None = None, cache_dir: str | Path | None = None,
                        key: str = "policy.path") -> str:
    """Return a local folder or hub id for `path` (`key`: the config key it came from, for errors).

    `tiny:<name>` builds (once, cached by spec) a random-weight tiny model from `tiny` settings.
    A local folder must hold `config.json` and weights (*.safetensors or *.bin); anything else that
    looks like `org/name` is passed on as a hub id (transformers/vLLM download it).
    """
    if path.startswith(TINY_PREFIX):
        spec = TinySpec(**(tiny or {}))
        digest = hashlib.sha1(spec.fingerprint().encode()).hexdigest()[:10]
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        folder = root / "models" / f"{path[len(TINY_PREFIX):]}-{spec.family}-{digest}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder / "model.safetensors").exists():
                build_tiny_checkpoint(folder, spec)
        return str(folder)
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"{key}={path!r} is a folder without config.json; point it at an HF checkpoint "
                "folder (config.json + *.safetensors + tokenizer files) or a hub id like Qwen/Qwen3.5-0.8B"
            )
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise FileNotFoundError(
                f"{key}={path!r} has config.json but no weights (*.safetensors or pytorch_model*.bin); "
                "save the model into it (model.save_pretrained(folder)) or point it at a complete HF checkpoint"
            )
        return str(p.resolve())
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"{key}={path!r} does not exist; give an existing HF checkpoint folder, a hub id "
            "like Qwen/Qwen3.5-0.8B, or tiny:<name> for a random-weight test model"
        )
    return path


def is_vision_language(path: str) -> bool:
    """Whether the checkpoint is a vision-language model (config.json has a vision_config)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None


def auto_model_class(path: str):
    """The transformers auto class that loads `path` with its LM head: AutoModelForImageTextToText
    for vision-language checkpoints (e.g. Qwen3_5ForConditionalGeneration: AutoModelForCausalLM would
    load only its text stack), AutoModelForCausalLM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM


def load_processor(path: str):
    """The multimodal processor of a vision-language checkpoint (None for text-only models)."""
    if not is_vision_language(path):
        return None
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    if getattr(proc, "image_processor", None) is None:
        raise ValueError(f"the vision-language checkpoint {path!r} has no image processor config; save its "
                         "processor (processor_config.json / preprocessor_config.json) into the folder")
    return proc


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str):
    """The policy's tokenizer; a local folder without tokenizer files or a tokenizer without a chat
    template fails here, before anything else loads (transformers would quietly build an empty
    tokenizer from config.json alone)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"policy.path={path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the base "
            "model's tokenizer into it (AutoTokenizer.from_pretrained(base).save_pretrained(folder))"
        )
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"the tokenizer at {path!r} has no chat template; add one (chat_template.jinja, or `chat_template` "
            "in its tokenizer_config.json; tokenizer.chat_template = ...; tokenizer.save_pretrained(folder)) "
            "or use an instruct checkpoint"
        )
    return tok
