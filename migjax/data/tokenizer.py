"""Tokenizers: build the arithmetic task's byte-level BPE, load any HF tokenizer, map ids to text."""

from __future__ import annotations

import json
import os
import re

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from migjax.data import arith

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_TAG_RE = re.compile("|".join(re.escape(t) for t in TAG_TOKENS))
_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # SentencePiece's "▁" space marker
_CORPUS_PER_VARIANT = 500


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _training_texts(seed: int) -> list[str]:
    """Corpus texts of every arith variant."""
    texts = []
    for v_index, variant in enumerate(arith.VARIANTS):
        start = (seed * len(arith.VARIANTS) + v_index) * _CORPUS_PER_VARIANT
        texts.extend(arith.corpus(arith.arith_spec(variant), _CORPUS_PER_VARIANT, start=start))
    return texts


def build_arith_tokenizer(
    out_dir: str, *, vocab_size: int = 256, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the arith corpus, save it to `out_dir` and return it.

    `vocab_size` counts everything: the 128 ASCII byte symbols, the merges, the special tokens
    (pad, eos, unk) and the CoT tags. ASCII text round-trips exactly; any non-ASCII byte encodes
    to `<|unk|>`. Digits are always single tokens. The same `seed` gives the same files.
    """
    return build_bpe_tokenizer(out_dir, _training_texts(seed), vocab_size=vocab_size,
                               name="build_arith_tokenizer")


def build_bpe_tokenizer(out_dir: str, texts, *, vocab_size: int, extra_special=(),
                        name: str = "build_bpe_tokenizer") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (the CoT tags cut out: they are added tokens), with
    pad/eos/unk, the CoT tags and `extra_special` (e.g. image placeholder tokens, dropped by
    `decode(skip_special_tokens=True)`) as single tokens; saved to `out_dir`."""
    extra = tuple(extra_special)
    min_size = 128 + len(SPECIAL_TOKENS) + len(TAG_TOKENS) + len(extra)
    if vocab_size < min_size:
        raise ValueError(f"{name}: vocab_size must be >= {min_size} (ASCII bytes, "
                         f"special and tag tokens), got {vocab_size}")
    byte_chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS) - len(extra),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=[byte_chars[b] for b in range(128)],
        limit_alphabet=128,
        show_progress=False,
    )
    pieces = (p for text in texts for p in _TAG_RE.split(text) if p)
    tok.train_from_iterator(pieces, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a saved HF fast tokenizer from directory `path`; pad falls back to eos when unset."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_tokenizer: tokenizer directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"load_tokenizer: no tokenizer.json in {path!r} (found: {sorted(os.listdir(path))})"
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"load_tokenizer: tokenizer in {path!r} has neither a pad nor an "
                             "eos token; set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _decoder_steps(tokenizer) -> list[dict]:
    """The flattened list of decoder configs of a fast tokenizer's backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"token_strings: {type(tokenizer).__name__} is not a fast tokenizer "
                         "(no backend_tokenizer)")
    if backend.decoder is None:
        return []
    config = json.loads(backend.decoder.__getstate__())
    return config["decoders"] if config["type"] == "Sequence" else [config]


def _is_sp_space_replace(step: dict) -> bool:
    return step["type"] == "Replace" and step["pattern"].get("String") == _SP_SPACE


def token_strings(tokenizer, *, size: int | None = None) -> list[str]:
    """For every id, the text it contributes when decoded inside a sequence.

    Works for byte-level BPE tokenizers (bytes a token holds that are partial UTF-8 become
    U+FFFD) and for SentencePiece-style ones with the "▁" space marker (a leading space that
    decoding strips at the very start of a text is kept). `size` pads the table with "" up to
    a model's (possibly larger) vocabulary.
    """
    steps = _decoder_steps(tokenizer)
    types = [s["type"] for s in steps]
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    if "ByteLevel" in types:
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        out = []
        for tok in tokens:
            raw = b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in tok or "")
            out.append(raw.decode("utf-8", errors="replace"))
    elif "Metaspace" in types or any(_is_sp_space_replace(s) for s in steps):
        fallback = "ByteFallback" in types
        out = []
        for tok in tokens:
            tok = tok or ""
            m = _BYTE_FALLBACK_RE.match(tok) if fallback else None
            if m:
                byte = int(m.group(1), 16)
                out.append(chr(byte) if byte < 0x80 else "\ufffd")
            else:
                out.append(tok.replace(_SP_SPACE, " "))
    else:
        raise ValueError(
            f"token_strings: unsupported decoder {types or 'None'} of {type(tokenizer).__name__}; "
            "supported are byte-level BPE (ByteLevel) and SentencePiece-style '▁' decoders"
        )
    if size is not None:
        if size < n:
            raise ValueError(f"token_strings: size {size} is smaller than the tokenizer ({n})")
        out.extend([""] * (size - n))
    return out
