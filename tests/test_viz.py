"""Tests for migjax.viz: escaping of model text, credit colours, tooltips, page writing."""

import os
import re
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.viz import (
    GAIN_SCALE,
    clean_text,
    completions_html,
    credit_color,
    credit_html,
    page_max_gain,
    write_html,
)

EVIL = "<script>alert(1)</script>"


class _Collect(HTMLParser):
    """Start tags and text data of a page, parsed independently of the generator."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.titles = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.titles += [v for k, v in attrs if k == "title"]

    def handle_data(self, data):
        self.text.append(data)


def _parse(page):
    p = _Collect()
    p.feed(page)
    p.close()
    return p


def _credit_record(**overrides):
    rec = {
        "question": "What is 2+3?",
        "steps": ["Step 1: 2+3", "Step 2: = 5"],
        "answer": "5",
        "g": [0.5, 1.0],
        "l": [-3.0, -2.5, -1.5],
        "h": [-3.0, -2.5, -1.5],
    }
    rec.update(overrides)
    return rec


def test_model_text_is_escaped_everywhere():
    credit = credit_html(
        [_credit_record(question=EVIL, steps=[EVIL, 'x" onmouseover="y'], answer=EVIL)]
    )
    comps = completions_html(
        [
            {
                "prompt": EVIL,
                "completion": EVIL,
                "reward": 1.0,
                "correct": False,
                "steps": [(EVIL, 0.3)],
            }
        ]
    )
    for page in (credit, comps):
        assert "<script" not in page.lower()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        parsed = _parse(page)
        assert "script" not in parsed.tags
        assert EVIL in "".join(parsed.text)  # shown as text
    assert "x&quot; onmouseover=&quot;y" in credit
    assert all("onmouseover" not in t for t in _parse(credit).tags)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_arbitrary_text_round_trips_as_text(question, completion):
    page = completions_html(
        [{"prompt": question, "completion": completion, "reward": 0.0, "correct": True}]
    )
    parsed = _parse(page)
    assert parsed.tags == [
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "div",
        "div",
        "span",
        "div",
        "div",
        "div",
        "div",
    ]
    text = "".join(parsed.text)
    assert clean_text(question) in text and clean_text(completion) in text


def test_control_characters_are_stripped():
    assert clean_text("a\x00b\x1b[31mc\x7f\x85d\te\r\nf\rg") == "ab[31mcd\te\nf\ng"
    page = completions_html([{"prompt": "q\x07", "completion": "x\x1b[0m\x00y", "reward": 0.0,
                              "correct": False, "prediction": "\x08 5"}])
    assert not any(ch in page for ch in "\x00\x07\x08\x1b")
    assert "x[0my" in "".join(_parse(page).text)


def test_credit_colours_use_an_absolute_scale():
    """A gain has the same colour on every page, whatever the page's largest gain."""
    small = credit_html([_credit_record(g=[0.0, GAIN_SCALE / 4])])
    large = credit_html([
        _credit_record(g=[0.0, GAIN_SCALE / 4]),
        _credit_record(steps=["a"], g=[4 * GAIN_SCALE], l=[0.0, 1.0], h=[0.0, 1.0]),
    ])
    step_bg = r'class="step" style="background: ([^"]+)"'
    assert re.findall(step_bg, small) == ["rgba(255, 255, 255, 0.000)", "rgba(40, 167, 69, 0.250)"]
    assert re.findall(step_bg, large) == re.findall(step_bg, small) + ["rgba(40, 167, 69, 1.000)"]
    for page, largest in ((small, GAIN_SCALE / 4), (large, 4 * GAIN_SCALE)):
        (legend,) = re.findall(r'<div class="legend">.*?</div>', page)
        swatches = re.findall(r'class="swatch" style="background: ([^"]+)">([^<]+)<', legend)
        assert [label for _, label in swatches] == ["≤ -0.50", "-0.25", "0", "+0.12", "+0.25",
                                                    "+0.38", "≥ +0.50"]
        assert swatches[-1][0] == "rgba(40, 167, 69, 1.000)"
        assert swatches[0][0] == "rgba(220, 53, 69, 1.000)"
        assert f"largest |g_k| on this page {largest:.4f}" in legend


