"""Tests for migjax.viz: escaping of model text, credit colours, tooltips, page writing."""

import os
import re
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.viz import (
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
    assert question.replace("\r", "\n") in text.replace("\r", "\n")
    assert completion.replace("\r", "\n") in text.replace("\r", "\n")


def test_credit_colours_scale_with_page_max():
    page = credit_html(
        [
            _credit_record(g=[0.0, 0.5]),
            _credit_record(steps=["a"], g=[2.0], l=[0.0, 1.0], h=[0.0, 1.0]),
        ]
    )
    backgrounds = re.findall(r'class="step" style="background: ([^"]+)"', page)
    assert backgrounds == [
        "rgba(255, 255, 255, 0.000)",
        "rgba(40, 167, 69, 0.250)",
        "rgba(40, 167, 69, 1.000)",
    ]


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
