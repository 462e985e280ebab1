"""Demonstrations for the supervised warm start (cold start) from real datasets' worked solutions,
rendered in exactly the format the RL reward stage parses:

    <think>
    Step 1: ...
    Step 2: ...
    </think>
    <answer>42</answer>

Steps follow `mig.step_delimiter` ("step": `Step n:` lines; "newline": one line each;
"blank_line": paragraphs), so a cold-started model writes steps that segmentation finds and a
format the format reward accepts.

- GSM8K: each reasoning line of the solution is a step, its `<<...>>` calculator annotations
  removed; the `#### n` line becomes the answer.
- MATH: the solution's lines, or its sentences when it is one paragraph, are the steps, with the
  last `\\boxed{...}` unwrapped in place; the boxed value is the answer.
"""

from __future__ import annotations

import re

from migjax.rewards.answers import extract_answer
from migjax.rewards.segment import DELIMITERS

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"^\s*####\s*(.+?)\s*$", re.M)
# a sentence ends at . ! or ? followed by a space and a capital, outside $...$ math
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\\])")


def render(steps: list[str], answer: str, delimiter: str = "step") -> str:
    """The completion text of a demonstration: the steps inside the think block, then the
    answer."""
    if delimiter not in DELIMITERS:
        raise ValueError(f"step delimiter {delimiter!r} is not one of {DELIMITERS}")
    steps = [" ".join(s.split()) for s in steps if s.strip()]
    if not steps:
        raise ValueError("a demonstration needs at least one step")
    if delimiter == "step":
        body = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))
    else:
        body = ("\n" if delimiter == "newline" else "\n\n").join(steps)
    return f"<think>\n{body}\n</think>\n<answer>{answer.strip()}</answer>"


def gsm8k_steps(solution: str) -> tuple[list[str], str]:
    """(steps, answer) of a GSM8K solution."""
    m = _FINAL.search(solution)
    if m is None:
        raise ValueError("GSM8K solution has no '#### answer' line")
    body = _CALC.sub("", solution[: m.start()])
    return [line for line in body.split("\n") if line.strip()], m.group(1).replace(",", "")


def math_steps(solution: str) -> tuple[list[str], str]:
    """(steps, answer) of a MATH solution."""
    answer = extract_answer(solution)
    if answer is None:
        raise ValueError("MATH solution has no \\boxed{} answer")
    text = _unbox_last(solution)
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) == 1:
        lines = _sentences(lines[0])
    return lines, answer


def _unbox_last(text: str) -> str:
    """The text with its last `\\boxed{X}` replaced by X (braces balanced)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    i, depth = start + len("\\boxed{"), 1
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[:start] + text[start + len("\\boxed{"): i - 1] + text[i:]


def _sentences(paragraph: str) -> list[str]:
    """Splits at sentence ends that are not inside `$...$` math."""
    out, last = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        if paragraph[: m.start()].count("$") % 2 == 0:
            out.append(paragraph[last: m.start()])
            last = m.end()
    out.append(paragraph[last:])
    return [s for s in out if s.strip()]


STEP_RULES = {"gsm8k": gsm8k_steps, "math": math_steps}


def demonstration(kind: str, solution: str, delimiter: str = "step",
                  answer: str | None = None) -> str:
    """The rendered demonstration of a worked solution of dataset `kind` (gsm8k or math). The
    answer tag holds `answer` when given (the record's reference, what the verifier compares
    with; MATH's `answer` field can differ from the boxed text, e.g. `64` for `64\\%`), else
    the solution's own final value."""
    if kind not in STEP_RULES:
        raise ValueError(f"no demonstrations for dataset kind {kind!r}; known: "
                         f"{sorted(STEP_RULES)} (and the arith task)")
    steps, final = STEP_RULES[kind](solution)
    return render(steps, answer or final, delimiter)
