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


def save_tokenizer(folder: str | Path, kind: str = "char") -> PreTrainedTokenizerFast:
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny tokenizer {kind!r}; use one of {', '.join(BUILDERS)}")
    tok = BUILDERS[kind]()
    tok.save_pretrained(str(folder))
    return tok
