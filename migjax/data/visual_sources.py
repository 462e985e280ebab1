"""Loaders for the offline vision-language datasets (CLEVR, CLEVR-CoGenT, Super-CLEVR, R1-V
style counting JSONL) into image-path/question/reference-answer records, skipping and counting
bad records and records whose image file is missing."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from migjax.data.sources import (
    DataError,
    LoadStats,
    _jsonl,
    _number_answers,
    _read_text,
    _Skip,
    _skipper,
)
from migjax.rewards.answers import answer_variants, extract_answer

log = logging.getLogger(__name__)

KINDS = ("clevr", "super_clevr", "counting_jsonl")
# Field names tried in order for each role of a counting JSONL record (R1-V's training files
# use image/problem/solution, its evaluation files image_path/question/ground_truth).
IMAGE_FIELDS = ("image_path", "image", "images", "image_file", "image_filename")
QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("solution", "answer", "ground_truth")


@dataclasses.dataclass(frozen=True)
class VisualExample:
    """One question about one or more images, with its equivalent reference answers."""

    id: str
    images: tuple[str, ...]  # image file paths
    question: str
    answers: tuple[str, ...]
    split: str = ""


# ----------------------------------------------------------------------------- readers

_WS = re.compile(r"\s*")


class _Lines:
    """Line numbers of increasing character offsets into `text`, in time linear overall."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _array_items(text: str, pos: int, dec: json.JSONDecoder, lines: _Lines):
    """(line, element) of the JSON array starting at `pos`, then the offset after it."""
    pos = _skip_ws(text, pos + 1)
    items = []
    while text[pos : pos + 1] != "]":
        obj, end = dec.raw_decode(text, pos)
        items.append((lines.at(pos), obj))
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos : pos + 1] != "]":
            raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    return items, pos + 1


def _questions_array(path: str, key: str = "questions") -> list[tuple[int, Any]]:
    """(line, element) of the `key` array of a file holding {"<key>": [...], ...}, or of the
    file's own top-level array. A malformed file is a DataError naming file:line."""
    text, dec = _read_text(path), json.JSONDecoder()
    lines = _Lines(text)
    try:
        pos = _skip_ws(text, 0)
        if text[pos : pos + 1] == "[":
            return _array_items(text, pos, dec, lines)[0]
        if text[pos : pos + 1] != "{":
            raise json.JSONDecodeError("expected a JSON object or array", text, pos)
        pos, found = _skip_ws(text, pos + 1), None
        while text[pos : pos + 1] != "}":
            name, pos = dec.raw_decode(text, pos)
            if not isinstance(name, str):
                raise json.JSONDecodeError("expected a string key", text, pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] != ":":
                raise json.JSONDecodeError("expected ':'", text, pos)
            pos = _skip_ws(text, pos + 1)
            if name == key and text[pos : pos + 1] == "[":
                found, pos = _array_items(text, pos, dec, lines)
            else:
                _, pos = dec.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
            elif text[pos : pos + 1] != "}":
                raise json.JSONDecodeError("expected ',' or '}'", text, pos)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if found is None:
        raise DataError(f"{path}:1: no {key!r} array at the top level (field {key!r})")
    return found


# ----------------------------------------------------------------------------- field helpers


def _text(obj: dict, field: str, reason: str, what: str) -> str:
    v = obj.get(field)
    if not isinstance(v, str) or not v.strip():
        state = "missing" if v is None else "empty or not a string"
        raise _Skip(reason, field, f"{what} field {field!r} is {state}")
    return v.strip()


def _answers(v: Any, field: str) -> tuple[str, ...]:
    """Reference strings of an answer given as text (possibly `<answer>...</answer>`), a
    number or a boolean (yes/no)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _Skip("missing_answer", field, f"answer field {field!r} is missing or empty")
    if isinstance(v, bool):
        return ("yes" if v else "no",)
    if isinstance(v, str):
        text = v.strip()
        if "<answer>" in text or "</answer>" in text:
            final = extract_answer(text)
            if final is None:
                raise _Skip("no_final_answer", field,
                            f"no answer inside <answer>...</answer> in field {field!r}")
            text = final
        return answer_variants(text)
    return _number_answers(v, field)


def _first_field(obj: dict, fields: tuple[str, ...]) -> str:
    """The first of `fields` present in `obj` (else the first, to name it in the skip)."""
    return next((f for f in fields if obj.get(f) is not None), fields[0])


class _ImageCheck:
    """Whether image files exist, listing a directory once rather than testing every path."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._listed: dict[str, frozenset[str]] = {}

    def exists(self, path: str) -> bool:
        if not self.enabled:
            return True
        folder, name = os.path.split(path)
        if folder not in self._listed:
            try:
                self._listed[folder] = frozenset(os.listdir(folder or "."))
            except OSError:
                self._listed[folder] = frozenset()
        return name in self._listed[folder]

    def require(self, path: str, field: str) -> str:
        if not self.exists(path):
            raise _Skip("missing_image", field, f"image file not found: {path}")
        return path


# ----------------------------------------------------------------------------- per-kind records


def _clevr_record(obj: dict, index: int, image_dir: str, images: _ImageCheck, prefix: str,
                  split: str) -> VisualExample:
    question = _text(obj, "question", "missing_question", "question")
    answers = _answers(obj.get("answer"), "answer")
    name = _text(obj, "image_filename", "missing_image", "image")
    path = images.require(os.path.join(image_dir, name), "image_filename")
    rec_split = obj.get("split") if isinstance(obj.get("split"), str) else split
    qid = obj.get("question_index", index)
    return VisualExample(f"{prefix}:{rec_split}:{qid}", (path,), question, answers, rec_split)


