"""Tests for the arithmetic task: determinism, exact chains, ranges, distractors and split overlap."""

import dataclasses
import functools
import operator
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.data import arith

_OP_RE = re.compile(r"^(Start with|Add|Subtract|Multiply by) (\d+)\.$")
_PY_OPS = {
    "Add": ("+", operator.add),
    "Subtract": ("-", operator.sub),
    "Multiply by": ("*", operator.mul),
}


def parse_question(question):
    """Independent reading of a question: (start, [(op, b)], distractor sentences)."""
    assert question.endswith(" What is the result?")
    sentences = re.split(r"(?<=\.) ", question[: -len(" What is the result?")])
    start, ops, distractors = None, [], []
    for s in sentences:
        m = _OP_RE.match(s)
        if m is None:
            distractors.append(s)
        elif m.group(1) == "Start with":
            assert start is None and not ops, question
            start = int(m.group(2))
        else:
            assert start is not None, question
            ops.append((m.group(1), int(m.group(2))))
    return start, ops, distractors


def reference_solution(question):
    """Steps, answer and solution text recomputed from the question alone."""
    start, ops, _ = parse_question(question)
    v, lines, values = start, [], [start]
    for k, (word, b) in enumerate(ops, start=1):
        sym, fn = _PY_OPS[word]
        nxt = fn(v, b)
        lines.append(f"Step {k}: {v} {sym} {b} = {nxt}")
        v = nxt
        values.append(v)
    solution = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>" + str(v) + "</answer>"
    return tuple(lines), str(v), solution, values


def sample(variant, n, start=0):
    task = arith.ArithTask(arith.arith_spec(variant))
    return [task[i] for i in range(start, start + n)]


def test_determinism_and_indexing():
    spec = arith.arith_spec("train")
    a, b = arith.ArithTask(spec, size=1000), arith.ArithTask(spec, size=1000)
    for i in (0, 1, 7, 999):
        assert a[i] == b[i] == a[i]
    assert a[-1] == a[999]
    assert len(a) == 1000 and len(arith.ArithTask(spec)) >= 1_000_000
    with pytest.raises(IndexError, match="out of range"):
        a[1000]
    assert a[5].id == "arith/0/5"
    other = arith.ArithTask(dataclasses.replace(spec, seed=123))
    assert sum(other[i].question != a[i].question for i in range(50)) >= 45


def test_solution_format_is_exact():
    item = sample("train", 1)[0]
    assert item.solution.startswith("<think>\nStep 1: ")
    assert item.solution == (
        "<think>\n" + "\n".join(item.steps) + "\n</think>\n<answer>" + item.answer + "</answer>"
    )
    for k, line in enumerate(item.steps, start=1):
        assert re.fullmatch(rf"Step {k}: \d+ [-+*] \d+ = \d+", line), line


@pytest.mark.parametrize("variant", arith.VARIANTS)
def test_answers_match_recomputed_chain_and_ranges(variant):
    spec = arith.arith_spec(variant)
    for item in sample(variant, 400):
        steps, answer, solution, values = reference_solution(item.question)
        assert (item.steps, item.answer, item.solution) == (steps, answer, solution)
        assert spec.min_steps <= len(steps) <= spec.max_steps
        assert all(0 <= v <= spec.max_value for v in values), item.question
        start, ops, _ = parse_question(item.question)
        assert 1 <= start <= spec.max_operand
        for word, b in ops:
            assert (2 if word == "Multiply by" else 1) <= b <= spec.max_operand


def test_hand_computed_chain():
    item = arith.make_item(arith.arith_spec("train"), 5)
    # index 5 of the train preset, worked by hand: ((5 - 2) + 6) + 6 = 15; the rope is noise
    assert item.question == (
        "Start with 5. Subtract 2. A rope is 14 m long. Add 6. Add 6. What is the result?"
    )
    assert item.steps == ("Step 1: 5 - 2 = 3", "Step 2: 3 + 6 = 9", "Step 3: 9 + 6 = 15")
    assert item.answer == "15"
    assert item.solution == (
        "<think>\nStep 1: 5 - 2 = 3\nStep 2: 3 + 6 = 9\nStep 3: 9 + 6 = 15"
        "\n</think>\n<answer>15</answer>"
    )


