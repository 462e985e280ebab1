"""Step segmentation: find the CoT steps of each completion in text and map them to token indices.

Host-side numpy. Boundaries are found in the text that the rollout's own tokens decode to (the
concatenation of `token_strings[id]` over the real tokens), so prefixes are token slices of the
rollout and scoring never re-tokenises.

Conventions (per completion, with K steps after the cap):
- the CoT span runs from the first `think_open` to the first `think_close` after it;
- a step's *content* is its text without leading/trailing whitespace; its *region* runs from the
  start of its content to the start of the next step (or to `think_close` for the last step), so
  whitespace between steps belongs to the preceding step;
- a token belongs to the step whose region holds its first character (0 when none);
- `cut_k` is the exclusive end, on the C axis, of the prefix through step k's content:
  `tokens_NxC[n, :cut_k]` is prefix_k. With a left-aligned mask it is the number of completion
  tokens in prefix_k. `cut_0` ends at the token holding the last character of `think_open`;
  `cut_k` (k >= 1) at the token holding the last non-whitespace character of step k; for
  k > K, `cut_k = cut_K`. A completion without `think_open` has all cuts 0.
- steps past `max_steps` merge into step `max_steps`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

DELIMITERS = ("step", "newline", "blank_line")
_STEP_RE = re.compile(r"(?m)^Step \d+:")


class Segmentation(NamedTuple):
    """Step structure of N completions in token space (numpy arrays)."""

    step_id_NxC: np.ndarray  # int32, 0 = not in a step, k = 1..K for tokens of step k
    cot_mask_NxC: np.ndarray  # bool, think_open token .. think_close token; all False if no_cot
    cuts_NxK1: np.ndarray  # int32, prefix_k = tokens[:cut_k], k = 0..max_steps
    step_mask_NxK: np.ndarray  # bool, step k (1..max_steps) exists
    num_steps_N: np.ndarray  # int32, K per completion (0 when no_cot)
    no_cot_N: np.ndarray  # bool, no think_open, no think_close after it, or no step inside


class _Layout(NamedTuple):
    """Character positions of the CoT of one text (all absolute offsets)."""

    open_start: int
    open_end: int
    close_start: int  # -1 when there is no think_close after think_open
    close_end: int
    spans: list[tuple[int, int]]  # step contents after the cap: [(start, end)]


def _check_options(delimiter: str, think_open: str, think_close: str, max_steps: int | None):
    if delimiter not in DELIMITERS:
        raise ValueError(f"step delimiter {delimiter!r} is not one of {DELIMITERS}")
    if not think_open or not think_close:
        raise ValueError(
            f"think_open ({think_open!r}) and think_close ({think_close!r}) must be non-empty"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")


def _line_spans(body: str) -> list[tuple[int, int, bool]]:
    """(content_start, content_end, is_blank) of every line of `body`."""
    out, pos = [], 0
    for line in body.split("\n"):
        stripped_left = line.lstrip()
        start = pos + len(line) - len(stripped_left)
        out.append((start, pos + len(line.rstrip()), not stripped_left))
        pos += len(line) + 1
    return out


def body_step_spans(body: str, delimiter: str) -> list[tuple[int, int]]:
    """Step content spans inside the CoT body (offsets relative to `body`), before the cap."""
    if delimiter == "step":
        starts = [m.start() for m in _STEP_RE.finditer(body)]
        ends = starts[1:] + [len(body)] if starts else []
        return [(s, s + len(body[s:e].rstrip())) for s, e in zip(starts, ends, strict=True)]
    if delimiter == "newline":
        return [(s, e) for s, e, blank in _line_spans(body) if not blank]
    spans: list[tuple[int, int]] = []
    prev_blank = True
    for s, e, blank in _line_spans(body):
        if blank:
            prev_blank = True
            continue
        if prev_blank:
            spans.append((s, e))
        else:
            spans[-1] = (spans[-1][0], e)
        prev_blank = False
    return spans


def _layout(
    text: str, delimiter: str, think_open: str, think_close: str, max_steps: int | None
) -> _Layout | None:
    """CoT layout of `text`, or None when it has no think_open."""
    open_start = text.find(think_open)
    if open_start < 0:
        return None
    open_end = open_start + len(think_open)
    close_start = text.find(think_close, open_end)
    if close_start < 0:
        return _Layout(open_start, open_end, -1, -1, [])
    body = text[open_end:close_start]
    spans = [(open_end + s, open_end + e) for s, e in body_step_spans(body, delimiter)]
    if max_steps is not None and len(spans) > max_steps:
        spans = spans[: max_steps - 1] + [(spans[max_steps - 1][0], spans[-1][1])]
    return _Layout(open_start, open_end, close_start, close_start + len(think_close), spans)


def step_spans_text(
    text: str,
    *,
    delimiter: str = "step",
    think_open: str = "<think>",
    think_close: str = "</think>",
    max_steps: int | None = None,
) -> list[tuple[int, int]]:
    """[(start_char, end_char)] of each step's content (whitespace-stripped) in `text`.

    Empty when the text has no CoT (no think_open, no think_close after it, or no step inside).
    With `max_steps`, steps past the cap merge into the last one.
    """
    _check_options(delimiter, think_open, think_close, max_steps)
    layout = _layout(text, delimiter, think_open, think_close, max_steps)
    return [] if layout is None else list(layout.spans)


def _segment_one(
    pieces: list[str], pos_R: np.ndarray, layout_args: tuple, max_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-real-token step ids, cot mask, cuts [max_steps+1] and K for one completion.

    `pos_R` gives the C-axis position of each of the R real tokens.
    """
    num_real = len(pieces)
    lens_R = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=num_real)
    ends_R = np.cumsum(lens_R)
    starts_R = ends_R - lens_R
    text = "".join(pieces)
    step_id_R = np.zeros(num_real, np.int32)
    cot_R = np.zeros(num_real, bool)
    cuts = np.zeros(max_steps + 1, np.int32)
    layout = _layout(text, *layout_args, max_steps)
    if layout is None:
        return step_id_R, cot_R, cuts, 0
    char_tok = np.repeat(np.arange(num_real), lens_R)  # char offset -> real-token index

    def cut_after(char: int) -> int:
        return int(pos_R[char_tok[char]]) + 1

    cuts[:] = cut_after(layout.open_end - 1)
    num_steps = len(layout.spans)
    if num_steps == 0:
        return step_id_R, cot_R, cuts, 0
    char_step = np.zeros(len(text) + 1, np.int32)  # one spare slot for empty trailing tokens
    region_ends = [s for s, _ in layout.spans[1:]] + [layout.close_start]
    for k, ((start, end), region_end) in enumerate(zip(layout.spans, region_ends, strict=True)):
        char_step[start:region_end] = k + 1
        cuts[k + 1 :] = cut_after(end - 1)
    step_id_R[:] = char_step[starts_R]
    cot_R[:] = (starts_R < layout.close_end) & (
        np.maximum(ends_R, starts_R + 1) > layout.open_start
    )
    return step_id_R, cot_R, cuts, num_steps