def test_credit_color_values():
    assert credit_color(0.0, 2.0) == "rgba(255, 255, 255, 0.000)"
    assert credit_color(1.0, 4.0) == "rgba(40, 167, 69, 0.250)"
    assert credit_color(-2.0, 4.0) == "rgba(220, 53, 69, 0.500)"
    assert credit_color(float("nan"), 4.0) == "rgba(255, 255, 255, 0.000)"
    assert credit_color(3.0, 0.0) == "rgba(255, 255, 255, 0.000)"
    assert page_max_gain([0.1, -0.7, float("inf"), 0.3]) == 0.7
    assert page_max_gain([]) == 0.0


def test_credit_tooltips_and_summary():
    page = credit_html([_credit_record()])
    titles = _parse(page).titles
    assert titles == [
        "step 1: l_k=-2.5000 h_k=-2.5000 g_k=0.5000",
        "step 2: l_k=-1.5000 h_k=-1.5000 g_k=1.0000",
    ]
    shown = re.findall(r'<span class="g">([^<]+)</span>', page)  # visible, not only on hover
    assert shown == ["l=-2.5000 h=-2.5000 g=0.5000", "l=-1.5000 h=-1.5000 g=1.0000"]
    assert "l_0 = -3.0000, sum g = 1.5000, l_K = -1.5000" in page
    # K entries of l and h (no k = 0) are accepted too.
    page_k = credit_html([_credit_record(l=[-2.5, -1.5], h=[-2.0, -1.5])])
    assert _parse(page_k).titles[0] == "step 1: l_k=-2.5000 h_k=-2.0000 g_k=0.5000"


def test_bad_records_name_the_field():
    with pytest.raises(ValueError, match="credit record 1: field 'l' has 1 entries"):
        credit_html([_credit_record(), _credit_record(l=[0.0])])
    with pytest.raises(ValueError, match="credit record 0: field 'g' has 1 entries for 2 steps"):
        credit_html([_credit_record(g=[0.1])])
    with pytest.raises(ValueError, match="credit record 0: missing field 'answer'"):
        credit_html([{k: v for k, v in _credit_record().items() if k != "answer"}])
    with pytest.raises(ValueError, match="completion row 0: missing field 'reward'"):
        completions_html([{"prompt": "p", "completion": "c", "correct": True}])


def test_completions_steps_and_verdicts():
    rows = [
        {
            "prompt": "p",
            "completion": "c1",
            "reward": 1.25,
            "correct": True,
            "steps": [("s1", 0.0), ("s2", 0.8)],
        },
        {"prompt": "q", "completion": "c2", "reward": 0.0, "correct": False},
    ]
    page = completions_html(rows)
    assert page.count('class="step"') == 2
    assert "rgba(40, 167, 69, 1.000)" in page
    assert '#0 reward = 1.2500 <span class="ok">correct</span>' in page
    assert '#1 reward = 0.0000 <span class="bad">wrong</span>' in page


def test_write_html_atomic(tmp_path):
    path = tmp_path / "views" / "credit.html"
    page = credit_html([_credit_record()])
    write_html(path, page)
    write_html(path, page)
    assert path.read_text(encoding="utf-8") == page
    assert os.listdir(path.parent) == ["credit.html"]


def test_completions_show_question_reference_prediction_group_advantages_and_sets():
    rows = [
        {"prompt": "What is 2+3?", "completion": "<think>Step 1: 2+3=5</think> 5", "reward": 1.0,
         "correct": True, "reference": "5", "prediction": "5", "group": 0,
         "advantages": {"outcome": 0.7071, "process": -0.25},
         "steps": [("Step 1: 2+3=5", 0.25, -0.5, -0.5)], "section": "evaluation set test"},
        {"prompt": "What is 9-4?", "completion": "6", "reward": 0.0, "correct": False,
         "reference": "5", "prediction": "6", "group": 1, "section": "evaluation set ood"},
    ]
    page = completions_html(rows)
    assert re.findall(r"<h2>([^<]+)</h2>", page) == ["evaluation set test", "evaluation set ood"]
    facts = re.findall(r"<tr><th>([^<]+)</th><td>([^<]+)</td></tr>", page)
    assert facts == [("reference", "5"), ("prediction", "5"), ("advantage (outcome)", "0.7071"),
                     ("advantage (process)", "-0.2500"), ("reference", "5"),
                     ("prediction", "6")]
    assert "#0 group 0 reward = 1.0000" in page and "#1 group 1 reward = 0.0000" in page
    assert re.findall(r'<span class="g">([^<]+)</span>', page) == \
        ["l=-0.5000 h=-0.5000 g=0.2500"]
    assert page.count('<div class="legend">') == 1
    assert "What is 2+3?" in "".join(_parse(page).text)
