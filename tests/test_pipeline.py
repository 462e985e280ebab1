"""Tests for the host-side input pipeline: encoding, padding, variants, overlong handling, and the
grain iterator's determinism, epochs, exact resume and per-process sharding."""

import json
import logging

import numpy as np
import pytest

from migjax.data import arith
from migjax.data.pipeline import EncodedExamples, arith_examples, encode_examples, make_iterator
from migjax.data.sources import Example
from migjax.data.templates import DEFAULT_TEMPLATE, render_prompt
from migjax.data.tokenizer import build_arith_tokenizer
from migjax.types import PromptBatch

TASK = arith.ArithTask(arith.arith_spec("train"), size=1000)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_arith_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _encode(tok, examples, **kw):
    args = dict(render=arith.format_prompt, max_prompt_len=64, max_answer_len=4, max_variants=2)
    return encode_examples(examples, tok, **{**args, **kw})


@pytest.fixture(scope="module")
def enc(tok):
    encoded, stats = _encode(tok, arith_examples(TASK, 43))
    assert stats["encoded"] == 43
    return encoded


# ----------------------------------------------------------------------------- encoding


def test_arith_examples_adapter():
    exs = arith_examples(TASK, 3, offset=5)
    assert [e.id for e in exs] == [TASK[i].id for i in (5, 6, 7)]
    assert exs[1] == Example(TASK[6].id, TASK[6].question, (TASK[6].answer,))
    with pytest.raises(ValueError, match="exceed the task size 1000"):
        arith_examples(TASK, 10, offset=995)


def test_prompts_left_padded_with_masks(tok, enc):
    pad, p = tok.pad_token_id, enc.tokens_ExP.shape[1]
    for i in range(len(enc)):
        want = _ids(tok, arith.format_prompt(enc.questions[i]))
        n = len(want)
        assert enc.tokens_ExP[i, p - n :].tolist() == want
        assert (enc.tokens_ExP[i, : p - n] == pad).all()
        assert enc.mask_ExP[i].tolist() == [False] * (p - n) + [True] * n
        assert tok.decode(enc.tokens_ExP[i][enc.mask_ExP[i]]) == arith.format_prompt(
            enc.questions[i]
        )
    assert enc.tokens_ExP.dtype == np.int32 and enc.mask_ExP.dtype == bool


def test_trimmed_drops_only_unused_pad_columns(tok, enc):
    longest = int(enc.mask_ExP.sum(axis=1).max())
    assert longest < 56  # the fixture pads to 64: there is something to trim
    t = enc.trimmed(multiple=8)
    width = t.tokens_ExP.shape[1]
    assert width % 8 == 0 and longest <= width < longest + 8
    np.testing.assert_array_equal(t.tokens_ExP, enc.tokens_ExP[:, -width:])
    np.testing.assert_array_equal(t.mask_ExP, enc.mask_ExP[:, -width:])
    assert not enc.mask_ExP[:, :-width].any()  # nothing real was cut
    assert t.answers == enc.answers and repr(t) != repr(enc)
    assert t.trimmed(multiple=8) is t
    assert enc.trimmed(multiple=64) is enc


def test_answer_tokens_are_the_in_context_tokens(tok, enc):
    """The stored answer is exactly the token run between <answer> and </answer> in a solution."""
    open_id, close_id = _ids(tok, "<answer>")[0], _ids(tok, "</answer>")[0]
    for i in range(len(enc)):
        sol = _ids(tok, TASK[i].solution)
        inner = sol[sol.index(open_id) + 1 : sol.index(close_id)]
        assert enc.answer_ExVxA[i, 0][enc.answer_mask_ExVxA[i, 0]].tolist() == inner
        assert not enc.answer_mask_ExVxA[i, 1].any()  # one variant only
        assert enc.answers[i] == (TASK[i].answer,)


def test_answer_variants_filtered_padded_and_capped(tok):
    ex = Example("v", "Start with 1. What is the result?", ("1/2", "", "0.50000000", "0.5", "2/4"))
    enc, stats = _encode(tok, [ex], max_answer_len=4, max_variants=2)
    assert enc.answers == [("1/2", "0.5")]  # empty and 10-token variants dropped, then first 2
    assert stats["dropped_long_variant"] == 1 and stats["dropped_extra_variant"] == 1
    for v, text in enumerate(("1/2", "0.5")):
        want = _ids(tok, text)
        assert 0 < len(want) <= 4 and tok.decode(want) == text
        row = enc.answer_ExVxA[0, v].tolist()
        assert row == want + [tok.pad_token_id] * (4 - len(want))
        assert enc.answer_mask_ExVxA[0, v].tolist() == [True] * len(want) + [False] * (
            4 - len(want)
        )


