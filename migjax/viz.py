"""Self-contained HTML views of step credit and sampled completions.

Every piece of question, step, answer, prompt and completion text passes through
`html.escape`, so model output is always shown as text, never interpreted as markup, and
control characters (other than tabs and line breaks) are removed. Step backgrounds encode the
credit `g_k` on an absolute scale, the same on every page: white at 0, green with opacity
`min(g_k / GAIN_SCALE, 1)` (red for the negative gains of the no-watermark ablation), explained
by a legend at the top of the page; each step shows its g_k, l_k and h_k.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

GREEN = (40, 167, 69)
RED = (220, 53, 69)
GAIN_SCALE = 0.5  # |g_k| (nats, or probability for mig.likelihood_space="prob") at full colour
# C0 and C1 control characters and DEL, except tab, line feed and carriage return
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.label { font-size: 0.8em; color: #666; text-transform: uppercase; margin-top: 0.5em; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
.step { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em;
        border-left: 3px solid #ddd; padding: 0.2em 0.5em; margin: 0.15em 0; }
.g { float: right; font-size: 0.8em; color: #333; margin-left: 1em; padding: 0 0.3em;
     background: rgba(255, 255, 255, 0.85); border-radius: 3px; }
.summary { font-size: 0.85em; color: #444; }
.facts { font-size: 0.85em; border-collapse: collapse; margin-top: 0.4em; }
.facts th { text-align: left; color: #666; font-weight: normal; padding-right: 1em; }
.facts td { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.legend { font-size: 0.85em; color: #444; margin: 0.5em 0 1em; }
.swatch { display: inline-block; min-width: 3.5em; text-align: center; padding: 0.1em 0.3em;
          border: 1px solid #ddd; font-family: ui-monospace, monospace; }
h2 { margin-top: 1.5em; border-bottom: 1px solid #ddd; }
.ok { color: #1a7f37; font-weight: bold; }
.scene { float: right; margin: 0 0 0.5em 1em; image-rendering: pixelated; border: 1px solid #ccc; }
.bad { color: #c62828; font-weight: bold; }
"""


def clean_text(text: Any) -> str:
    """`text` as a string without control characters; CR LF and CR become LF."""
    return _CONTROL.sub("", str(text).replace("\r\n", "\n").replace("\r", "\n"))


def _esc(text: Any) -> str:
    return html.escape(clean_text(text), quote=True)


def _num(x: float) -> str:
    x = float(x)
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def page_max_gain(gains: Sequence[float]) -> float:
    """The largest finite |g| among `gains` (0 when there is none)."""
    finite = [abs(float(g)) for g in gains if math.isfinite(float(g))]
    return max(finite, default=0.0)


def credit_color(g: float, scale: float = GAIN_SCALE) -> str:
    """CSS background for credit `g`: full colour at |g| >= `scale`."""
    g = float(g)
    if not math.isfinite(g) or scale <= 0 or g == 0:
        return "rgba(255, 255, 255, 0.000)"
    r, gr, b = GREEN if g > 0 else RED
    alpha = min(abs(g) / scale, 1.0)
    return f"rgba({r}, {gr}, {b}, {alpha:.3f})"


def legend_html(scale: float, gains: Sequence[float]) -> str:
    """The colour scale of step credit, with this page's largest |g_k|."""
    def label(v):
        return "0" if v == 0 else f"{'≥ ' if v >= scale else '≤ ' if v <= -scale else ''}{v:+.2f}"

    swatches = "".join(
        f'<span class="swatch" style="background: {credit_color(v, scale)}">{_esc(label(v))}'
        "</span>" for v in (-scale, -scale / 2, 0.0, scale / 4, scale / 2, 3 * scale / 4, scale))
    return (f'<div class="legend">Step colour: its credit g_k (beside each step: l_k, the '
            "reference answer's log-likelihood after step k; h_k, the watermark; g_k). "
            f"{swatches} full colour at "
            f"|g_k| &ge; {_esc(_num(scale))}; largest |g_k| on this page "
            f"{_esc(_num(page_max_gain(gains)))}</div>")


def _step_div(text: str, g: float, scale: float, j: int, l_k=None, h_k=None) -> str:
    shown = f"g={_num(g)}"
    if l_k is not None and h_k is not None:
        shown = f"l={_num(l_k)} h={_num(h_k)} {shown}"
    tip = f"step {j + 1}: " + shown.replace("l=", "l_k=").replace("h=", "h_k=").replace(
        "g=", "g_k=")
    return (f'<div class="step" style="background: {credit_color(g, scale)}" '
            f'title="{_esc(tip)}"><span class="g">{_esc(shown)}</span>{_esc(text)}</div>')


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


