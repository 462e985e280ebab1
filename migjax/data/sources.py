"""Loaders for the offline evaluation and training datasets (GSM8K, MATH, SVAMP, ASDiv, MAWPS,
generic JSONL) into question/reference-answer records, skipping and counting bad records."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import Any

from migjax.rewards.answers import answer_variants, extract_answer, normalize_number

log = logging.getLogger(__name__)

KINDS = ("gsm8k", "math", "svamp", "asdiv", "mawps", "jsonl")


@dataclasses.dataclass(frozen=True)
class Example:
    """One question with its equivalent reference answers (e.g. `("1/2", "0.5")`)."""

    id: str
    question: str
    answers: tuple[str, ...]
    solution: str = ""  # the worked solution, where the dataset has one (warm-start demos)


# The field holding each kind's worked solution (migjax.data.demos renders it).
SOLUTION_FIELDS = {"gsm8k": "answer", "math": "solution"}


@dataclasses.dataclass
class LoadStats:
    """Records read (good and bad), records skipped, and skip counts by reason."""

    read: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)


class DataError(ValueError):
    """A malformed data file or record; the message names the file, line and field."""


class _Skip(Exception):
    """A bad record: `reason` is the stats key, `field` the offending field."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


# ----------------------------------------------------------------------------- field helpers


def _question(obj: dict, *fields: str) -> str:
    """Joins the named string fields with a space; each must be present and non-empty."""
    parts = []
    for f in fields:
        v = obj.get(f)
        if not isinstance(v, str) or not v.strip():
            what = "missing" if v is None else "empty or not a string"
            raise _Skip("missing_question", f, f"question field {f!r} is {what}")
        parts.append(v.strip())
    return " ".join(parts)


def _present(obj: dict, field: str) -> Any:
    v = obj.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _Skip("missing_answer", field, f"answer field {field!r} is missing or empty")
    return v


def _number_answers(v: Any, field: str) -> tuple[str, ...]:
    """Reference strings of a numeric answer given as a JSON number or a numeric string."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise _Skip("no_final_answer", field, f"answer field {field!r} is not a number: {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Skip("no_final_answer", field, f"answer field {field!r} is {v!r}")
        v = normalize_number(str(Fraction(repr(v))))  # exact decimal, e.g. 1e+16 -> 10**16
    return answer_variants(str(v))


def _final_value(text: str, field: str) -> str:
    """The final value of a worked solution: tagged answer, last `\\boxed` or `#### ...`."""
    final = extract_answer(text)
    if final is None:
        raise _Skip("no_final_answer", field, f"no final answer found in field {field!r}")
    return final


_UNIT_RE = re.compile(r"\s*\([^()]*[A-Za-z][^()]*\)")


def _asdiv_answers(text: str, field: str) -> tuple[str, ...]:
    """ASDiv answers: units in brackets dropped; `a (u); b (u)` becomes `a, b`."""
    parts = [_UNIT_RE.sub("", p).strip() for p in text.split(";")]
    parts = [p for p in parts if p]
    if not parts:
        raise _Skip("no_final_answer", field, f"no value left in field {field!r}: {text!r}")
    return answer_variants(parts[0]) if len(parts) == 1 else (", ".join(parts),)


# ----------------------------------------------------------------------------- readers


def _jsonl(path: str, skip: Callable[[int, _Skip], None]) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; undecodable lines are passed to `skip`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                skip(lineno, _Skip("bad_utf8", None, f"invalid UTF-8 at byte {e.start}"))
                continue
            except json.JSONDecodeError as e:
                skip(lineno, _Skip("bad_json", None, f"invalid JSON: {e.msg} at col {e.colno}"))
                continue
            if not isinstance(obj, dict):
                skip(lineno, _Skip("bad_json", None, f"not a JSON object: {type(obj).__name__}"))
                continue
            yield lineno, obj


def _read_text(path: str) -> str:
    """A whole file as UTF-8 text; an undecodable byte is a file-level DataError."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from e