def test_overlong_prompts_skip_and_truncate(tok, caplog):
    exs = arith_examples(TASK, 30)
    lengths = [len(_ids(tok, arith.format_prompt(e.question))) for e in exs]
    p = sorted(lengths)[15]
    n_long = sum(n > p for n in lengths)
    assert 0 < n_long < 30
    with caplog.at_level(logging.WARNING, logger="migjax.data.pipeline"):
        skipped, stats = _encode(tok, exs, max_prompt_len=p)
    assert stats["skipped_long_prompt"] == n_long and stats["encoded"] == 30 - n_long
    assert skipped.ids == [e.id for e, n in zip(exs, lengths, strict=True) if n <= p]
    assert "skipped_long_prompt" in caplog.text and str(30 - n_long) in caplog.text

    cut, stats = _encode(tok, exs, max_prompt_len=p, overlong="truncate")
    assert stats["truncated_prompt"] == n_long and stats["encoded"] == 30
    assert stats["skipped_long_prompt"] == 0
    for i, e in enumerate(exs):
        want = _ids(tok, arith.format_prompt(e.question))[-p:]
        assert cut.tokens_ExP[i][cut.mask_ExP[i]].tolist() == want


def test_long_answers_and_empty_examples_skipped(tok):
    exs = [
        Example("ok", "Start with 2.", ("2",)),
        Example("long", "Start with 3.", ("123456",)),
        Example("blank_q", "  \n", ("4",)),
        Example("no_answer", "Start with 5.", ()),
        Example("empty_answer", "Start with 6.", ("",)),
    ]
    enc, stats = _encode(tok, exs, max_answer_len=4)
    assert enc.ids == ["ok"]
    assert stats == {
        "encoded": 1,
        "skipped_long_prompt": 0,
        "skipped_long_answer": 1,
        "skipped_empty": 3,
        "truncated_prompt": 0,
        "dropped_long_variant": 0,
        "dropped_extra_variant": 0,
    }
    with pytest.raises(ValueError, match="overlong must be one of"):
        _encode(tok, exs, overlong="cut")


def test_render_prompt_flows_through(tok):
    exs = arith_examples(TASK, 4)

    def render(q):
        return render_prompt(q, tok, template=DEFAULT_TEMPLATE, completion_prefix="<think>\n")

    enc, stats = _encode(tok, exs, render=render, max_prompt_len=256)
    assert stats["encoded"] == 4
    think = _ids(tok, "<think>")[0]
    assert (enc.tokens_ExP[:, -2] == think).all()  # "<think>" then "\n" end every prompt


def test_getitem_and_stable_repr(tok, enc):
    rec = enc[7]
    assert int(rec["example_id"]) == 7
    np.testing.assert_array_equal(rec["tokens_P"], enc.tokens_ExP[7])
    np.testing.assert_array_equal(rec["answer_mask_VxA"], enc.answer_mask_ExVxA[7])
    with pytest.raises(IndexError):
        enc[len(enc)]
    again, _ = _encode(tok, arith_examples(TASK, 43))
    other, _ = _encode(tok, arith_examples(TASK, 43, offset=1))
    assert repr(again) == repr(enc) != repr(other)
    assert repr(enc).startswith("EncodedExamples(E=43, P=64, V=2, A=4, ")
    with pytest.raises(ValueError, match="mask_ExP has shape"):
        EncodedExamples(
            enc.tokens_ExP,
            enc.mask_ExP[:, 1:],
            enc.answer_ExVxA,
            enc.answer_mask_ExVxA,
            enc.ids,
            enc.questions,
            enc.answers,
        )


# ----------------------------------------------------------------------------- iterator


def _take(it, n):
    return [next(it) for _ in range(n)]


def _ids_of(batches):
    return [b.example_id_B.tolist() for b in batches]