def test_ood_has_longer_chains_and_larger_numbers():
    train, ood = sample("train", 500), sample("ood", 500)
    assert max(len(it.steps) for it in train) < min(len(it.steps) for it in ood)
    train_max = max(max(reference_solution(it.question)[3]) for it in train)
    ood_max = max(max(reference_solution(it.question)[3]) for it in ood)
    assert train_max <= 99 < ood_max <= 999
    assert {len(it.steps) for it in ood} == {5, 6}


@pytest.mark.parametrize("variant,counts", [("train", {0, 1}), ("test", {0, 1}), ("ood", {2})])
def test_distractors_present_and_unused(variant, counts):
    seen = set()
    for item in sample(variant, 400):
        start, ops, distractors = parse_question(item.question)
        seen.add(len(distractors))
        chain_numbers = {start, *(b for _, b in ops)}
        assert item.distractors == tuple(int(re.findall(r"\d+", d)[0]) for d in distractors)
        for d in distractors:
            numbers = [int(x) for x in re.findall(r"\d+", d)]
            assert len(numbers) == 1, d
            assert numbers[0] not in chain_numbers, item.question
        # dropping the distractor sentences leaves the answer unchanged
        stripped = item.question
        for d in distractors:
            stripped = stripped.replace(d + " ", "")
        assert reference_solution(stripped)[1] == item.answer
    assert seen == counts


def _chain(item):
    start, ops, _ = parse_question(item.question)
    return start, tuple(ops)


def test_splits_do_not_overlap_with_train():
    train = sample("train", 3000)
    train_q = {it.question for it in train}
    train_chains = {_chain(it) for it in train}
    for variant in ("test", "ood"):
        other = sample(variant, 1500)
        assert not train_q & {it.question for it in other}
        assert not train_chains & {_chain(it) for it in other}
    # a non-held-out spec with another seed does share chains with train: the check has power
    reseeded = arith.ArithTask(dataclasses.replace(arith.arith_spec("train"), seed=99))
    assert train_chains & {_chain(reseeded[i]) for i in range(1500)}
    assert all(arith.chain_bucket(*_bucket_args(it)) != 0 for it in train[:200])
    assert all(arith.chain_bucket(*_bucket_args(it)) == 0 for it in sample("test", 200))


def _bucket_args(item):
    start, ops = _chain(item)
    return start, tuple(_PY_OPS[w][0] for w, _ in ops), tuple(b for _, b in ops)


def test_check_answer():
    assert arith.check_answer("32", "32")
    assert arith.check_answer(" 32\n", "32")
    assert arith.check_answer("032", "32")
    assert not arith.check_answer("33", "32")
    assert not arith.check_answer(None, "32")
    assert not arith.check_answer("", "32")
    assert not arith.check_answer("32.5", "32")
    assert not arith.check_answer("thirty", "32")


def test_format_prompt_and_corpus():
    assert arith.format_prompt("Start with 1. Add 2. What is the result?") == (
        "Question: Start with 1. Add 2. What is the result?\nAnswer: "
    )
    spec = arith.arith_spec("test")
    texts = arith.corpus(spec, 3, start=4)
    item = arith.ArithTask(spec)[5]
    assert len(texts) == 3
    assert texts[1] == arith.format_prompt(item.question) + item.solution


def test_spec_validation():
    with pytest.raises(ValueError, match="min_steps"):
        arith.ArithSpec(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="ops"):
        arith.ArithSpec(ops="+/")
    with pytest.raises(ValueError, match="ops"):
        arith.ArithSpec(ops="")
    with pytest.raises(ValueError, match="max_value"):
        arith.ArithSpec(max_operand=9, max_value=5)
    with pytest.raises(ValueError, match="min_distractors"):
        arith.ArithSpec(min_distractors=2, num_distractors=1)
    with pytest.raises(ValueError, match="unknown variant 'dev'"):
        arith.arith_spec("dev")
    impossible = arith.ArithSpec(min_steps=5, max_steps=5, max_operand=2, max_value=9, ops="*")
    with pytest.raises(RuntimeError, match="no valid chain for index 3"):
        arith.make_item(impossible, 3)


