"""Tests for the vision-language dataset loaders on small fixture datasets written to tmp_path:
CLEVR / CLEVR-CoGenT layout, Super-CLEVR questions, R1-V style counting JSONL, and skipping or
strict handling of bad records and missing images."""

import json
import logging
import os

import pytest
from PIL import Image

from migjax.data.sources import DataError, LoadStats
from migjax.data.visual_sources import (
    VisualExample,
    load_clevr,
    load_clevr_questions,
    load_counting_jsonl,
    load_super_clevr,
    load_visual_examples,
)


def _png(path, colour=(120, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


def _questions_file(path, records, info=True):
    """A questions JSON with one record a line: record i sits on line 3 + i."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ['{"info": {"split": "x", "version": "1.0"},', '"questions": [']
    lines += [json.dumps(r) + ("," if i < len(records) - 1 else "") for i, r in enumerate(records)]
    lines += ["]}"]
    if not info:
        lines = lines[1:]
        lines[0] = "{" + lines[0]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _clevr_q(i, image, question="How many cubes are there?", answer="2", split="val"):
    rec = {"image_index": i, "image_filename": image, "question": question,
           "question_index": i, "split": split, "question_family_index": 3}
    if answer is not None:
        rec["answer"] = answer
    return rec


@pytest.fixture
def clevr_root(tmp_path):
    """A CLEVR release with val questions 0..5: 0-2 good, 3 without its image, 4 without a
    question, 5 not an object; and a test split with no answers."""
    root = tmp_path / "CLEVR_v1.0"
    for i in range(3):
        _png(str(root / "images" / "val" / f"CLEVR_val_{i:06d}.png"))
    records = [
        _clevr_q(0, "CLEVR_val_000000.png", "Are there more cubes than spheres?", "yes"),
        _clevr_q(1, "CLEVR_val_000001.png", "What color is the large sphere?", "purple"),
        _clevr_q(2, "CLEVR_val_000002.png", "How many red things are there?", "3"),
        _clevr_q(3, "CLEVR_val_000009.png"),
        _clevr_q(4, "CLEVR_val_000001.png", question=""),
        ["not", "an", "object"],
    ]
    _questions_file(str(root / "questions" / "CLEVR_val_questions.json"), records)
    _png(str(root / "images" / "test" / "CLEVR_test_000000.png"))
    _questions_file(str(root / "questions" / "CLEVR_test_questions.json"),
                    [_clevr_q(i, "CLEVR_test_000000.png", answer=None, split="test")
                     for i in range(2)])
    return str(root)


# ----------------------------------------------------------------------------- CLEVR


def test_clevr_loads_good_records_and_counts_bad_ones(clevr_root, caplog):
    with caplog.at_level(logging.WARNING):
        examples, stats = load_clevr(clevr_root, "val")
    assert [e.id for e in examples] == ["clevr:val:0", "clevr:val:1", "clevr:val:2"]
    assert [e.answers for e in examples] == [("yes",), ("purple",), ("3",)]
    assert examples[1] == VisualExample(
        "clevr:val:1", (os.path.join(clevr_root, "images", "val", "CLEVR_val_000001.png"),),
        "What color is the large sphere?", ("purple",), "val")
    assert all(os.path.isfile(p) for e in examples for p in e.images)
    assert stats == LoadStats(read=6, skipped=3, reasons={
        "missing_image": 1, "missing_question": 1, "bad_json": 1})
    qfile = os.path.join(clevr_root, "questions", "CLEVR_val_questions.json")
    messages = [r.getMessage() for r in caplog.records]
    assert f"{qfile}:6: skipped record: questions[3]: image file not found" in messages[0]
    assert messages[0].endswith("(field 'image_filename')")
    assert f"{qfile}:7: skipped record: questions[4]: question field 'question'" in messages[1]
    assert f"{qfile}:8: skipped record: questions[5]: not a JSON object: list" in messages[2]


def test_clevr_strict_raises_on_the_first_bad_record(clevr_root):
    qfile = os.path.join(clevr_root, "questions", "CLEVR_val_questions.json")
    with pytest.raises(DataError, match=rf"^{qfile}:6: questions\[3\]: image file not found"):
        load_clevr(clevr_root, "val", strict=True)


def test_clevr_without_image_check_keeps_missing_images(clevr_root):
    examples, stats = load_clevr(clevr_root, "val", check_images=False)
    assert [e.id for e in examples] == ["clevr:val:0", "clevr:val:1", "clevr:val:2",
                                        "clevr:val:3"]
    assert stats.skipped == 2


def test_clevr_limit(clevr_root):
    examples, stats = load_clevr(clevr_root, "val", limit=2)
    assert len(examples) == 2 and stats == LoadStats(read=2, skipped=0, reasons={})


def test_clevr_test_split_has_no_answers(clevr_root):
    examples, stats = load_clevr(clevr_root, "test")
    assert examples == [] and stats.reasons == {"missing_answer": 2}


def test_clevr_cogent_layout(tmp_path):
    root = tmp_path / "CLEVR_CoGenT_v1.0"
    _png(str(root / "images" / "valB" / "CLEVR_valB_000000.png"))
    _questions_file(str(root / "questions" / "CLEVR_valB_questions.json"),
                    [_clevr_q(0, "CLEVR_valB_000000.png", "What shape is the gray thing?",
                              "cylinder", split="valB")])
    examples, stats = load_visual_examples("clevr", str(root), split="valB")
    assert [(e.id, e.answers, e.split) for e in examples] == [
        ("clevr:valB:0", ("cylinder",), "valB")]
    assert stats == LoadStats(read=1, skipped=0, reasons={})


def test_missing_files_and_directories_raise(tmp_path, clevr_root):
    with pytest.raises(FileNotFoundError, match="CLEVR_trainA_questions.json"):
        load_clevr(clevr_root, "trainA")
    qfile = os.path.join(clevr_root, "questions", "CLEVR_val_questions.json")
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        load_clevr_questions(qfile, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown visual dataset kind 'vqa'"):
        load_visual_examples("vqa", qfile)


def test_malformed_questions_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": [\n{"question": "a"},\n{"question": \n}\n]}\n')
    with pytest.raises(DataError, match=rf"^{bad}:4: invalid JSON"):
        load_clevr_questions(str(bad), str(tmp_path), check_images=False)
    nokey = tmp_path / "nokey.json"
    nokey.write_text('{"info": {}, "scenes": []}')
    with pytest.raises(DataError, match=r"no 'questions' array at the top level"):
        load_clevr_questions(str(nokey), str(tmp_path), check_images=False)


def test_single_line_file_locates_records_by_index(tmp_path, caplog):
    """The released files are one line: the record index is what finds a bad record."""
    _png(str(tmp_path / "images" / "a.png"))
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": [_clevr_q(i, "a.png") for i in range(4)] +
                                [_clevr_q(4, "a.png", answer="")]}))
    with caplog.at_level(logging.WARNING):
        examples, stats = load_clevr_questions(str(path), str(tmp_path / "images"))
    assert len(examples) == 4 and stats.reasons == {"missing_answer": 1}
    assert f"{path}:1: skipped record: questions[4]: answer field 'answer'" in caplog.text


# ----------------------------------------------------------------------------- Super-CLEVR


def test_super_clevr_questions(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        _png(str(images / f"superCLEVR_new_{i:06d}.png"))
    records = [
        _clevr_q(0, "superCLEVR_new_000000.png", "How many buses are there?", 4, split="new"),
        _clevr_q(1, "superCLEVR_new_000001.png", "Is there a red bicycle?", True, split="new"),
        _clevr_q(2, "superCLEVR_new_000002.png", "What color is the car?", "blue", "new"),
        _clevr_q(3, "superCLEVR_new_000002.png", "How many?", ["x"], split="new"),
    ]
    qfile = tmp_path / "superCLEVR_questions_30k.json"
    _questions_file(str(qfile), records, info=False)
    examples, stats = load_super_clevr(str(qfile), str(images))
    assert [(e.id, e.answers) for e in examples] == [
        ("superclevr:new:0", ("4",)), ("superclevr:new:1", ("yes",)),
        ("superclevr:new:2", ("blue",))]
    assert stats == LoadStats(read=4, skipped=1, reasons={"no_final_answer": 1})
    again, _ = load_visual_examples("super_clevr", str(qfile), image_dir=str(images))
    assert again == examples


# ----------------------------------------------------------------------------- counting JSONL


@pytest.fixture
def counting(tmp_path):
    """R1-V style training (image/problem/solution) and evaluation (image_path/question/
    ground_truth) records, with bad lines 4-8."""
    for name in ("a.png", "b.png", "c.png"):
        _png(str(tmp_path / "images" / name))
    rows = [
        {"image": "images/a.png", "problem": "How many items are there?",
         "solution": "<answer> 3 </answer>"},
        {"image_path": "./images/b.png", "question": "How many cubes?", "ground_truth": 8},
        {"images": ["images/a.png", "images/c.png"], "question": "Same count?",
         "answer": "no", "id": "pair-1"},
        {"image": "images/missing.png", "problem": "How many?", "solution": "<answer>2</answer>"},
        {"image": "images/a.png", "problem": "How many?", "solution": "<answer></answer>"},
        {"image": "images/a.png", "solution": "<answer>1</answer>"},
        {"image": 5, "problem": "How many?", "solution": "1"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    path = tmp_path / "counting.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_counting_jsonl_records(counting, caplog):
    root = os.path.dirname(counting)
    with caplog.at_level(logging.WARNING):
        examples, stats = load_counting_jsonl(counting)
    assert examples == [
        VisualExample("counting:1", (os.path.join(root, "images", "a.png"),),
                      "How many items are there?", ("3",)),
        VisualExample("counting:2", (os.path.join(root, "images", "b.png"),),
                      "How many cubes?", ("8",)),
        VisualExample("pair-1", (os.path.join(root, "images", "a.png"),
                                 os.path.join(root, "images", "c.png")), "Same count?", ("no",)),
    ]
    assert stats == LoadStats(read=8, skipped=5, reasons={
        "missing_image": 2, "no_final_answer": 1, "missing_question": 1, "bad_json": 1})
    for line in range(4, 9):
        assert f"{counting}:{line}: skipped record" in caplog.text
    assert "image file not found" in caplog.text and "(field 'image')" in caplog.text


def test_counting_jsonl_strict(counting):
    with pytest.raises(DataError, match=rf"^{counting}:4: image file not found: .*missing\.png"):
        load_counting_jsonl(counting, strict=True)


def test_counting_jsonl_fields_and_image_root(tmp_path):
    _png(str(tmp_path / "pics" / "x.png"))
    path = tmp_path / "data" / "eval.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"img": "x.png", "q": "How many?", "a": "<answer>5</answer>",
                                "solution": "ignored"}) + "\n")
    examples, stats = load_counting_jsonl(str(path), image_root=str(tmp_path / "pics"),
                                          image_field="img", question_field="q",
                                          answer_field="a")
    assert [(e.images, e.question, e.answers) for e in examples] == [
        ((os.path.join(str(tmp_path), "pics", "x.png"),), "How many?", ("5",))]
    missing, stats = load_counting_jsonl(str(path), image_field="img", question_field="q",
                                         answer_field="a")
    assert missing == [] and stats.reasons == {"missing_image": 1}