def _json_array(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, element) for each element of a file holding one JSON array."""
    text, dec = _read_text(path), json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()
    try:
        if text[pos : pos + 1] != "[":
            raise json.JSONDecodeError("expected a JSON array", text, pos)
        pos = ws.match(text, pos + 1).end()
        while text[pos : pos + 1] != "]":
            obj, end = dec.raw_decode(text, pos)
            yield text.count("\n", 0, pos) + 1, obj
            pos = ws.match(text, end).end()
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON array: {e.msg}") from e


def _asdiv_xml(path: str, subset: str | None) -> Iterator[tuple[int, dict]]:
    """(line number, fields) per `<Problem>`; `subset="asdiv-a"` keeps the fold-file ids."""
    text = _read_text(path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"{path}:{e.position[0]}: invalid XML: {e}") from e
    lines = {
        m.group(1): text.count("\n", 0, m.start()) + 1
        for m in re.finditer(r'<Problem\b[^>]*\bID="([^"]*)"', text)
    }
    keep = None
    if subset is not None:
        folds = sorted(glob.glob(os.path.join(os.path.dirname(path), "nfolds", subset, "*.txt")))
        if not folds:
            raise FileNotFoundError(f"asdiv subset {subset!r}: no fold files beside {path}")
        keep = set()
        for fold in folds:
            with open(fold, encoding="utf-8") as f:
                keep.update(f.read().split())
    for prob in root.iter("Problem"):
        pid = prob.get("ID", "")
        if keep is not None and pid not in keep:
            continue
        fields = {c.tag.lower(): (c.text or "") for c in prob}
        yield lines.get(pid, 0), {"id": pid, **fields}


# ----------------------------------------------------------------------------- per-kind records

_Record = tuple[str, str, tuple[str, ...]]


def _gsm8k(obj: dict, stem: str, line: int) -> _Record:
    q = _question(obj, "question")
    final = _final_value(str(_present(obj, "answer")), "answer")
    return f"gsm8k:{stem}:{line}", q, answer_variants(final)


def _math(obj: dict, stem: str, line: int) -> _Record:
    q = _question(obj, "problem")
    ans = obj.get("answer")
    if not isinstance(ans, str) or not ans.strip():
        ans = _final_value(str(_present(obj, "solution")), "solution")
    return str(obj.get("unique_id") or f"math:{stem}:{line}"), q, answer_variants(ans)


def _svamp(obj: dict, stem: str, line: int) -> _Record:
    q = _question(obj, "Body", "Question")
    answers = _number_answers(_present(obj, "Answer"), "Answer")
    return str(obj.get("ID") or f"svamp:{line}"), q, answers


def _asdiv(obj: dict, stem: str, line: int) -> _Record:
    q = _question(obj, "body", "question")
    answers = _asdiv_answers(str(_present(obj, "answer")), "answer")
    rid = obj.get("id") or f"asdiv:{obj.get('idx', line)}"
    return str(rid), q, answers


def _mawps(obj: dict, stem: str, line: int) -> _Record:
    q = _question(obj, "input")
    answers = _number_answers(_present(obj, "target"), "target")
    return f"mawps:{obj.get('idx', line)}", q, answers


def _generic(question_field: str, answer_field: str, id_field: str | None,
             solution_field: str | None = None, variants_field: str | None = None):
    def convert(obj: dict, stem: str, line: int) -> _Record:
        q = _question(obj, question_field)
        if solution_field and obj.get(answer_field) in (None, ""):
            answers = answer_variants(_final_value(str(_present(obj, solution_field)),
                                                   solution_field))
        else:
            v = _present(obj, answer_field)
            if isinstance(v, str):
                markers = ("####", "\\boxed", "<answer>")
                text = _final_value(v, answer_field) if any(m in v for m in markers) else v
                answers = answer_variants(text)
            else:
                answers = _number_answers(v, answer_field)
        if variants_field and obj.get(variants_field) not in (None, "", []):
            extra = obj[variants_field]
            extra = extra if isinstance(extra, list) else [extra]
            if not all(isinstance(x, str | int | float) for x in extra):
                raise _Skip("bad_variants", variants_field,
                            f"answer variants field {variants_field!r} is not a list of strings")
            answers += tuple(dict.fromkeys(s for x in extra if (s := str(x).strip())
                                           and s not in answers))
        rid = obj.get(id_field) if id_field else None
        return str(rid if rid is not None else f"{stem}:{line}"), q, answers

    return convert


def _skipper(path: str, strict: bool, stats: LoadStats) -> Callable[[int, _Skip], None]:
    """What to do with a bad record of `path`: raise DataError naming file:line (strict), or
    warn, skip and count it in `stats`."""

    def skip(line: int, bad: _Skip) -> None:
        where = f"{path}:{line}"
        field = f" (field {bad.field!r})" if bad.field else ""
        if strict:
            raise DataError(f"{where}: {bad.detail}{field}")
        log.warning("%s: skipped record: %s%s", where, bad.detail, field)
        stats.read += 1
        stats.skipped += 1
        stats.reasons[bad.reason] = stats.reasons.get(bad.reason, 0) + 1

    return skip


# ----------------------------------------------------------------------------- public API


def load_examples(
    kind: str,
    path: str,
    *,
    strict: bool = False,
    limit: int | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    solution_field: str | None = None,
    variants_field: str | None = None,
    subset: str | None = None,
) -> tuple[list[Example], LoadStats]:
    """Loads up to `limit` examples of dataset `kind` from `path`.

    Bad records are skipped with a warning naming file:line and counted in the stats; with
    `strict=True` the first one raises DataError. `question_field`, `answer_field`, `id_field`,
    `solution_field` (a worked solution whose final value is the answer when `answer_field` is
    missing or empty) and `variants_field` (a list of equivalent reference strings added to
    the answer) apply to `kind="jsonl"`; `subset="asdiv-a"` picks ASDiv's fold-file subset (XML
    only).
    `kind="asdiv"` reads `ASDiv.xml` or the JSONL form (fields body/question/answer).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} data file not found: {path}")
    if subset is not None and not (kind == "asdiv" and path.lower().endswith(".xml")):
        raise ValueError(f"subset={subset!r} applies only to kind='asdiv' with an XML file")
    stats = LoadStats()
    stem = os.path.splitext(os.path.basename(path))[0]
    skip = _skipper(path, strict, stats)
    convert = {
        "gsm8k": _gsm8k,
        "math": _math,
        "svamp": _svamp,
        "asdiv": _asdiv,
        "mawps": _mawps,
        "jsonl": _generic(question_field, answer_field, id_field, solution_field,
                          variants_field),
    }[kind]
    if kind == "svamp":
        records: Iterable[tuple[int, Any]] = _json_array(path)
    elif kind == "asdiv" and path.lower().endswith(".xml"):
        records = _asdiv_xml(path, subset)
    else:
        records = _jsonl(path, skip)

    out: list[Example] = []
    for line, obj in records:
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(obj, dict):
            skip(line, _Skip("bad_json", None, f"not a JSON object: {type(obj).__name__}"))
            continue
        try:
            rid, question, answers = convert(obj, stem, line)
        except _Skip as bad:
            skip(line, bad)
            continue
        stats.read += 1
        solution = obj.get(SOLUTION_FIELDS.get(kind, ""), "")
        out.append(Example(rid, question, answers, solution if isinstance(solution, str) else ""))
    return out, stats


def exclude_ids(examples: Iterable[Example], ids: Iterable[str | Example]) -> list[Example]:
    """Examples whose id and whitespace-normalised question both miss `ids` (strings, or
    Examples whose ids and questions are used), e.g. MATH minus MATH500."""

    def norm(s: str) -> str:
        return " ".join(s.split())

    banned: set[str] = set()
    for item in ids:
        if isinstance(item, Example):
            banned.update((item.id, norm(item.question)))
        else:
            banned.update((item, norm(item)))
    return [e for e in examples if e.id not in banned and norm(e.question) not in banned]