@settings(max_examples=60, deadline=None)
@given(
    min_steps=st.integers(1, 4),
    extra=st.integers(0, 3),
    max_operand=st.integers(5, 20),
    value_factor=st.integers(8, 60),
    ops=st.sampled_from(["+", "+-", "+*", "-*", "+-*"]),
    n_distractors=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    index=st.integers(0, 10**9),
)
def test_property_any_spec(
    min_steps, extra, max_operand, value_factor, ops, n_distractors, seed, index
):
    # max_value >= max_operand * (max_steps + 1): a chain of additions always fits
    spec = arith.ArithSpec(
        min_steps=min_steps,
        max_steps=min_steps + extra,
        max_operand=max_operand,
        max_value=max_operand * value_factor,
        num_distractors=n_distractors,
        ops=ops,
        seed=seed,
    )
    item = arith.make_item(spec, index)
    steps, answer, solution, values = reference_solution(item.question)
    assert (item.steps, item.answer, item.solution) == (steps, answer, solution)
    assert min_steps <= len(steps) <= min_steps + extra
    assert all(0 <= v <= spec.max_value for v in values)
    assert {s.split()[3] for s in steps} <= set(ops)
    assert len(parse_question(item.question)[2]) <= n_distractors
    assert arith.make_item(spec, index) == item


def test_chain_is_valid():
    ok = "<think>\nStep 1: 3 + 7 = 10\nStep 2: 10 * 2 = 20\nStep 3: 20 - 9 = 11\n</think>"
    assert arith.chain_is_valid(ok)
    assert arith.chain_is_valid(arith.make_item(arith.arith_spec("train"), 5).solution)
    assert not arith.chain_is_valid(ok.replace("= 10", "= 11"))  # wrong arithmetic
    assert not arith.chain_is_valid(ok.replace("Step 2: 10", "Step 2: 12").replace("= 20", "= 24"))
    assert not arith.chain_is_valid("<think>\n</think>\n<answer>10</answer>")  # no step
    assert not arith.chain_is_valid("Step 1: 3 + 7 = 10 and more")  # not a whole step line


@functools.cache
def _arith_chains():
    """scripts/arith_chains.py as a module, loaded once (its absl flags can be defined once)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "arith_chains.py")
    spec = importlib.util.spec_from_file_location("arith_chains", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chain_stats_counts_lucky_answers():
    mod = _arith_chains()
    good = "<think>\nStep 1: 3 + 7 = 10\n</think>\n<answer>10</answer>"
    lucky = "<think>\nStep 1: 3 + 7 = 11\n</think>\n<answer>10</answer>"
    wrong = "<think>\nStep 1: 3 + 7 = 10\n</think>\n<answer>12</answer>"
    got = mod.chain_stats([good, lucky, wrong, "garbage"], ["10", "10", "10", "10"])
    assert got == dict(samples=4, correct=2, valid_chain=2, correct_and_valid=1, lucky=1)


def test_distracted_solution_adds_the_first_distractor():
    items = sample("train", 200)
    with_d = [it for it in items if it.distractors]
    assert with_d and len(with_d) < len(items)
    for it in items:
        text = arith.distracted_solution(it)
        if not it.distractors:
            assert text == it.solution
            continue
        d, v = it.distractors[0], int(it.answer)
        lines = text.split("\n")
        assert lines[1:-3] == list(it.steps)
        assert lines[-3] == f"Step {len(it.steps) + 1}: {v} + {d} = {v + d}"
        assert lines[-1] == f"<answer>{v + d}</answer>"
        assert arith.chain_is_valid(text)
        assert not arith.check_answer(str(v + d), it.answer)



def test_habit_stats_splits_by_distractor():
    mod = _arith_chains()
    items = sample("test", 60)
    with_d = [it for it in items if it.distractors][:3]
    without = [it for it in items if not it.distractors][:2]
    texts = [arith.distracted_solution(with_d[0]), with_d[1].solution, "garbage",
             without[0].solution, "<think>\nStep 1: 1 + 1 = 2\n</think>\n<answer>-5</answer>"]
    got = mod.habit_stats(texts, with_d + without)
    assert got[0] == dict(distractor=True, problems=3, greedy_acc=round(1 / 3, 4),
                          extra_step=round(1 / 3, 4))
    assert got[1] == dict(distractor=False, problems=2, greedy_acc=0.5, extra_step=0.0)