def segment_completions(
    tokens_NxC: np.ndarray,
    mask_NxC: np.ndarray,
    token_strings: Sequence[str],
    *,
    max_steps: int,
    delimiter: str = "step",
    think_open: str = "<think>",
    think_close: str = "</think>",
    prefix: str = "",
) -> Segmentation:
    """Segments N completions into at most `max_steps` CoT steps (see the module docstring).

    Args:
      tokens_NxC: completion token ids.
      mask_NxC: True on real completion tokens; the completion text is the concatenation of
        `token_strings[id]` over the real tokens, in order.
      token_strings: the text each token id contributes when decoded.
      max_steps: K, the static step capacity; later steps merge into step K.
      delimiter: "step" (a line starting `Step <n>:`), "newline" (every non-blank line is a
        step) or "blank_line" (paragraphs separated by blank lines).
      prefix: text that ends the prompt and that every completion continues (a forced
        `task.completion_prefix` such as "<think>\n"). It is segmented as if it were the
        completion's first token, sitting just before position 0: tags in it count, and a cut
        inside it is 0 (the prompt already holds it).
    """
    _check_options(delimiter, think_open, think_close, max_steps)
    tokens_NxC = np.asarray(tokens_NxC)
    mask_NxC = np.asarray(mask_NxC, dtype=bool)
    if tokens_NxC.ndim != 2 or tokens_NxC.shape != mask_NxC.shape:
        raise ValueError(
            f"tokens_NxC {tokens_NxC.shape} and mask_NxC {mask_NxC.shape} must be equal 2-D shapes"
        )
    n_seq, c_len = tokens_NxC.shape
    vocab = len(token_strings)
    step_id_NxC = np.zeros((n_seq, c_len), np.int32)
    cot_mask_NxC = np.zeros((n_seq, c_len), bool)
    cuts_NxK1 = np.zeros((n_seq, max_steps + 1), np.int32)
    num_steps_N = np.zeros(n_seq, np.int32)
    layout_args = (delimiter, think_open, think_close)
    for n in range(n_seq):
        pos_R = np.flatnonzero(mask_NxC[n])
        ids_R = tokens_NxC[n, pos_R]
        bad = np.flatnonzero((ids_R < 0) | (ids_R >= vocab))
        if bad.size:
            c = int(pos_R[bad[0]])
            raise ValueError(
                f"completion {n}, position {c}: token id {int(tokens_NxC[n, c])} is outside "
                f"token_strings (size {vocab})"
            )
        pieces = [token_strings[i] for i in ids_R.tolist()]
        if prefix:
            pieces, pos_R = [prefix, *pieces], np.concatenate([[-1], pos_R])
        step_id_R, cot_R, cuts, k = _segment_one(pieces, pos_R, layout_args, max_steps)
        if prefix:
            step_id_R, cot_R, pos_R = step_id_R[1:], cot_R[1:], pos_R[1:]
        step_id_NxC[n, pos_R] = step_id_R
        cot_mask_NxC[n, pos_R] = cot_R
        cuts_NxK1[n] = cuts
        num_steps_N[n] = k
    step_mask_NxK = np.arange(1, max_steps + 1)[None, :] <= num_steps_N[:, None]
    return Segmentation(
        step_id_NxC=step_id_NxC,
        cot_mask_NxC=cot_mask_NxC,
        cuts_NxK1=cuts_NxK1,
        step_mask_NxK=step_mask_NxK,
        num_steps_N=num_steps_N,
        no_cot_N=num_steps_N == 0,
    )
