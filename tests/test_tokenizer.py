"""Tests for the arith tokenizer (round trip, determinism, reload) and the id -> text table."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from migjax.data import arith
from migjax.data import tokenizer as tk

ASCII_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=80)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok_a"))
    return out, tk.build_arith_tokenizer(out)


@pytest.fixture(scope="module")
def loaded(built):
    return tk.load_tokenizer(built[0])


@pytest.fixture(scope="module")
def texts():
    return [t for v in arith.VARIANTS for t in arith.corpus(arith.arith_spec(v), 150, start=10**6)]


def test_build_is_deterministic(built, tmp_path, texts):
    out_a, tok_a = built
    tok_b = tk.build_arith_tokenizer(str(tmp_path / "b"))
    with (
        open(os.path.join(out_a, "tokenizer.json"), "rb") as fa,
        open(tmp_path / "b" / "tokenizer.json", "rb") as fb,
    ):
        assert fa.read() == fb.read()
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert [tok_a.encode(t) for t in texts[::10]] == [tok_b.encode(t) for t in texts[::10]]


def test_reload_is_identical(built, loaded, texts):
    _, tok = built
    again = PreTrainedTokenizerFast.from_pretrained(built[0])
    for t in (loaded, again):
        assert t.pad_token == tk.PAD and t.eos_token == tk.EOS
        assert (t.pad_token_id, t.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
        assert t.pad_token_id != t.eos_token_id
        assert t.get_vocab() == tok.get_vocab() and len(t) == len(tok)
        assert [t.encode(x) for x in texts] == [tok.encode(x) for x in texts]


def test_vocab_layout(loaded):
    assert len(loaded) <= 256
    for tag in tk.TAG_TOKENS:
        (tag_id,) = loaded.encode(tag)
        assert loaded.convert_ids_to_tokens(tag_id) == tag
        assert tag_id not in loaded.all_special_ids
    assert set(loaded.all_special_ids) >= {loaded.pad_token_id, loaded.eos_token_id}
    text = "<think>\nStep 1: 2 + 3 = 5\n</think>\n<answer>5</answer>"
    ids = loaded.encode(text) + [loaded.eos_token_id, loaded.pad_token_id]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.decode(ids, skip_special_tokens=False) == text + tk.EOS + tk.PAD
    assert loaded.encode("") == []


def test_digits_are_single_tokens(loaded):
    for s in tk.token_strings(loaded):
        assert not any(c.isdigit() for c in s) or len(s) == 1, repr(s)
    ids = loaded.encode("x 1234 = 56")
    assert [tk.token_strings(loaded)[i] for i in ids][-2:] == ["5", "6"]


def test_corpus_round_trip_and_token_strings(loaded, texts):
    table = tk.token_strings(loaded)
    assert len(table) == len(loaded)
    for text in texts:
        ids = loaded.encode(text)
        assert loaded.decode(ids, skip_special_tokens=False) == text
        assert "".join(table[i] for i in ids) == text
    # the prompt and the completion tokenize the same apart as together
    item = arith.ArithTask(arith.arith_spec("train"))[3]
    prompt = arith.format_prompt(item.question)
    assert loaded.encode(prompt + item.solution) == loaded.encode(prompt) + loaded.encode(
        item.solution
    )


@settings(max_examples=200, deadline=None)
@given(text=ASCII_TEXT)
def test_ascii_round_trip(loaded, text):
    ids = loaded.encode(text)
    assert loaded.decode(ids, skip_special_tokens=False) == text
    table = tk.token_strings(loaded)
    assert "".join(table[i] for i in ids) == text


def test_round_trip_with_tags_and_specials(loaded):
    text = "a<think>b</think>\r\n<answer>-7</answer>\t<|pad|>x<|endoftext|>\x00~"
    assert loaded.decode(loaded.encode(text), skip_special_tokens=False) == text


def test_non_ascii_is_unk_not_dropped(loaded):
    ids = loaded.encode("a\u00e9b")
    assert loaded.unk_token_id in ids
    assert loaded.decode(ids, skip_special_tokens=False) == "a" + tk.UNK * 2 + "b"


def test_build_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 135"):
        tk.build_arith_tokenizer(str(tmp_path), vocab_size=100)


def test_bytes_to_unicode_matches_byte_level_alphabet():
    table = tk.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")]) == ("\u0120", "\u010a", "A")


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        tk.load_tokenizer(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*empty"):
        tk.load_tokenizer(str(empty))


def _tiny_byte_level(eos=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def test_load_tokenizer_pad_falls_back_to_eos(tmp_path):
    _tiny_byte_level(eos="<eos>").save_pretrained(str(tmp_path / "eos"))
    tok = tk.load_tokenizer(str(tmp_path / "eos"))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    _tiny_byte_level().save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        tk.load_tokenizer(str(tmp_path / "bare"))


def _full_byte_bpe():
    """A GPT-2 style byte-level BPE over all 256 bytes with a few merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he"), ("\u00c3", "\u00a9")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_token_strings_generic_byte_level():
    tok = _full_byte_bpe()
    table = tk.token_strings(tok)
    assert table[tok.convert_tokens_to_ids("\u0120the")] == " the"
    assert table[tok.convert_tokens_to_ids("\u00c3\u00a9")] == "\u00e9"  # whole UTF-8 char
    assert table[tok.convert_tokens_to_ids("\u00c3")] == "\ufffd"  # lone lead byte
    for text in ("the cat\n\tthe end", "caf\u00e9 the"):
        ids = tok.encode(text)
        assert "".join(table[i] for i in ids) == tok.decode(ids) == text
    padded = tk.token_strings(tok, size=len(tok) + 3)
    assert padded[: len(tok)] == table and padded[len(tok) :] == ["", "", ""]
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tk.token_strings(tok, size=len(tok) - 1)


def _sentencepiece_style():
    """A Llama-2 style tokenizer: "▁" spaces, byte fallback, strip of the leading space."""
    pieces = [
        "<unk>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "\u2581",
        *"abcdehlorstw",
        "\u2581t",
        "he",
        "\u2581the",
        "ll",
        "\u2581w",
    ]
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("l", "l"), ("\u2581", "w")]
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(pieces)},
            merges=merges,
            unk_token="<unk>",
            byte_fallback=True,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_token_strings_sentencepiece_style():
    tok = _sentencepiece_style()
    table = tk.token_strings(tok)
    assert table[tok.convert_tokens_to_ids("\u2581the")] == " the"
    assert table[tok.convert_tokens_to_ids("<0x0A>")] == "\n"
    assert table[tok.convert_tokens_to_ids("<0xC3>")] == "\ufffd"
    for text in ("the well\nwas cold", "hello World 42!"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert "".join(table[i] for i in ids) == " " + text  # decode strips the leading space


def test_token_strings_rejects_other_decoders():
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="unsupported decoder.*WordPiece"):
        tk.token_strings(PreTrainedTokenizerFast(tokenizer_object=tok))
