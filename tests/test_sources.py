"""Tests for the offline dataset loaders: record counts of the real files, known answers, and
skipping/strict handling of malformed files."""

import json
import logging
import os

import pytest

from migjax.data.sources import DataError, Example, LoadStats, exclude_ids, load_examples

# The offline data sets live in shared/data beside the repository.
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "shared", "data")


def _load(kind, rel, **kw):
    return load_examples(kind, os.path.join(DATA, rel), **kw)


@pytest.fixture(scope="module")
def math500():
    examples, stats = _load("math", "math/math500_test.jsonl")
    assert stats == LoadStats(read=500, skipped=0, reasons={})
    return examples


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    "kind,rel,kw,n",
    [
        ("gsm8k", "gsm8k/train.jsonl", {}, 7473),
        ("gsm8k", "gsm8k/test.jsonl", {}, 1319),
        ("math", "math/hendrycks_math_test.jsonl", {}, 5000),
        ("svamp", "svamp/SVAMP.json", {}, 1000),
        ("asdiv", "asdiv/ASDiv.xml", {}, 2305),
        ("asdiv", "asdiv/ASDiv.xml", {"subset": "asdiv-a"}, 1218),
        ("asdiv", "asdiv/asdiv_tora_test.jsonl", {}, 2215),
        ("mawps", "mawps/mawps_tora_test.jsonl", {}, 2065),
        ("jsonl", "commonsenseqa/dev_rand_split.jsonl", {"answer_field": "answerKey"}, 1221),
    ],
)
def test_real_file_counts(kind, rel, kw, n):
    examples, stats = _load(kind, rel, **kw)
    assert len(examples) == n
    assert stats == LoadStats(read=n, skipped=0, reasons={})
    assert len({e.id for e in examples}) == n
    assert all(e.question.strip() and e.answers and all(e.answers) for e in examples)


@pytest.mark.parametrize(
    "rel,n",
    [("math/hendrycks_math_train.jsonl", 7500), ("math/math_train12k_derived.jsonl", 12000)],
)
def test_math_train_files_skip_the_two_empty_boxes(rel, n, caplog):
    # train/number_theory/7115 and 7117 have only `\boxed{}` in the solution: no final value.
    with caplog.at_level(logging.WARNING):
        examples, stats = _load("math", rel)
    assert stats == LoadStats(read=n, skipped=2, reasons={"no_final_answer": 2})
    assert len(examples) == n - 2
    assert f"{rel.split('/')[-1]}:5530" in caplog.text


