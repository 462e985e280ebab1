"""Tests for prompt rendering: templates, chat templates, system prompts, bad templates, fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from migjax.data import arith
from migjax.data.templates import (
    ARITH_TEMPLATE,
    DEFAULT_TEMPLATE,
    check_template,
    render_prompt,
)

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A chat template that, like some real ones, refuses a system message.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _tokenizer(chat_template=None):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>")),
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.chat_template = chat_template
    return tok


PLAIN, CHATTY, REFUSES_SYSTEM = _tokenizer(), _tokenizer(CHAT), _tokenizer(NO_SYSTEM)


def test_plain_tokenizer_uses_text_as_is():
    out = render_prompt("2+2?", PLAIN, template="Q: {question}\nA:", completion_prefix="<think>\n")
    assert out == "Q: 2+2?\nA:<think>\n"


def test_plain_tokenizer_prepends_system_prompt():
    out = render_prompt("x", PLAIN, template="Q: {question}", system_prompt="Be brief.")
    assert out == "Be brief.\n\nQ: x"


def test_arith_template_matches_arith_prompt():
    q = arith.ArithTask(arith.arith_spec("train"))[3].question
    assert render_prompt(q, PLAIN, template=ARITH_TEMPLATE) == arith.format_prompt(q)


def test_default_template_names_the_tags():
    out = render_prompt("What is 6*7?", PLAIN, template=DEFAULT_TEMPLATE, use_chat_template=False)
    assert out.endswith("Problem: What is 6*7?")
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "Step 1:"):
        assert tag in out


def test_chat_template_wraps_user_message():
    out = render_prompt("2+2?", CHATTY, template="Q: {question}", completion_prefix="<think>\n")
    assert out == "<|user|>Q: 2+2?<|end|>\n<|assistant|><think>\n"


def test_chat_template_with_system_message():
    out = render_prompt("2+2?", CHATTY, template="Q: {question}", system_prompt="Be brief.")
    assert out == "<|system|>Be brief.<|end|>\n<|user|>Q: 2+2?<|end|>\n<|assistant|>"


def test_chat_template_can_be_turned_off():
    out = render_prompt("2+2?", CHATTY, template="Q: {question}", use_chat_template=False)
    assert out == "Q: 2+2?"


def test_system_prompt_folded_when_template_refuses_it():
    out = render_prompt("2+2?", REFUSES_SYSTEM, template="Q: {question}", system_prompt="Sys.")
    assert out == "[user]Sys.\n\nQ: 2+2?\n[assistant]"


@pytest.mark.parametrize(
    "template, needle",
    [
        ("no field here", "no {question}"),
        ("{{question}}", "no {question}"),
        ("{q}", "{q}"),
        ("{question} {answer}", "{answer}"),
        ("{}", "{}"),
        ("{0}", "{0}"),
        ("{question.upper}", "{question.upper}"),
        ("{question[0]}", "{question[0]}"),
        ("{question:{width}}", "{width}"),
        ("Use \\boxed{} {question}", "{}"),
        ("{question", "not a valid format string"),
        ("x } {question}", "not a valid format string"),
        ("{question!z}", "cannot be filled in"),
        ("{question:d}", "cannot be filled in"),
    ],
)
def test_bad_templates_raise(template, needle):
    with pytest.raises(ValueError, match="task.template") as info:
        render_prompt("q", CHATTY, template=template)
    assert needle in str(info.value)


def test_check_template_rejects_non_string():
    with pytest.raises(ValueError, match="task.template must be a string"):
        check_template(None)


def test_literal_braces_and_conversions_allowed():
    out = render_prompt("a", PLAIN, template="{{x}} {question!r} {question:>3}")
    assert out == "{x} 'a'   a"


_questions = st.text(max_size=80) | st.sampled_from(
    ["{question}", "{}", "{{ x }}", "{% if %}", "{0}", "}{", "\x00", "\u202e\U0001f600", "\r\n"]
)


@settings(max_examples=150, deadline=None)
@given(q=_questions, system=st.none() | st.text(max_size=20), prefix=st.text(max_size=5))
def test_fuzz_any_question_renders(q, system, prefix):
    plain = render_prompt(
        q, PLAIN, template=ARITH_TEMPLATE, system_prompt=system, completion_prefix=prefix
    )
    head = "" if system is None else system + "\n\n"
    assert plain == f"{head}Question: {q}\nAnswer: {prefix}"
    chat = render_prompt(
        q, CHATTY, template=DEFAULT_TEMPLATE, system_prompt=system, completion_prefix=prefix
    )
    user = DEFAULT_TEMPLATE.format(question=q)
    sys_part = "" if system is None else f"<|system|>{system}<|end|>\n"
    assert chat == f"{sys_part}<|user|>{user}<|end|>\n<|assistant|>{prefix}"
