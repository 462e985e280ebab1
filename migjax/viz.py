"""Self-contained HTML views of step credit and sampled completions.

Every piece of question, step, answer, prompt and completion text passes through
`html.escape`, so model output is always shown as text, never interpreted as markup.
Step backgrounds encode the credit `g_k`: white at 0, green with opacity
`g_k / max|g|` over the page (red for the negative gains of the no-watermark ablation).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

GREEN = (40, 167, 69)
RED = (220, 53, 69)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.label { font-size: 0.8em; color: #666; text-transform: uppercase; margin-top: 0.5em; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
.step { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em;
        border-left: 3px solid #ddd; padding: 0.2em 0.5em; margin: 0.15em 0; }
.g { float: right; font-size: 0.8em; color: #555; margin-left: 1em; }
.summary { font-size: 0.85em; color: #444; }
.ok { color: #1a7f37; font-weight: bold; }
.bad { color: #c62828; font-weight: bold; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(x: float) -> str:
    x = float(x)
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def page_max_gain(gains: Sequence[float]) -> float:
    """The largest finite |g| among `gains` (0 when there is none)."""
    finite = [abs(float(g)) for g in gains if math.isfinite(float(g))]
    return max(finite, default=0.0)


def credit_color(g: float, max_g: float) -> str:
    """CSS background for credit `g` on a page whose largest |g| is `max_g`."""
    g = float(g)
    if not math.isfinite(g) or max_g <= 0 or g == 0:
        return "rgba(255, 255, 255, 0.000)"
    r, gr, b = GREEN if g > 0 else RED
    alpha = min(abs(g) / max_g, 1.0)
    return f"rgba({r}, {gr}, {b}, {alpha:.3f})"


def _step_div(text: str, g: float, max_g: float, tooltip: str) -> str:
    return (f'<div class="step" style="background: {credit_color(g, max_g)}" '
            f'title="{_esc(tooltip)}"><span class="g">g={_esc(_num(g))}</span>{_esc(text)}</div>')


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        *body,
        "</body></html>",
        "",
    ])


def _per_step(record: Mapping[str, Any], key: str, num_steps: int, index: int) -> list:
    """Values of `l` or `h` for steps 1..K; accepts K + 1 entries (with k = 0) or K."""
    values = list(record[key])
    if len(values) == num_steps + 1:
        return values[1:]
    if len(values) == num_steps:
        return values
    raise ValueError(f"credit record {index}: field {key!r} has {len(values)} entries, expected "
                     f"{num_steps + 1} (k = 0..K) or {num_steps} for {num_steps} steps")


def credit_html(records: Sequence[Mapping[str, Any]], *, title: str = "Step credit") -> str:
    """A page showing each question's steps coloured by their credit g_k.

    records: {"question": str, "steps": [str] * K, "answer": str, "g": [float] * K,
    "l": [float] * (K + 1 or K), "h": [float] * (K + 1 or K)}.
    """
    for i, rec in enumerate(records):
        for field in ("question", "steps", "answer", "g", "l", "h"):
            if field not in rec:
                raise ValueError(f"credit record {i}: missing field {field!r}")
        if len(rec["g"]) != len(rec["steps"]):
            raise ValueError(f"credit record {i}: field 'g' has {len(rec['g'])} entries for "
                             f"{len(rec['steps'])} steps")
    max_g = page_max_gain([g for rec in records for g in rec["g"]])
    body = []
    for i, rec in enumerate(records):
        k = len(rec["steps"])
        l_k, h_k = _per_step(rec, "l", k, i), _per_step(rec, "h", k, i)
        parts = ['<div class="card">', '<div class="label">question</div>',
                 f'<div class="text">{_esc(rec["question"])}</div>',
                 f'<div class="label">steps ({k})</div>']
        for j, (text, g) in enumerate(zip(rec["steps"], rec["g"], strict=True)):
            tip = f"step {j + 1}: l_k={_num(l_k[j])} h_k={_num(h_k[j])} g_k={_num(g)}"
            parts.append(_step_div(text, g, max_g, tip))
        gain_sum = sum(float(g) for g in rec["g"])
        l_all = list(rec["l"])
        summary = f"sum g = {_num(gain_sum)}"
        if len(l_all) == k + 1:
            summary = f"l_0 = {_num(l_all[0])}, " + summary
        if l_all:
            summary += f", l_K = {_num(l_all[-1])}"
        parts += ['<div class="label">answer</div>',
                  f'<div class="text">{_esc(rec["answer"])}</div>',
                  f'<div class="summary">{_esc(summary)}</div>', "</div>"]
        body.append("\n".join(parts))
    return _page(title, body)


def completions_html(rows: Sequence[Mapping[str, Any]], *, title: str = "Completions") -> str:
    """A page of sampled completions with reward and correctness.

    rows: {"prompt": str, "completion": str, "reward": float, "correct": bool,
    "steps": [(text, g)] (optional: the completion's CoT steps, coloured by g)}.
    """
    for i, row in enumerate(rows):
        for field in ("prompt", "completion", "reward", "correct"):
            if field not in row:
                raise ValueError(f"completion row {i}: missing field {field!r}")
    max_g = page_max_gain([g for row in rows for _, g in (row.get("steps") or [])])
    body = []
    for i, row in enumerate(rows):
        verdict = ('<span class="ok">correct</span>' if row["correct"]
                   else '<span class="bad">wrong</span>')
        parts = ['<div class="card">',
                 f'<div class="summary">#{i} reward = {_esc(_num(row["reward"]))} {verdict}</div>',
                 '<div class="label">prompt</div>',
                 f'<div class="text">{_esc(row["prompt"])}</div>']
        steps = row.get("steps")
        if steps:
            parts.append(f'<div class="label">steps ({len(steps)})</div>')
            for j, (text, g) in enumerate(steps):
                parts.append(_step_div(text, g, max_g, f"step {j + 1}: g_k={_num(g)}"))
        parts += ['<div class="label">completion</div>',
                  f'<div class="text">{_esc(row["completion"])}</div>', "</div>"]
        body.append("\n".join(parts))
    return _page(title, body)


def write_html(path: str | os.PathLike, html_text: str) -> None:
    """Writes an HTML page atomically."""
    from migjax.checkpointing import atomic_write_text  # keeps this module free of orbax

    atomic_write_text(path, html_text)