def test_batches_match_encoded_rows(enc):
    b = next(make_iterator(enc, batch_size=8, seed=3))
    assert isinstance(b, PromptBatch)
    i = b.example_id_B
    assert b.tokens_BxP.shape == (8, 64) and b.answer_BxVxA.shape == (8, 2, 4)
    assert [x.dtype for x in b] == [np.int32, bool, np.int32, bool, np.int32]
    np.testing.assert_array_equal(b.tokens_BxP, enc.tokens_ExP[i])
    np.testing.assert_array_equal(b.mask_BxP, enc.mask_ExP[i])
    np.testing.assert_array_equal(b.answer_BxVxA, enc.answer_ExVxA[i])
    np.testing.assert_array_equal(b.answer_mask_BxVxA, enc.answer_mask_ExVxA[i])


def test_unshuffled_order_and_finite_epochs(enc):
    it = make_iterator(enc, batch_size=10, seed=0, shuffle=False, num_epochs=2)
    assert it.batches_per_epoch == 4  # 43 // 10, remainder dropped
    got = _ids_of(list(it))
    epoch = [list(range(k, k + 10)) for k in range(0, 40, 10)]
    assert got == epoch + epoch


def test_same_seed_same_order_epochs_reshuffle(enc):
    a = _ids_of(_take(make_iterator(enc, batch_size=8, seed=5), 15))
    b = _ids_of(_take(make_iterator(enc, batch_size=8, seed=5), 15))
    c = _ids_of(_take(make_iterator(enc, batch_size=8, seed=6), 15))
    assert a == b and a != c
    epochs = [sum(a[k : k + 5], []) for k in (0, 5, 10)]  # 43 // 8 = 5 batches per epoch
    for e in epochs:
        assert len(set(e)) == 40 and set(e) <= set(range(43))  # no repeats within an epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


@pytest.mark.parametrize("consumed, prefetch", [(0, 4), (1, 0), (4, 4), (5, 0), (6, 4), (13, 1)])
def test_resume_is_exact_after_json_round_trip(enc, consumed, prefetch):
    it = make_iterator(enc, batch_size=8, seed=11, prefetch=prefetch)
    _take(it, consumed)
    state = json.loads(json.dumps(it.get_state()))
    want = _take(it, 7)
    fresh = make_iterator(enc, batch_size=8, seed=11)
    _take(fresh, 2)  # a used iterator is moved back too
    fresh.set_state(state)
    got = _take(fresh, 7)
    for w, g in zip(want, got, strict=True):
        for x, y in zip(w, g, strict=True):
            np.testing.assert_array_equal(x, y)


def test_resume_rejects_other_pipelines(tok, enc):
    state = make_iterator(enc, batch_size=8, seed=0).get_state()
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        make_iterator(enc, batch_size=4, seed=0).set_state(state)
    other, _ = _encode(tok, arith_examples(TASK, 43, offset=2))
    with pytest.raises(ValueError, match="data: saved"):
        make_iterator(other, batch_size=8, seed=0).set_state(state)
    with pytest.raises(ValueError, match="not a version-1 iterator state"):
        make_iterator(enc, batch_size=8, seed=0).set_state({"next_index": 3})


def test_shards_are_disjoint_and_in_lockstep(enc):
    kw = dict(batch_size=5, seed=2, shard_count=2)
    s0, s1 = make_iterator(enc, shard_index=0, **kw), make_iterator(enc, shard_index=1, **kw)
    assert s0.batches_per_epoch == s1.batches_per_epoch == 4  # 43 // 2 = 21 per shard
    e0 = set(sum(_ids_of(_take(s0, 4)), []))
    e1 = set(sum(_ids_of(_take(s1, 4)), []))
    assert len(e0) == len(e1) == 20 and not e0 & e1
    assert e0 <= set(range(0, 42, 2)) and e1 <= set(range(1, 42, 2))  # example 42 left out
    # One saved state (process 0's) restores every process at the same step.
    state = json.loads(json.dumps(s0.get_state()))
    want = _ids_of(_take(s1, 3))
    moved = make_iterator(enc, shard_index=1, **kw)
    moved.set_state(state)
    assert _ids_of(_take(moved, 3)) == want


def test_iterator_argument_errors(enc):
    with pytest.raises(ValueError, match="fewer than batch_size=30"):
        make_iterator(enc, batch_size=30, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make_iterator(enc, batch_size=4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="num_epochs"):
        make_iterator(enc, batch_size=4, seed=0, num_epochs=0)