def credit_html(records: Sequence[Mapping[str, Any]], *, title: str = "Step credit",
                gain_scale: float = GAIN_SCALE) -> str:
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
    body = [legend_html(gain_scale, [g for rec in records for g in rec["g"]])]
    for i, rec in enumerate(records):
        k = len(rec["steps"])
        l_k, h_k = _per_step(rec, "l", k, i), _per_step(rec, "h", k, i)
        parts = ['<div class="card">', '<div class="label">question</div>',
                 f'<div class="text">{_esc(rec["question"])}</div>',
                 f'<div class="label">steps ({k})</div>']
        for j, (text, g) in enumerate(zip(rec["steps"], rec["g"], strict=True)):
            parts.append(_step_div(text, g, gain_scale, j, l_k[j], h_k[j]))
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


def _facts(row: Mapping[str, Any]) -> str:
    """The table of a completion's reference answer, extracted prediction and advantages."""
    cells = [(name, row[field]) for name, field in (("reference", "reference"),
                                                    ("prediction", "prediction"))
             if field in row]
    for name, value in (row.get("advantages") or {}).items():
        cells.append((f"advantage ({name})", _num(value)))
    if not cells:
        return ""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in cells)
    return f'<table class="facts">{rows}</table>'


def completions_html(rows: Sequence[Mapping[str, Any]], *, title: str = "Completions",
                     gain_scale: float = GAIN_SCALE) -> str:
    """A page of sampled completions with reward and correctness.

    rows: {"prompt": str (the question), "completion": str, "reward": float, "correct": bool}
    and optionally "reference" and "prediction" (str), "group" (int: the prompt's group),
    "advantages" ({stream: float}), "section" (a heading, shown where it changes: one per
    evaluation set), "steps" ([(text, g)] or [(text, g, l_k, h_k)]: the CoT steps,
    coloured by g) and "image" (uint8 [H, W, 3]: an image task's image, shown beside the
    question; a group's rows show it once).
    """
    for i, row in enumerate(rows):
        for field in ("prompt", "completion", "reward", "correct"):
            if field not in row:
                raise ValueError(f"completion row {i}: missing field {field!r}")
    gains = [step[1] for row in rows for step in (row.get("steps") or [])]
    body = [legend_html(gain_scale, gains)] if gains else []
    section = None
    for i, row in enumerate(rows):
        if row.get("section") is not None and row["section"] != section:
            section = row["section"]
            body.append(f"<h2>{_esc(section)}</h2>")
        verdict = ('<span class="ok">correct</span>' if row["correct"]
                   else '<span class="bad">wrong</span>')
        group = f" group {_esc(row['group'])}" if row.get("group") is not None else ""
        first_of_group = i == 0 or row.get("group") is None or \
            rows[i - 1].get("group") != row.get("group")
        image = row.get("image")
        parts = ['<div class="card">',
                 image_html(image) if image is not None and first_of_group else "",
                 f'<div class="summary">#{i}{group} reward = {_esc(_num(row["reward"]))} '
                 f"{verdict}</div>",
                 _facts(row),
                 '<div class="label">question</div>',
                 f'<div class="text">{_esc(row["prompt"])}</div>']
        steps = row.get("steps")
        if steps:
            parts.append(f'<div class="label">steps ({len(steps)})</div>')
            for j, (text, g, *lh) in enumerate(steps):
                parts.append(_step_div(text, g, gain_scale, j, *lh))
        parts += ['<div class="label">completion</div>',
                  f'<div class="text">{_esc(row["completion"])}</div>', "</div>"]
        body.append("\n".join(p for p in parts if p))
    return _page(title, body)


def image_html(image, scale: int = 2) -> str:
    """An inline PNG <img> of a uint8 [H, W, 3] image, drawn `scale` times its size."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(image, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    h, w = a.shape[:2]
    return (f'<img class="scene" alt="the prompt\'s image" width="{w * scale}" '
            f'height="{h * scale}" src="data:image/png;base64,{data}">')


def write_html(path: str | os.PathLike, html_text: str) -> None:
    """Writes an HTML page atomically."""
    from migjax.checkpointing import atomic_write_text  # keeps this module free of orbax

    atomic_write_text(path, html_text)
