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

# Qwen-style ChatML template (text content or a list of {"type": "text"} parts).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
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
