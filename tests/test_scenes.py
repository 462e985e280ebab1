"""Tests for the procedural scene task: determinism, splits and the CoGenT colour rule, answers
recomputed from the scene objects, solution format, verifier agreement and rendering."""

import dataclasses
import re
import time

import numpy as np
import pytest

from migjax.data import scenes
from migjax.rewards.answers import extract_answer
from migjax.rewards.segment import step_spans_text
from migjax.rewards.verify import Verifier, format_reward

N = 150  # items per split the tests read

# The tests' own vocabulary, written out rather than taken from the module under test.
_COLOURS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
_WORD_ATTR = {**{c: "color" for c in _COLOURS}, "small": "size", "large": "size",
              "rubber": "material", "metal": "material"}
_NOUNS = {"thing": None, "things": None, "cube": "cube", "cubes": "cube", "sphere": "sphere",
          "spheres": "sphere", "cylinder": "cylinder", "cylinders": "cylinder"}
_COND_A = {"cube": {"gray", "blue", "brown", "yellow"},
           "cylinder": {"red", "green", "purple", "cyan"}}


@pytest.fixture(scope="module")
def items():
    return {v: [scenes.make_item(scenes.scene_spec(v), i) for i in range(N)]
            for v in scenes.VARIANTS}


@pytest.fixture(scope="module")
def verifier():
    v = Verifier()
    yield v
    v.close()


# ----------------------------------------------------------------------------- reading questions


def parse_phrase(phrase):
    """A noun phrase ("large red metal cubes", "small thing") as an attribute filter."""
    *words, noun = phrase.split()
    filt = {}
    for w in words:
        attr = _WORD_ATTR[w]
        assert attr not in filt, phrase
        filt[attr] = w
    if _NOUNS[noun] is not None:
        filt["shape"] = _NOUNS[noun]
    return filt


def select(objects, filt):
    return [o for o in objects if all(getattr(o, k) == v for k, v in filt.items())]


def the_one(objects, phrase):
    found = select(objects, parse_phrase(phrase))
    assert len(found) == 1, f"{phrase!r} names {len(found)} objects"
    return found[0]


def recompute(question, objects):
    """The answer to `question` about `objects`, read from the question text alone."""
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return str(len(select(objects, parse_phrase(m[1]))))
    if m := re.fullmatch(r"Are there (more|fewer) (.+) than (.+)\?", question):
        na, nb = (len(select(objects, parse_phrase(p))) for p in (m[2], m[3]))
        return "yes" if (na > nb if m[1] == "more" else na < nb) else "no"
    if m := re.fullmatch(r"Are there the same number of (.+) and (.+)\?", question):
        na, nb = (len(select(objects, parse_phrase(p))) for p in (m[1], m[2]))
        return "yes" if na == nb else "no"
    if m := re.fullmatch(r"How many (.+) are to the (left|right) of the (.+)\?", question):
        ref = the_one(objects, m[3])
        side = [o for o in objects if o is not ref and (o.u < ref.u) == (m[2] == "left")]
        return str(len(select(side, parse_phrase(m[1]))))
    if m := re.fullmatch(r"What (colour|shape|material|size) is the (.+)\?", question):
        attr = {"colour": "color"}.get(m[1], m[1])
        assert attr not in parse_phrase(m[2]), question  # the question must not give it away
        return getattr(the_one(objects, m[2]), attr)
    if m := re.fullmatch(r"((?:Subtract all [^.]+\. )+)How many objects are left\?", question):
        left = list(objects)
        for phrase in re.findall(r"Subtract all ([^.]+)\.", m[1]):
            removed = select(left, parse_phrase(phrase))
            left = [o for o in left if o not in removed]
        return str(len(left))
    raise AssertionError(f"unrecognised question: {question!r}")


# ----------------------------------------------------------------------------- determinism


def test_items_are_a_pure_function_of_spec_and_index():
    spec = scenes.scene_spec("train")
    task = scenes.SceneTask(spec, size=50)
    for i in (0, 7, 49):
        a, b = scenes.make_item(spec, i), task[i]
        assert (a.id, a.question, a.answer, a.steps, a.solution, a.objects, a.qtype) == \
               (b.id, b.question, b.answer, b.steps, b.solution, b.objects, b.qtype)
        assert np.array_equal(a.image, b.image)
    assert task[-1].objects == task[49].objects
    with pytest.raises(IndexError, match="index 50 out of range for size 50"):
        task[50]
    assert len(task) == 50


