"""Tests for step segmentation in token space (migjax.rewards.segment)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.rewards.segment import segment_completions, step_spans_text


def encode(completions, length):
    """Builds a fake vocabulary from explicit token pieces; right-pads each completion."""
    vocab = ["<pad>"]
    index = {"<pad>": 0}
    tokens = np.zeros((len(completions), length), np.int32)
    mask = np.zeros((len(completions), length), bool)
    for n, pieces in enumerate(completions):
        for c, piece in enumerate(pieces):
            if piece not in index:
                index[piece] = len(vocab)
                vocab.append(piece)
            tokens[n, c] = index[piece]
            mask[n, c] = True
    return tokens, mask, vocab


def decode(tokens_row, mask_row, vocab, end=None):
    row = range(len(tokens_row) if end is None else end)
    return "".join(vocab[tokens_row[c]] for c in row if mask_row[c])


BASIC = ["<think>", "\n", "Step 1:", " add", " 2", "\n", "Step 2:", " double", "\n", "</think>",
         "\n", "<answer>", "4", "</answer>", "<eos>"]  # fmt: skip


def test_basic_hand_computed():
    tokens, mask, vocab = encode([BASIC], 18)
    seg = segment_completions(tokens, mask, vocab, max_steps=4)
    assert seg.step_id_NxC[0].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2] + [0] * 9
    assert seg.cot_mask_NxC[0].tolist() == [True] * 10 + [False] * 8
    assert seg.cuts_NxK1[0].tolist() == [1, 5, 8, 8, 8]
    assert seg.step_mask_NxK[0].tolist() == [True, True, False, False]
    assert seg.num_steps_N.tolist() == [2]
    assert seg.no_cot_N.tolist() == [False]
    assert seg.step_id_NxC.dtype == np.int32 and seg.cuts_NxK1.dtype == np.int32
    # prefix_K followed by the probe reproduces the natural completion text.
    prefix = decode(tokens[0], mask[0], vocab, end=seg.cuts_NxK1[0, 2])
    natural = decode(tokens[0], mask[0], vocab)
    assert natural.startswith(prefix + "\n</think>\n<answer>")
    assert decode(tokens[0], mask[0], vocab, end=seg.cuts_NxK1[0, 0]) == "<think>"
    assert decode(tokens[0], mask[0], vocab, end=seg.cuts_NxK1[0, 1]).endswith("Step 1: add 2")


def test_tokens_straddling_boundaries_go_to_their_first_char():
    pieces = ["<think>", "\nStep 1:", " a.\nStep", " 2: b", "\n</think>", "<answer>", "x"]
    tokens, mask, vocab = encode([pieces], 8)
    seg = segment_completions(tokens, mask, vocab, max_steps=3)
    # "\nStep 1:" starts with the newline before step 1 -> step 0; " a.\nStep" starts in step 1;
    # "\n</think>" starts with whitespace after the last step -> last step.
    assert seg.step_id_NxC[0].tolist() == [0, 0, 1, 2, 2, 0, 0, 0]
    assert seg.cot_mask_NxC[0].tolist() == [True] * 5 + [False] * 3
    # step 1 ends inside token 2 ("a."), step 2 inside token 3 ("b").
    assert seg.cuts_NxK1[0].tolist() == [1, 3, 4, 4]
    assert seg.num_steps_N.tolist() == [2]


def test_no_cot_cases():
    completions = [
        ["Step 1:", " x", "\n", "<answer>", "1", "</answer>"],  # no think_open
        ["<think>", "\n", "Step 1:", " x", "\n", "<answer>"],  # no think_close
        ["<think>", "\n", "just", " thinking", "\n", "</think>", "<answer>"],  # no step
        ["</think>", "<think>", "\n", "Step 1:", " y", "\n", "</think>"],  # close before open
    ]
    tokens, mask, vocab = encode(completions, 8)
    seg = segment_completions(tokens, mask, vocab, max_steps=2)
    assert seg.no_cot_N.tolist() == [True, True, True, False]
    assert seg.num_steps_N.tolist() == [0, 0, 0, 1]
    assert not seg.cot_mask_NxC[:3].any() and not seg.step_id_NxC[:3].any()
    assert not seg.step_mask_NxK[:3].any()
    assert seg.cuts_NxK1[:3].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    # the think_close that precedes think_open is not part of the CoT.
    assert seg.cot_mask_NxC[3].tolist() == [False] + [True] * 6 + [False]
    assert seg.step_id_NxC[3].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert seg.cuts_NxK1[3].tolist() == [2, 5, 5]


def test_steps_past_the_cap_merge_into_the_last():
    pieces = ["<think>", "\n"]
    for i in range(1, 5):
        pieces += [f"Step {i}:", f" s{i}", "\n"]
    pieces += ["</think>", "<answer>"]
    tokens, mask, vocab = encode([pieces], 16)
    seg = segment_completions(tokens, mask, vocab, max_steps=2)
    assert seg.step_id_NxC[0].tolist() == [0, 0, 1, 1, 1] + [2] * 9 + [0, 0]
    assert seg.cuts_NxK1[0].tolist() == [1, 4, 13]
    assert seg.num_steps_N.tolist() == [2]
    assert seg.step_mask_NxK[0].tolist() == [True, True]


def test_left_padded_mask_uses_c_axis_positions():
    tokens, mask, vocab = encode([["<pad>", "<pad>"] + BASIC], 17)
    mask[0, :2] = False
    seg = segment_completions(tokens, mask, vocab, max_steps=2)
    assert seg.cuts_NxK1[0].tolist() == [3, 7, 10]
    assert seg.step_id_NxC[0, :11].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert not seg.cot_mask_NxC[0, :2].any()


def test_delimiters_on_text():
    text = "<think>\nfirst line\n  second line \n\n\nthird\nfourth\n</think><answer>1</answer>"
    assert step_spans_text(text, delimiter="newline") == [(8, 18), (21, 32), (36, 41), (42, 48)]
    assert step_spans_text(text, delimiter="blank_line") == [(8, 32), (36, 48)]
    assert step_spans_text(text, delimiter="step") == []
    assert step_spans_text(text, delimiter="newline", max_steps=2) == [(8, 18), (21, 48)]
    steps = "<think>Step 1: a\nStep 2: b\n  Step 3: indented\nStep 10: c </think>"
    spans = step_spans_text(steps)
    assert [steps[s:e] for s, e in spans] == [
        "Step 1: a",
        "Step 2: b\n  Step 3: indented",
        "Step 10: c",
    ]
    assert step_spans_text("no cot here") == []
    assert step_spans_text("<think>Step 1: x") == []


def test_blank_line_delimiter_in_token_space():
    pieces = ["<think>", "\n", "a", " b", "\n", "c", "\n\n", "d", "\n", "</think>"]
    tokens, mask, vocab = encode([pieces], 10)
    seg = segment_completions(tokens, mask, vocab, max_steps=3, delimiter="blank_line")
    assert seg.step_id_NxC[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2, 0]
    assert seg.cuts_NxK1[0].tolist() == [1, 6, 8, 8]
    seg = segment_completions(tokens, mask, vocab, max_steps=3, delimiter="newline")
    assert seg.step_id_NxC[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 0]
    assert seg.cuts_NxK1[0].tolist() == [1, 4, 6, 8]


def test_custom_tags():
    pieces = ["[cot]", "Step 1:", " x", "[/cot]"]
    tokens, mask, vocab = encode([pieces], 4)
    seg = segment_completions(
        tokens, mask, vocab, max_steps=1, think_open="[cot]", think_close="[/cot]"
    )
    assert seg.step_id_NxC[0].tolist() == [0, 1, 1, 0]
    assert seg.cuts_NxK1[0].tolist() == [1, 3]


def test_bad_inputs_are_named():
    tokens, mask, vocab = encode([BASIC], 15)
    tokens[0, 3] = len(vocab) + 5
    with pytest.raises(ValueError, match="completion 0, position 3"):
        segment_completions(tokens, mask, vocab, max_steps=2)
    tokens[0, 3] = 1
    with pytest.raises(ValueError, match="delimiter"):
        segment_completions(tokens, mask, vocab, max_steps=2, delimiter="sentence")
    with pytest.raises(ValueError, match="max_steps"):
        segment_completions(tokens, mask, vocab, max_steps=0)
    with pytest.raises(ValueError, match="mask_NxC"):
        segment_completions(tokens, mask[:, :3], vocab, max_steps=2)


body_text = st.text(alphabet="ab1=. \t", min_size=0, max_size=8)


@st.composite
def cot_texts(draw):
    """A completion text with known steps and a random tokenization of it."""
    bodies = draw(st.lists(body_text, min_size=0, max_size=6))
    seps = draw(st.lists(st.sampled_from(["\n", "\n\n", " \n"]), min_size=6, max_size=6))
    preamble = draw(st.sampled_from(["\n", "", "\nLet me think.\n"]))
    text, contents = "<think>" + preamble, []
    for i, body in enumerate(bodies):
        contents.append((f"Step {i + 1}:" + body).rstrip())
        text += f"Step {i + 1}:" + body + seps[i]
    text += "</think>\n<answer>7</answer>"
    cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text) // 2)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return text, contents, pieces


@settings(max_examples=150, deadline=None)
@given(sample=cot_texts(), max_steps=st.integers(1, 4))
def test_random_tokenizations(sample, max_steps):
    text, contents, pieces = sample
    spans = step_spans_text(text)
    assert [text[s:e] for s, e in spans] == contents
    tokens, mask, vocab = encode([pieces], len(pieces) + 2)
    seg = segment_completions(tokens, mask, vocab, max_steps=max_steps)
    num_steps = min(len(contents), max_steps)
    assert seg.num_steps_N[0] == num_steps
    assert seg.no_cot_N[0] == (num_steps == 0)
    starts = np.cumsum([0] + [len(p) for p in pieces])
    capped = step_spans_text(text, max_steps=max_steps)
    close = text.index("</think>")
    for k, (s, e) in enumerate(capped, start=1):
        # prefix_k holds step k's content and ends with the token holding its last char.
        cut = seg.cuts_NxK1[0, k]
        assert starts[cut - 1] < e <= starts[cut]
        assert text[s:e].startswith("Step ")
    # every token's step is the one whose region holds the token's first char.
    region_starts = [s for s, _ in capped] + [close]
    for c in range(len(pieces)):
        expected = 0
        for k in range(len(capped)):
            if region_starts[k] <= starts[c] < region_starts[k + 1]:
                expected = k + 1
        assert seg.step_id_NxC[0, c] == expected
    if num_steps:
        assert seg.cuts_NxK1[0, num_steps:].tolist() == [seg.cuts_NxK1[0, num_steps]] * (
            max_steps + 1 - num_steps
        )
        in_cot = (starts[:-1] < close + len("</think>")) & (starts[1:] > 0)
        assert seg.cot_mask_NxC[0, : len(pieces)].tolist() == in_cot.tolist()
    assert np.all(np.diff(seg.cuts_NxK1[0]) >= 0)
    assert starts[seg.cuts_NxK1[0, 0]] >= len("<think>") > starts[seg.cuts_NxK1[0, 0] - 1]