def _image_paths(v: Any, field: str, root: str, images: _ImageCheck) -> tuple[str, ...]:
    names = v if isinstance(v, list) else [v]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise _Skip("missing_image", field,
                    f"image field {field!r} is not a path or a list of paths")
    paths = [n.strip() if os.path.isabs(n.strip()) else os.path.normpath(
        os.path.join(root, n.strip())) for n in names]
    return tuple(images.require(p, field) for p in paths)


def _counting_record(obj: dict, stem: str, line: int, root: str, images: _ImageCheck,
                     fields: tuple[str | None, str | None, str | None]) -> VisualExample:
    image_f = fields[0] or _first_field(obj, IMAGE_FIELDS)
    question_f = fields[1] or _first_field(obj, QUESTION_FIELDS)
    answer_f = fields[2] or _first_field(obj, ANSWER_FIELDS)
    question = _text(obj, question_f, "missing_question", "question")
    answers = _answers(obj.get(answer_f), answer_f)
    paths = _image_paths(obj.get(image_f), image_f, root, images)
    rid = obj.get("id", obj.get("question_id"))
    return VisualExample(str(rid) if rid is not None else f"{stem}:{line}", paths, question,
                         answers, str(obj.get("split", "")))


# ----------------------------------------------------------------------------- public API


def load_clevr_questions(
    questions_path: str,
    image_dir: str,
    *,
    split: str = "",
    prefix: str = "clevr",
    strict: bool = False,
    limit: int | None = None,
    check_images: bool = True,
) -> tuple[list[VisualExample], LoadStats]:
    """Up to `limit` records of a CLEVR-format questions file ({"questions": [{"question",
    "answer", "image_filename", "question_index", "split"}, ...]}), images under `image_dir`.

    Bad records (and, with `check_images`, records whose image file is missing) are skipped
    with a warning naming file:line and the record's index, and counted; with `strict=True`
    the first one raises DataError. CLEVR's test split has no answers: every record skips."""
    if not os.path.isfile(questions_path):
        raise FileNotFoundError(f"{prefix} questions file not found: {questions_path}")
    if check_images and not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{prefix} image directory not found: {image_dir}")
    stats, images = LoadStats(), _ImageCheck(check_images)
    skip = _skipper(questions_path, strict, stats)
    out: list[VisualExample] = []
    for index, (line, obj) in enumerate(_questions_array(questions_path)):
        if limit is not None and len(out) >= limit:
            break
        try:
            if not isinstance(obj, dict):
                raise _Skip("bad_json", None, f"not a JSON object: {type(obj).__name__}")
            out.append(_clevr_record(obj, index, image_dir, images, prefix, split))
        except _Skip as bad:
            skip(line, _Skip(bad.reason, bad.field, f"questions[{index}]: {bad.detail}"))
            continue
        stats.read += 1
    return out, stats


def load_clevr(root: str, split: str, **kw) -> tuple[list[VisualExample], LoadStats]:
    """CLEVR or CLEVR-CoGenT (split e.g. "val", "trainA", "valB") from its release layout:
    `root/questions/CLEVR_<split>_questions.json` and `root/images/<split>/`."""
    questions = os.path.join(root, "questions", f"CLEVR_{split}_questions.json")
    return load_clevr_questions(questions, os.path.join(root, "images", split), split=split, **kw)


def load_super_clevr(questions_path: str, image_dir: str,
                     **kw) -> tuple[list[VisualExample], LoadStats]:
    """Super-CLEVR: its questions JSON (CLEVR's fields) and its image directory."""
    return load_clevr_questions(questions_path, image_dir, prefix="superclevr", **kw)


def load_counting_jsonl(
    path: str,
    *,
    image_root: str | None = None,
    image_field: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    strict: bool = False,
    limit: int | None = None,
    check_images: bool = True,
) -> tuple[list[VisualExample], LoadStats]:
    """Up to `limit` records of an R1-V style counting JSONL file: one object a line with an
    image path (or list of paths), a question and an answer, the answer possibly inside
    `<answer>...</answer>`. Fields default to the first present of IMAGE_FIELDS,
    QUESTION_FIELDS and ANSWER_FIELDS; relative image paths are resolved against `image_root`
    (default: the file's directory). Bad records are skipped and counted as in
    `load_clevr_questions`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"counting data file not found: {path}")
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    stats, images = LoadStats(), _ImageCheck(check_images)
    skip = _skipper(path, strict, stats)
    stem = os.path.splitext(os.path.basename(path))[0]
    fields = (image_field, question_field, answer_field)
    out: list[VisualExample] = []
    records: Iterator[tuple[int, dict]] = _jsonl(path, skip)
    for line, obj in records:
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(_counting_record(obj, stem, line, root, images, fields))
        except _Skip as bad:
            skip(line, bad)
            continue
        stats.read += 1
    return out, stats


def load_visual_examples(kind: str, path: str, **kw) -> tuple[list[VisualExample], LoadStats]:
    """Dispatch on `kind`: "clevr" (path: the release root; `split=` required),
    "super_clevr" (path: the questions file; `image_dir=` required) or "counting_jsonl"."""
    if kind not in KINDS:
        raise ValueError(f"unknown visual dataset kind {kind!r}; expected one of {KINDS}")
    if kind == "clevr":
        if "split" not in kw:
            raise ValueError("load_visual_examples: kind='clevr' needs split=")
        return load_clevr(path, kw.pop("split"), **kw)
    if kind == "super_clevr":
        if "image_dir" not in kw:
            raise ValueError("load_visual_examples: kind='super_clevr' needs image_dir=")
        return load_super_clevr(path, kw.pop("image_dir"), **kw)
    return load_counting_jsonl(path, **kw)