def test_seed_and_index_change_the_scene():
    spec = scenes.scene_spec("train")
    other = dataclasses.replace(spec, seed=7)
    assert scenes.make_item(spec, 3).objects != scenes.make_item(spec, 4).objects
    assert scenes.make_item(spec, 3).objects != scenes.make_item(other, 3).objects


def test_scene_does_not_depend_on_image_size():
    spec = scenes.scene_spec("test")
    small = dataclasses.replace(spec, width=160, height=120, supersample=1)
    a, b = scenes.make_item(spec, 11), scenes.make_item(small, 11)
    assert a.objects == b.objects and a.question == b.question
    assert a.image.shape == (224, 224, 3) and b.image.shape == (120, 160, 3)


@pytest.mark.parametrize("kw,match", [
    ({"min_objects": 5, "max_objects": 4}, "min_objects <= max_objects"),
    ({"condition": "C"}, "condition must be one of"),
    ({"qtypes": ("count", "colour")}, "qtypes must be a non-empty subset"),
    ({"width": 8}, "width and height must be >= 16"),
])
def test_bad_spec_fields_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        scenes.SceneSpec(**kw)


# ----------------------------------------------------------------------------- splits


def _signature(item):
    return tuple((o.shape, o.color, o.size, o.material, o.x, o.z) for o in item.objects)


def test_splits_are_disjoint(items):
    sigs = {v: {_signature(it) for it in its} for v, its in items.items()}
    assert len(sigs["train"]) == N  # no repeated scene within a split either
    assert not sigs["train"] & sigs["test"]
    assert not sigs["train"] & sigs["ood"]
    assert not sigs["test"] & sigs["ood"]


def test_cogent_colour_rule(items):
    seen = {v: {"cube": set(), "cylinder": set(), "sphere": set()} for v in items}
    for v, its in items.items():
        for it in its:
            for o in it.objects:
                seen[v][o.shape].add(o.color)
    for v in ("train", "test"):  # condition A exactly: every allowed colour, no other
        assert seen[v]["cube"] == _COND_A["cube"], v
        assert seen[v]["cylinder"] == _COND_A["cylinder"], v
    assert seen["ood"]["cube"] == _COND_A["cylinder"]  # condition B: the sets swapped
    assert seen["ood"]["cylinder"] == _COND_A["cube"]
    for v in items:
        assert seen[v]["sphere"] == set(_COLOURS), v


def test_ood_has_more_objects(items):
    train_counts = [len(it.objects) for it in items["train"]]
    ood_counts = [len(it.objects) for it in items["ood"]]
    assert min(train_counts) >= 3 and max(train_counts) <= 10
    assert min(ood_counts) > max(train_counts)


# ----------------------------------------------------------------------------- answers and steps


@pytest.mark.parametrize("variant", scenes.VARIANTS)
def test_answers_recomputed_from_objects(items, variant):
    for it in items[variant]:
        assert recompute(it.question, it.objects) == it.answer, (it.id, it.question)


def test_question_types_and_answers_are_varied(items):
    its = items["train"] + items["test"]
    assert {it.qtype for it in its} == set(scenes.QTYPES)
    answers = {it.answer for it in its}
    assert {"yes", "no"} <= answers
    assert len(answers & set(_COLOURS)) >= 4
    assert len({a for a in answers if a.isdigit()}) >= 5


def _numbers(step):
    return [int(n) for n in re.findall(r"\b\d+\b", step.split(": ", 1)[1])]


def test_final_steps_agree_with_answers(items):
    for it in items["train"] + items["ood"]:
        last = it.steps[-1]
        if it.qtype in ("count", "spatial"):
            assert re.fullmatch(rf"Step \d+: That is {it.answer} things?\.", last), last
        elif it.qtype == "remove":
            a, b, c = _numbers(last)
            assert a - b == c and str(c) == it.answer, last
        elif it.qtype == "query":
            assert last.endswith(f" is {it.answer}."), last
        else:
            (na,), (nb,) = _numbers(it.steps[0]), _numbers(it.steps[1])
            rel = re.match(r"Are there (more|fewer|the same number)", it.question)[1]
            truth = na > nb if rel == "more" else na < nb if rel == "fewer" else na == nb
            assert it.answer == ("yes" if truth else "no"), it.question
            assert _numbers(last) == [na, nb], last


def test_count_steps_state_the_counts(items):
    for it in items["test"]:
        if it.qtype == "compare":
            phrases = re.fullmatch(r"Are there (?:more|fewer|the same number of) (.+) "
                                   r"(?:than|and) (.+)\?", it.question).groups()
            for step, phrase in zip(it.steps[:2], phrases, strict=True):
                assert _numbers(step) == [len(select(it.objects, parse_phrase(phrase)))], step
        if it.qtype == "remove":
            assert _numbers(it.steps[0]) == [len(it.objects)]


