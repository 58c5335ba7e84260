"""Small tokenizers with a ChatML chat template, made locally (no hub access needed).

- `char` (default for tiny models): one token per character of a 70-symbol alphabet (ASCII letters,
  digits, space, newline, punctuation) plus specials. A random-init policy then starts nearly
  uniform over ~75 actions, small enough for RL to find rewarded answers within minutes.
- `byte`: byte-level, every byte one token (259 ids): any text round-trips exactly.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK = "<unk>"
CHAR_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;?!-+=*/()'\"<>_#%"

# Tool-call markers: single (non-special) tokens, as in Qwen3.5's vocabulary.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOKENIZER_VERSION = 2  # bump when the vocabulary or template changes (part of the tiny-model cache key)

# Qwen3.5-style ChatML template: text content or a list of {"type": "text"} parts; `tools` rendered
# into the system turn with the XML tool-call instructions; consecutive `tool` messages grouped into
# one user turn of <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- macro text(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}{{- c | map(attribute='text') | join('') -}}{%- endif -%}{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- text(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# tools\\n\\nyou have access to these functions:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nto call a function reply with:\\n<tool_call>\\n<function=name>\\n<parameter=arg>\\nvalue\\n</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and tools and loop.first -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: ids 0..2 are specials, then the 256 byte symbols."""
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(TOOL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: specials, <unk>, then CHAR_ALPHABET; characters outside it become <unk>."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [UNK])}
    for ch in CHAR_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(TOOL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


BUILDERS = {"char": build_char_tokenizer, "byte": build_byte_tokenizer}

# Vision-language tiny models: Qwen's vision special tokens, and a template whose content parts may
# be images ({"type": "image", ...}), each rendered as Qwen renders it. The processor then expands
# the one <|image_pad|> into as many as the image has patches after merging.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_TEXT_MACRO = ("{%- macro text(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}"
               "{{- c | map(attribute='text') | join('') -}}{%- endif -%}{%- endmacro -%}")
_VL_TEXT_MACRO = (
    "{%- macro text(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}{%- for p in c -%}"
    "{%- if p['type'] == 'image' or 'image' in p or 'image_url' in p -%}{{- '" + IMAGE_PLACEHOLDER + "' -}}"
    "{%- elif 'text' in p -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
assert CHAT_TEMPLATE.startswith(_TEXT_MACRO), "CHAT_TEMPLATE's text() macro changed: update _TEXT_MACRO"
VL_CHAT_TEMPLATE = _VL_TEXT_MACRO + CHAT_TEMPLATE[len(_TEXT_MACRO):]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable-symbol map (what a ByteLevel pre-tokenizer emits for each byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def build_vl_tokenizer(kind: str = "char"):
    """Tokenizer of a `qwen3_5_vl` tiny model. transformers loads the tokenizer of every model_type
    `qwen3_5` checkpoint as `Qwen3_5Tokenizer` (byte-level BPE over the saved vocabulary), whatever
    tokenizer.json says, so it is built as one: then the driver, vLLM and the processor all tokenize
    alike. `char`: the byte symbols of CHAR_ALPHABET plus upper-case letters (~100 ids; other
    characters are dropped, as that class has no unknown token); `byte`: all 256 bytes."""
    from transformers import Qwen3_5Tokenizer

    sym = _byte_symbols()
    if kind == "char":
        chars = CHAR_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        symbols = list(dict.fromkeys(sym[b] for b in chars.encode()))
    elif kind == "byte":
        symbols = [sym[b] for b in range(256)]
    else:
        raise ValueError(f"unknown tiny tokenizer {kind!r}; use one of {', '.join(BUILDERS)}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for s_ in symbols:
        vocab.setdefault(s_, len(vocab))
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>")
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tok.add_tokens(TOOL_TOKENS)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.chat_template = VL_CHAT_TEMPLATE
    return tok


def save_tokenizer(folder: str | Path, kind: str = "char", vision: bool = False):
    """`vision`: the vision-language variant (`build_vl_tokenizer`)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny tokenizer {kind!r}; use one of {', '.join(BUILDERS)}")
    tok = build_vl_tokenizer(kind) if vision else BUILDERS[kind]()
    tok.save_pretrained(str(folder))
    return tok
