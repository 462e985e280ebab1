"""Tests for answer extraction, number normalisation, the time-limited verifier and the format
reward."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.rewards.answers import answer_variants, extract_answer, normalize_number
from migjax.rewards.verify import Verifier, format_reward, outcome_rewards

PATHOLOGICAL = "9^{9^{9^{9}}}"  # sympy tries to evaluate the tower and never returns


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout_s=3.0) as v:
        yield v


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>Step 1: x</think><answer>42</answer>", "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", "2"),
        ("<answer>3", None),  # unclosed
        ("</answer>3<answer>", None),  # closed before opened
        ("<answer><answer>3</answer>", None),  # nested open
        ("<answer>1</answer></answer>", None),  # extra close
        ("<answer></answer>", None),
        ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
        ("\\boxed{1} and later \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{7} then \\boxed{unbalanced", "7"),
        ("\\boxed{unbalanced", None),
        ("$x = \\boxed 5$.", "5"),
        ("\\boxedx 5", None),
        ("<answer>7 \\boxed{9}", "9"),  # unbalanced tags fall through to boxed
        ("<answer>so \\boxed{9}</answer>", "9"),
        ("work\n#### 1,000\n", "1,000"),
        ("#### 1\n#### 2", "2"),
        ("####   \n", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_custom_tags():
    assert extract_answer("[A]5[/A]", answer_open="[A]", answer_close="[/A]") == "5"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("1,000", "1000"),
        ("1,234,567.50", "1234567.5"),
        ("3.0", "3"),
        ("$5", "5"),
        ("\\$5.", "5"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("-0", "0"),
        ("0.10", "0.1"),
        ("\\frac{1}{2}", "0.5"),
        ("-\\dfrac{3}{4}", "-0.75"),
        ("\\frac43", "4/3"),
        ("2/3", "2/3"),
        ("6/4", "1.5"),
        ("-(1/3)", "-1/3"),
        ("1{,}000", "1000"),
        ("90^\\circ", "90"),
        ("1,0", "1,0"),  # not a thousands separator: left alone
        (" Mrs.  Hilt ", "Mrs. Hilt"),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_normalize_huge_number_without_int_conversion():
    big = "0" + "9" * 5000 + ".500"
    assert normalize_number(big) == "9" * 5000 + ".5"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("1,000", ("1000",)),
        ("1/2", ("1/2", "0.5")),
        ("0.5", ("0.5", "1/2")),
        ("\\frac{1}{2}", ("\\frac{1}{2}", "1/2", "0.5")),
        ("\\frac{1}{3}", ("\\frac{1}{3}", "1/3")),
        ("0.15", ("0.15",)),  # 3/20: denominator too large for a variant
        ("\\left( 3, \\frac{\\pi}{2} \\right)", ("\\left( 3, \\frac{\\pi}{2} \\right)",)),
    ],
)
def test_answer_variants(raw, expected):
    assert answer_variants(raw) == expected


# ----------------------------------------------------------------------------- verifier


def test_fast_path_never_starts_worker():
    with Verifier() as v:
        assert v.verify("0.5", ["1/2"])
        assert v.verify("\\frac{1}{2}", ["0.5"])
        assert v.verify("1,000", ["1000"])
        assert v.verify("3", ["3.0"])
        assert v.verify("$18", ["18"])
        assert v.verify("0.333333", ["1/3"])  # within 1e-6 relative
        assert not v.verify("0.33333", ["1/3"])
        assert not v.verify("4", ["3"])
        assert not v.verify("1001", ["1,000"])
        assert not v.verify(None, ["3"])
        assert not v.verify("3", [])
        assert v.verify("Mrs. Hilt", ["Mrs.  Hilt"])
        assert v.n_slow == 0 and v._proc is None


@pytest.mark.parametrize(
    "pred,refs,expected",
    [
        ("\\frac{\\sqrt{3}}{2}", ["\\frac{1}{2}\\sqrt{3}"], True),
        ("(3, \\pi/2)", ["\\left( 3, \\frac{\\pi}{2} \\right)"], True),
        ("x = 5", ["5"], True),
        ("15, 5", ["5, 15"], True),
        ("\\sqrt{2}", ["\\sqrt{3}"], False),
        ("(3, \\pi)", ["\\left( 3, \\frac{\\pi}{2} \\right)"], False),
        ("\\sqrt{2}", ["2", "\\frac{2}{\\sqrt{2}}"], True),  # any reference may match
        ("\\frac{", ["2"], False),  # unparseable
        ("\ud800\\frac{1}{\udfff", ["\\sqrt{2}"], False),  # lone surrogates
    ],
)
def test_symbolic_path(verifier, pred, refs, expected):
    n_slow = verifier.n_slow
    assert verifier.verify(pred, refs) is expected
    assert verifier.n_slow == n_slow + 1


def test_pathological_input_times_out_and_worker_recovers():
    with Verifier(timeout_s=1.5) as v:
        assert v.verify("\\sqrt{8}", ["2\\sqrt{2}"])  # starts the worker outside the timing
        t0 = time.monotonic()
        assert v.verify(PATHOLOGICAL, ["2"]) is False
        elapsed = time.monotonic() - t0
        assert 1.4 <= elapsed < 4.0
        assert v.n_timeouts == 1
        assert v.verify("\\sqrt{8}", ["2\\sqrt{2}"])  # a fresh worker answers
        assert v.n_timeouts == 1 and v.n_errors == 0


def test_verify_from_non_main_thread(verifier):
    results = {}

    def work():
        results["out"] = verifier.verify_batch(
            ["\\frac{\\sqrt{3}}{2}", "7", None], [["\\frac{1}{2}\\sqrt{3}"], ["7.0"], ["1"]]
        )

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=60)
    assert results["out"] == [True, True, False]


def test_verify_batch_length_mismatch(verifier):
    with pytest.raises(ValueError, match="2 predictions but 1"):
        verifier.verify_batch(["1", "2"], [["1"]])


# ----------------------------------------------------------------------------- format / rewards

GOOD = "<think>\nStep 1: 2 + 2 = 4.\nStep 2: done.\n</think>\n<answer>4</answer>"


@pytest.mark.parametrize(
    "text,expected",
    [
        (GOOD, 1.0),
        ("  \n" + GOOD + "\n\n", 1.0),
        ("<think>Step 1: a</think><answer>x</answer>", 1.0),
        ("<think>\nno steps\n</think>\n<answer>4</answer>", 0.0),
        ("<think>\nStep one: a\n</think>\n<answer>4</answer>", 0.0),
        ("<think>\nStep 1: a\n</think>\n<answer>  </answer>", 0.0),
        ("<think>\nStep 1: a\n</think>\ntext<answer>4</answer>", 0.0),
        ("pre<think>\nStep 1: a\n</think>\n<answer>4</answer>", 0.0),
        ("<think>\nStep 1: a\n</think>\n<answer>4</answer>post", 0.0),
        (GOOD + "<answer>5</answer>", 0.0),
        ("<think>Step 1: a</think><think>Step 2: b</think><answer>4</answer>", 0.0),
        ("<think>\nStep 1: a <answer>3</answer>\n</think>\n<answer>4</answer>", 0.0),
        ("<think>\nStep 1: a\n<answer>4</answer>", 0.0),
        ("Step 1: a\n<answer>4</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_format_reward_custom_markers():
    text = "[T]\n- first\n[/T][A]3[/A]"
    kw = dict(think_open="[T]", think_close="[/T]", answer_open="[A]", answer_close="[/A]")
    assert format_reward(text, step_regex=r"(?m)^- ", **kw) == 1.0
    assert format_reward(text, **kw) == 0.0  # default step marker absent


def test_outcome_rewards(verifier):
    texts = [
        GOOD,
        "<think>\nStep 1: x\n</think>\n<answer>5</answer>",
        "the answer is \\boxed{4}",
        "<answer>4",
    ]
    refs = [["4"], ["4"], ["4.0"], ["4"]]
    r_correct_N, r_format_N, preds = outcome_rewards(texts, refs, verifier)
    assert r_correct_N.dtype == np.float32 and r_format_N.dtype == np.float32
    np.testing.assert_array_equal(r_correct_N, [1, 0, 1, 0])
    np.testing.assert_array_equal(r_format_N, [1, 1, 0, 0])
    assert preds == ["4", "5", "4", None]


# ----------------------------------------------------------------------------- fuzz

_FRAGMENTS = st.sampled_from(
    [
        "\\boxed{",
        "}",
        "{",
        "\\frac{",
        "}{",
        "\\sqrt",
        "^",
        "_",
        "<answer>",
        "</answer>",
        "<think>",
        "</think>",
        "Step 1:",
        "\n",
        "####",
        " ",
        "$",
        "\\left(",
        "\\right)",
        "1/2",
        "0.5",
        "-",
        ",",
        "\\$",
        "%",
        "\\pi",
        "x",
        "=",
        "\\\\",
        "\\boxed ",
        "\\infty",
        "\\{",
    ]
)
_NUMBERS = st.one_of(
    st.integers(min_value=-(10**60), max_value=10**60).map(str),
    st.just("1" + "0" * 5000),  # 10**5000
    st.just("-" + "9" * 4500 + ".0"),
    st.fractions(max_denominator=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_TEXTS = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(_FRAGMENTS, st.text(max_size=5), _NUMBERS), max_size=20).map("".join),
    _NUMBERS,
)


@settings(max_examples=200, deadline=None)
@given(_TEXTS)
def test_fuzz_extract_and_format_never_raise(text):
    ans = extract_answer(text)
    assert ans is None or (isinstance(ans, str) and ans == ans.strip() and ans)
    assert format_reward(text) in (0.0, 1.0)
    assert isinstance(normalize_number(text), str)
    variants = answer_variants(text)
    assert isinstance(variants, tuple) and all(isinstance(v, str) for v in variants)


@settings(max_examples=30, deadline=None)
@given(pred=st.one_of(st.none(), _TEXTS), refs=st.lists(_TEXTS, min_size=0, max_size=2))
def test_fuzz_verify_never_raises(verifier, pred, refs):
    out = verifier.verify(pred, refs)
    assert out is True or out is False
    if pred is not None and pred.strip() and pred in refs:
        assert out is True


@pytest.mark.parametrize("pred,ref,ok", [
    ("no", "no", True), ("No", "no", True), ("NO.", "no", True), ("on", "no", False),
    ("sey", "yes", False), ("gary", "gray", False), ("Red", "red", True), ("RED", "red", True),
    ("large cube", "large cube", True), ("cube large", "large cube", False),
    ("e", "e", True), ("3", "3", True),
])
def test_word_answers_compare_as_words(pred, ref, ok):
    """Words are not products of symbols: an anagram of the reference is wrong, case is not."""
    with Verifier(timeout_s=2.0) as v:
        assert v.verify(pred, [ref]) is ok


@pytest.mark.parametrize("pred,refs,expected", [
    ("three", ["3"], True), ("Three.", ["3"], True), ("two", ["3"], False),
    ("Yes", ["yes"], True), ("no", ["yes"], False),
    ("(B)", ["B"], True), ("B.", ["B"], True), ("b) the red one", ["B"], True),
    ("(C)", ["B"], False), ("A", ["apple"], False), ("cylinder", ["cylinders"], False),
])
def test_visual_answers(verifier, pred, refs, expected):
    assert verifier.verify(pred, refs) is expected