def test_solutions_have_the_project_format(items):
    for it in items["train"] + items["ood"]:
        assert it.solution == "<think>\n" + "\n".join(it.steps) + \
            f"\n</think>\n<answer>{it.answer}</answer>"
        assert len(it.steps) >= 2
        for k, step in enumerate(it.steps, start=1):
            assert re.fullmatch(rf"Step {k}: [^.?]+\.", step), step  # one sentence: one fact
        spans = step_spans_text(it.solution)
        assert [it.solution[s:e] for s, e in spans] == list(it.steps)
        assert format_reward(it.solution) == 1.0
        assert extract_answer(it.solution) == it.answer


def _wrong(answer):
    if answer.isdigit():
        return str(int(answer) + 1)
    swaps = {"yes": "no", "no": "yes", "small": "large", "large": "small", "rubber": "metal",
             "metal": "rubber", "cube": "sphere", "sphere": "cylinder", "cylinder": "cube"}
    return swaps.get(answer) or _COLOURS[(_COLOURS.index(answer) + 1) % len(_COLOURS)]


def test_verifier_accepts_answers_and_rejects_wrong_ones(items, verifier):
    answers = sorted({it.answer for its in items.values() for it in its})
    for a in answers:
        assert verifier.verify(a, [a]), a
        assert verifier.verify(f" {a}.", [a]), a
        assert not verifier.verify(_wrong(a), [a]), a
    assert verifier.n_timeouts == 0 and verifier.n_errors == 0


def test_verifier_case_behaviour_is_reported(verifier):
    """Not a requirement of the task: prints how the verifier treats capitalised words."""
    for pred, ref in (("Yes", "yes"), ("YES", "yes"), ("No", "no"), ("Red", "red"),
                      ("RED", "red"), ("Cube", "cube"), ("on", "no"), ("sey", "yes")):
        print(f"verify({pred!r}, [{ref!r}]) = {verifier.verify(pred, [ref])}")


# ----------------------------------------------------------------------------- rendering


def test_images_have_the_right_shape_and_differ(items):
    its = items["train"][:20]
    for it in its:
        assert it.image.dtype == np.uint8 and it.image.shape == (224, 224, 3)
    flat = {it.image.tobytes() for it in its}
    assert len(flat) == len(its)
    assert np.abs(its[0].image.astype(int) - its[1].image.astype(int)).mean() > 1.0


def _nearest_colour(rgb):
    dist = {c: sum((a - b) ** 2 for a, b in zip(rgb, scenes.COLORS[c], strict=True))
            for c in _COLOURS}
    return min(dist, key=dist.get)


def test_front_object_is_drawn_in_its_colour(items):
    """The nearest object is never occluded: the middle of its body shows its colour."""
    for it in items["train"] + items["ood"]:
        front = max(it.objects, key=lambda o: o.v)
        h, w, _ = it.image.shape
        s = scenes.apparent_size(front.size, front.z) * min(h, w)
        x, y = int(front.u * w), int(front.v * h - 0.3 * s)
        assert _nearest_colour(it.image[y, x].tolist()) == front.color, (it.id, front)


def test_objects_stay_visible_and_apart(items):
    for it in items["train"] + items["ood"]:
        assert min(scenes.visible_fractions(it.objects)) >= 0.55
        us = sorted(o.u for o in it.objects)
        assert min(b - a for a, b in zip(us, us[1:], strict=False)) >= 0.02


def test_rendering_speed():
    objects = [scenes.make_item(scenes.scene_spec("ood"), i).objects for i in range(20)]
    t0 = time.perf_counter()
    for objs in objects:
        scenes.render_scene(objs)
    render_ms = (time.perf_counter() - t0) / len(objects) * 1e3
    t0 = time.perf_counter()
    for i in range(20):
        scenes.make_item(scenes.scene_spec("train"), 1000 + i)
    item_ms = (time.perf_counter() - t0) / 20 * 1e3
    print(f"render 224x224 (ood, 11-13 objects): {render_ms:.2f} ms/image; "
          f"whole train item: {item_ms:.2f} ms")


def test_single_object_scenes_get_questions():
    spec = dataclasses.replace(scenes.scene_spec("train"), min_objects=1, max_objects=1, width=32,
                               height=32)
    items = [scenes.make_item(spec, i) for i in range(40)]
    assert all(len(it.objects) == 1 and it.qtype != "spatial" for it in items)
    assert len({it.qtype for it in items}) >= 2