def test_math_answers(math500):
    first = math500[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answers == ("\\left( 3, \\frac{\\pi}{2} \\right)",)
    train, _ = _load("math", "math/hendrycks_math_train.jsonl", limit=3000)
    by_id = {e.id: e for e in train}
    assert by_id["train/algebra/24014.json"].answers == ("2",)  # `\boxed 2`, no braces
    assert by_id["train/algebra/25040.json"].answers == ("9",)
    # The derived file's `answer` field and our extraction from `solution` agree.
    derived, _ = _load("math", "math/math_train12k_derived.jsonl", limit=3000)
    assert all(by_id[e.id].answers == e.answers for e in derived if e.id in by_id)
    assert sum(e.id in by_id for e in derived) == 3000


def test_math500_is_excluded_from_test_split(math500):
    test, _ = _load("math", "math/hendrycks_math_test.jsonl")
    rest = exclude_ids(test, math500)
    assert len(rest) == 4500
    assert len(exclude_ids(test, [e.id for e in math500])) == 4500
    assert len(exclude_ids(test, [e.question for e in math500])) == 4500
    by_id = {e.id: e for e in test}
    assert all(by_id[e.id].answers == e.answers for e in math500)  # boxed == official answer
    derived, _ = _load("math", "math/math_train12k_derived.jsonl")
    assert len(exclude_ids(derived, math500)) == len(derived)


def test_gsm8k_answers():
    test, _ = _load("gsm8k", "gsm8k/test.jsonl")
    assert test[0] == Example(
        "gsm8k:test:1",
        test[0].question,
        ("18",),
        test[0].solution,
    )
    assert test[0].solution.endswith("#### 18")  # the worked solution, for warm-start demos
    assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs")
    assert test[146].answers == ("2125",)  # "#### 2,125"
    assert test[489].answers == ("-10",)


def test_word_problem_answers():
    svamp, _ = _load("svamp", "svamp/SVAMP.json")
    assert svamp[0] == Example(
        "chal-1",
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?",
        ("51",),
    )
    asdiv = {e.id: e for e in _load("asdiv", "asdiv/ASDiv.xml")[0]}
    assert asdiv["nluds-0001"].answers == ("9",)  # "9 (apples)"
    assert asdiv["nluds-0030"].answers == ("Mrs. Hilt",)
    assert asdiv["nluds-1310"].answers == ("11, 12, 13",)
    assert asdiv["nluds-1331"].answers == ("-1/3",)
    mawps = {e.id: e for e in _load("mawps", "mawps/mawps_tora_test.jsonl")[0]}
    assert mawps["mawps:0"].answers == ("43",)
    assert mawps["mawps:205"].answers == ("11.5", "23/2")
    assert mawps["mawps:240"].answers == ("118558",)


# ----------------------------------------------------------------------------- malformed files


def _write_gsm8k(tmp_path):
    good = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
    lines = [
        json.dumps(good).encode(),  # 1 good
        b'{"question": "broken", "answer": ',  # 2 invalid JSON
        json.dumps({"question": "No answer?"}).encode(),  # 3 missing answer
        json.dumps({"question": "  ", "answer": "#### 3"}).encode(),  # 4 empty question
        b'{"question": "caf\xe9 \xff?", "answer": "#### 1"}',  # 5 not UTF-8
        json.dumps({"question": "Final?", "answer": "no marker"}).encode(),  # 6 no final value
        b"",  # 7 blank: ignored
        json.dumps({"question": "Big?", "answer": "#### 1,000"}).encode(),  # 8 good
        b"[1, 2]",  # 9 not an object
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_malformed_jsonl_skips_and_counts(tmp_path, caplog):
    path = _write_gsm8k(tmp_path)
    with caplog.at_level(logging.WARNING):
        examples, stats = load_examples("gsm8k", path)
    assert examples == [
        Example("gsm8k:bad:1", "What is 2+2?", ("4",), examples[0].solution),
        Example("gsm8k:bad:8", "Big?", ("1000",), examples[1].solution),
    ]
    assert stats.read == 8 and stats.skipped == 6
    assert stats.reasons == {
        "bad_json": 2,
        "missing_answer": 1,
        "missing_question": 1,
        "bad_utf8": 1,
        "no_final_answer": 1,
    }
    for line in (2, 3, 4, 5, 6, 9):
        assert f"{path}:{line}:" in caplog.text


@pytest.mark.parametrize("line,field", [(3, "answer"), (4, "question")])
def test_strict_mode_names_line_and_field(tmp_path, line, field):
    path = tmp_path / "one.jsonl"
    rows = [{"question": "ok?", "answer": "#### 1"}] * 4
    rows[line - 1] = (
        {"question": "  ", "answer": "#### 3"} if field == "question" else {"question": "q"}
    )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"one\.jsonl:{line}: .*field '{field}'"):
        load_examples("gsm8k", str(path), strict=True)
    examples, stats = load_examples("gsm8k", str(path))
    assert len(examples) == 3 and stats.skipped == 1


def test_strict_mode_bad_bytes_and_json(tmp_path):
    path = _write_gsm8k(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_examples("gsm8k", path, strict=True)
    assert issubclass(DataError, ValueError)
    bytes_only = tmp_path / "bytes.jsonl"
    bytes_only.write_bytes(b'{"question": "ok", "answer": "#### 2"}\n{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: invalid UTF-8"):
        load_examples("gsm8k", str(bytes_only), strict=True)


def test_limit_and_generic_jsonl(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [
        {"q": "half?", "a": "1/2", "key": "h"},
        {"q": "num?", "a": 2.5, "key": "n"},
        {"q": "worked?", "a": "so \\boxed{7}", "key": "w"},
        {"q": "bool?", "a": True, "key": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples, stats = load_examples(
        "jsonl", str(path), question_field="q", answer_field="a", id_field="key"
    )
    assert [(e.id, e.answers) for e in examples] == [
        ("h", ("1/2", "0.5")),
        ("n", ("2.5", "5/2")),
        ("w", ("7",)),
    ]
    assert stats.reasons == {"no_final_answer": 1}
    limited, _ = load_examples("jsonl", str(path), question_field="q", answer_field="a", limit=2)
    assert [e.id for e in limited] == ["g:1", "g:2"]


def test_generic_jsonl_solution_and_variant_fields(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [
        {"problem": "p1", "final": "", "worked": "so \\boxed{12}", "alts": ["12.0", "twelve"]},
        {"problem": "p2", "final": "3", "worked": "ignored \\boxed{9}", "alts": "three"},
        {"problem": "p3", "worked": "no final value here"},
        {"problem": "p4", "final": "4", "alts": [{"x": 1}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples, stats = load_examples("jsonl", str(path), question_field="problem",
                                    answer_field="final", solution_field="worked",
                                    variants_field="alts")
    assert [(e.question, e.answers) for e in examples] == [
        ("p1", ("12", "12.0", "twelve")), ("p2", ("3", "three"))]
    assert stats.reasons == {"no_final_answer": 1, "bad_variants": 1}


def test_svamp_array_errors(tmp_path):
    path = tmp_path / "s.json"
    good = {"ID": "chal-1", "Body": "A has 2.", "Question": "How many?", "Answer": 2.0}
    path.write_text(json.dumps([good, {"ID": "chal-2", "Body": "B", "Question": "Q?"}], indent=1))
    examples, stats = load_examples("svamp", str(path))
    assert examples == [Example("chal-1", "A has 2. How many?", ("2",))]
    assert stats.reasons == {"missing_answer": 1}
    with pytest.raises(DataError, match=r"s\.json:\d+: .*field 'Answer'"):
        load_examples("svamp", str(path), strict=True)
    path.write_text('[\n{"ID": "x",\n oops}\n]')
    with pytest.raises(DataError, match=r"s\.json:3: invalid JSON array"):
        load_examples("svamp", str(path))


def test_missing_file_and_bad_kind(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"mawps.*nope\.jsonl"):
        load_examples("mawps", missing)
    with pytest.raises(ValueError, match="unknown dataset kind 'aime'"):
        load_examples("aime", missing)
    with pytest.raises(ValueError, match="subset"):
        _load("gsm8k", "gsm8k/test.jsonl", subset="asdiv-a")
