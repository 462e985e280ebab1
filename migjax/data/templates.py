"""Prompt rendering: a question through the `task.template` format string, then the tokenizer's
chat template where it has one, then an optional completion prefix."""

from __future__ import annotations

import string

import jinja2

DEFAULT_TEMPLATE = (
    "Solve the following problem step by step. Reason inside <think> and </think>, writing "
    'each step on its own line that starts with "Step n:", then give only the final answer '
    "inside <answer> and </answer>, like this:\n"
    "<think>\n"
    "Step 1: ...\n"
    "Step 2: ...\n"
    "</think>\n"
    "<answer>...</answer>\n"
    "\n"
    "Problem: {question}"
)
# The arithmetic task's plain prompt; equals `migjax.data.arith.format_prompt(question)`.
ARITH_TEMPLATE = "Question: {question}\nAnswer: "

_FIELD = "question"


def check_template(template: str) -> None:
    """Raises ValueError naming `task.template` unless `template` is a format string whose only
    replacement field is `{question}` (literal braces must be doubled: `{{` and `}}`)."""
    if not isinstance(template, str):
        raise ValueError(f"task.template must be a string, got {type(template).__name__}")
    try:
        fields = _fields(template)
    except ValueError as e:
        raise ValueError(
            f"task.template is not a valid format string ({e}); write literal braces as "
            f"'{{{{' and '}}}}': {template!r}"
        ) from None
    bad = sorted({f for f in fields if f != _FIELD})
    if bad:
        shown = ", ".join("{" + f + "}" for f in bad)
        raise ValueError(
            f"task.template has unknown field(s) {shown}; the only field is {{question}} "
            f"(write literal braces as '{{{{' and '}}}}'): {template!r}"
        )
    if not fields:
        raise ValueError(f"task.template has no {{question}} field: {template!r}")
    try:  # conversions and format specs are only checked when applied
        template.format(question="")
    except (ValueError, TypeError) as e:
        raise ValueError(f"task.template cannot be filled in ({e}): {template!r}") from None


def _fields(template: str) -> list[str]:
    """Every replacement field name in `template`, nested format specs included."""
    out = []
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            out.append(field)
        if spec:
            out.extend(_fields(spec))
    return out


def _apply_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
        )
    return text


def render_prompt(
    question: str,
    tokenizer,
    *,
    template: str,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    completion_prefix: str = "",
) -> str:
    """The prompt text for `question`: `template` filled in, wrapped as a user message (after an
    optional system message) by the tokenizer's chat template when `use_chat_template` and the
    tokenizer has one, then `completion_prefix` (e.g. "<think>\\n") appended.

    Without a chat template the filled-in text is used as is, preceded by `system_prompt` and a
    blank line when one is given. A chat template that rejects the system role (it raises) gets
    the system prompt folded into the user message instead.
    """
    check_template(template)
    text = template.format(question=question)
    has_chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if not has_chat:
        prompt = text if system_prompt is None else f"{system_prompt}\n\n{text}"
    elif system_prompt is None:
        prompt = _apply_chat(tokenizer, [{"role": "user", "content": text}])
    else:
        try:
            prompt = _apply_chat(
                tokenizer,
                [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}],
            )
        except jinja2.TemplateError:
            merged = f"{system_prompt}\n\n{text}"
            prompt = _apply_chat(tokenizer, [{"role": "user", "content": merged}])
    return prompt + completion_prefix
