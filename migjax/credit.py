"""Step credit of given reasoning traces: the answer likelihoods l_k, the watermark h_k and the
gains g_k of every step, computed by the segmentation and the probe pass of training.

    python -m migjax.credit --model DIR --data traces.jsonl --out credit.jsonl [--html credit.html]

Input, one JSON object a line: {"question": str, "steps": [str, ...], "answer": str or [str, ...]}
(several answers are equivalent reference strings, combined by `--variant-reduce`). The
completion scored is "<think>\\n" + the steps joined by "\\n" + "\\n</think>\\n<answer>" + answer
+ "</answer>"; with the default `step` delimiter a step that does not start with "Step <n>:"
gets "Step <k>: " put in front, and with `blank_line` the steps are joined by a blank line.
Output, one line per record: {"line", "question", "steps" (as scored; steps past --max-steps
merged into the last), "answer", "num_steps", "l": [l_0..l_K], "h": [h_0..h_K], "g": [g_1..g_K],
"gain_sum"}.
Option defaults are those of configs/base.py (`mig.*`, `task.template`, `model.dtype`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from migjax.data.templates import check_template, render_prompt
from migjax.data.tokenizer import load_tokenizer, token_strings
from migjax.models import load_pretrained, merge, split
from migjax.rewards import mig
from migjax.rewards import watermark as wm_lib
from migjax.rewards.segment import DELIMITERS, segment_completions
from migjax.rewards.stage import MigRules, score_steps

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_STEP_RE = re.compile(r"^Step \d+:")


class RecordError(ValueError):
    """A malformed input record; the message names where it is and which field is wrong."""


@dataclasses.dataclass(frozen=True)
class CreditOptions:
    """How traces are rendered, segmented and scored (defaults: configs/base.py)."""

    probe: str = "\n</think>\n<answer>"  # mig.probe
    max_steps: int | None = None  # K; None: the most steps of any record (nothing merges)
    delimiter: str = "step"  # mig.step_delimiter
    variant_reduce: str = "max"  # mig.variant_reduce
    count_closing_tokens: bool = False  # mig.count_closing_tokens
    h0: str = "l0"  # mig.h0
    watermark: bool = True  # mig.watermark
    likelihood_space: str = "log"  # mig.likelihood_space: h and g over l (log) or exp(l) (prob)
    template: str = "{question}"  # task.template
    use_chat_template: bool = True  # task.use_chat_template
    system_prompt: str | None = None  # task.system_prompt
    batch_size: int = 8  # records per forward (the last batch is padded)
    dtype: str = "float32"  # model.dtype
    chunk: int = 256  # rl.score_chunk
    naive: bool = False  # the one-forward-per-prefix reference path instead of the fast one
    tokenizer_path: str | None = None  # defaults to the model directory


def check_record(rec: Any, where: str) -> tuple[str, list[str], list[str]]:
    """(question, steps, answers) of one input record; RecordError names `where` and the field."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: record is a JSON {type(rec).__name__}, expected an object")
    for field in ("question", "steps", "answer"):
        if field not in rec:
            raise RecordError(f"{where}: field {field!r} is missing")
    q = rec["question"]
    if not isinstance(q, str) or not q.strip():
        raise RecordError(f"{where}: field 'question' must be a non-empty string, got {q!r}")
    steps = rec["steps"]
    if not isinstance(steps, list) or not steps:
        raise RecordError(f"{where}: field 'steps' must be a non-empty list of strings, "
                          f"got {steps!r}")
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            raise RecordError(f"{where}: field 'steps'[{i}] must be a non-empty string, got {s!r}")
        if THINK_OPEN in s or THINK_CLOSE in s:
            raise RecordError(f"{where}: field 'steps'[{i}] contains {THINK_OPEN} or "
                              f"{THINK_CLOSE}: {s!r}")
    ans = rec["answer"]
    answers = [ans] if isinstance(ans, str) else ans
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise RecordError(f"{where}: field 'answer' must be a non-empty string or a non-empty "
                          f"list of them, got {ans!r}")
    return q, list(steps), list(answers)


def read_records(path: str, *, skip_bad: bool = False) -> tuple[list[tuple[str, int, dict]],
                                                                 list[str]]:
    """([(where, line, record)], errors) of a JSONL file; blank lines are ignored. Without
    `skip_bad` the first malformed line raises RecordError; with it, it is listed in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file does not exist")
    good, bad = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: not valid JSON ({e})") from None
                check_record(rec, where)
            except RecordError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            good.append((where, n, rec))
    return good, bad


def _scored_steps(steps: list[str], delimiter: str) -> list[str]:
    if delimiter != "step":
        return list(steps)
    return [s if _STEP_RE.match(s) else f"Step {k}: {s}" for k, s in enumerate(steps, start=1)]


def completion_text(steps: list[str], answer: str, delimiter: str = "step") -> str:
    """The CoT completion of `steps` and `answer` in the format of METHOD.md."""
    joiner = "\n\n" if delimiter == "blank_line" else "\n"
    body = joiner.join(_scored_steps(steps, delimiter))
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n<answer>{answer}</answer>"


def _merge_capped(steps: list[str], k: int, delimiter: str) -> list[str]:
    joiner = "\n\n" if delimiter == "blank_line" else "\n"
    return steps if len(steps) <= k else steps[:k - 1] + [joiner.join(steps[k - 1:])]


def _pad_rows(rows: list[list[int]], width: int, pad: int, left: bool):
    out = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, sl], mask[i, sl] = r, True
    return out, mask


def _encode(items, tokenizer, opts: CreditOptions, skip_bad: bool, bad: list[str]):
    """Tokenised prompts, completions and answer variants of the records that encode."""
    ids = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
    out = []
    for where, line, rec in items:
        try:
            q, steps, answers = check_record(rec, where)
            prompt = render_prompt(q, tokenizer, template=opts.template,
                                   use_chat_template=opts.use_chat_template,
                                   system_prompt=opts.system_prompt)
            ans_ids = [ids(a) for a in answers]
            for a, t in zip(answers, ans_ids, strict=True):
                if not t:
                    raise RecordError(f"{where}: field 'answer' {a!r} encodes to no tokens")
            scored = _scored_steps(steps, opts.delimiter)
            out.append(dict(where=where, line=line, question=q, steps=scored, answer=rec["answer"],
                            prompt=ids(prompt),
                            completion=ids(completion_text(steps, answers[0], opts.delimiter)),
                            answers=ans_ids))
        except RecordError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    return out


def _segment(enc: list[dict], strings: list[str], k: int, opts: CreditOptions, pad: int,
             skip_bad: bool, bad: list[str]):
    """Segments every completion with the training code; drops (or raises on) records whose
    steps do not come out as written."""
    c = max(len(e["completion"]) for e in enc)
    tokens_NxC, mask_NxC = _pad_rows([e["completion"] for e in enc], c, pad, left=False)
    seg = segment_completions(tokens_NxC, mask_NxC, strings, max_steps=k,
                              delimiter=opts.delimiter)
    # Uncapped (one past the most declared steps), to see extra steps the cap would hide.
    uncapped = segment_completions(tokens_NxC, mask_NxC, strings, delimiter=opts.delimiter,
                                   max_steps=max(len(e["steps"]) for e in enc) + 1)
    keep = []
    for i, e in enumerate(enc):
        want = len(e["steps"])
        got = int(uncapped.num_steps_N[i])
        if got != want:
            err = RecordError(
                f"{e['where']}: field 'steps': the completion segments into {got} step(s) with "
                f"delimiter {opts.delimiter!r}, expected {want} (does a step hold a line "
                f"starting 'Step <n>:', a newline or a blank line?)")
            if not skip_bad:
                raise err
            bad.append(str(err))
            continue
        e["cuts"] = seg.cuts_NxK1[i]
        e["step_mask"] = seg.step_mask_NxK[i]
        keep.append(e)
    return keep


def _arrays(batch: list[dict], widths: dict[str, int], pad: int):
    p, c, nv, a = widths["P"], widths["C"], widths["V"], widths["A"]
    prompt, prompt_mask = _pad_rows([e["prompt"] for e in batch], p, pad, left=True)
    tokens, mask = _pad_rows([e["completion"] for e in batch], c, pad, left=False)
    ans = np.full((len(batch), nv, a), pad, np.int32)
    ans_mask = np.zeros((len(batch), nv, a), bool)
    for i, e in enumerate(batch):
        for v, t in enumerate(e["answers"]):
            ans[i, v, :len(t)], ans_mask[i, v, :len(t)] = t, True
    cuts = np.stack([e["cuts"] for e in batch])
    return [jnp.asarray(x) for x in (prompt, prompt_mask, tokens, mask, cuts)], ans, ans_mask


def _check_options(opts: CreditOptions) -> None:
    if opts.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {opts.batch_size}")
    if opts.max_steps is not None and opts.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {opts.max_steps}")
    for name, value, allowed in (("delimiter", opts.delimiter, DELIMITERS),
                                 ("variant_reduce", opts.variant_reduce, mig.VARIANT_REDUCTIONS),
                                 ("h0", opts.h0, wm_lib.H0_MODES),
                                 ("likelihood_space", opts.likelihood_space, ("log", "prob"))):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}; expected one of {allowed}")
    check_template(opts.template)


def _load(model_dir: str, opts: CreditOptions):
    """(graphdef, params, model config, tokenizer, probe_Q) of a model directory."""
    model, cfg = load_pretrained(model_dir, dtype=opts.dtype)
    tok_dir = opts.tokenizer_path or model_dir
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer at {tok_dir} has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    probe_Q = jnp.asarray(tokenizer(opts.probe, add_special_tokens=False)["input_ids"], jnp.int32)
    if probe_Q.shape[0] == 0:
        raise ValueError(f"probe {opts.probe!r} encodes to no tokens")
    graphdef, params = split(model)
    return graphdef, params, cfg, tokenizer, probe_Q


def _score_batch(graphdef, params, batch: list[dict], widths: dict, pad: int, probe_Q,
                 rules: MigRules, opts: CreditOptions):
    """(l_NxK1, watermark) of one padded batch of encoded records."""
    arrs, ans, ans_mask = _arrays(batch, widths, pad)
    args = (*arrs, probe_Q, jnp.asarray(ans), jnp.asarray(ans_mask))
    if rules.fast:
        l_NxK1 = score_steps(graphdef, params, *args, rules=rules)
    else:
        l_NxK1 = mig.step_likelihoods_naive(
            merge(graphdef, params), *args, variant_reduce=rules.variant_reduce,
            count_closing_tokens=rules.count_closing_tokens)
    l_NxK1 = np.asarray(l_NxK1, np.float32)
    space = l_NxK1 if opts.likelihood_space == "log" else np.exp(l_NxK1)
    step_mask = np.stack([e["step_mask"] for e in batch])
    return l_NxK1, wm_lib.watermark(space, step_mask, h0=opts.h0, monotonic=opts.watermark)


def score_items(model_dir: str, items: list[tuple[str, int, dict]], opts: CreditOptions, *,
                skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """(results, errors) for [(where, line, record)]; see the module docstring for the fields."""
    _check_options(opts)
    graphdef, params, cfg, tokenizer, probe_Q = _load(model_dir, opts)
    pad = int(tokenizer.pad_token_id)
    bad: list[str] = []
    enc = _encode(items, tokenizer, opts, skip_bad, bad)
    if not enc:
        return [], bad
    k = opts.max_steps or max(len(e["steps"]) for e in enc)
    enc = _segment(enc, token_strings(tokenizer, size=cfg.vocab_size), k, opts, pad, skip_bad,
                   bad)
    if not enc:
        return [], bad
    # One static shape for every batch: a single compilation.
    widths = dict(P=max(len(e["prompt"]) for e in enc),
                  C=max(len(e["completion"]) for e in enc),
                  V=max(len(e["answers"]) for e in enc),
                  A=max(len(t) for e in enc for t in e["answers"]))
    rules = MigRules(max_steps=k, delimiter=opts.delimiter, variant_reduce=opts.variant_reduce,
                     count_closing_tokens=opts.count_closing_tokens, chunk=opts.chunk,
                     fast=not opts.naive)
    results, bs = [], opts.batch_size
    for start in range(0, len(enc), bs):
        real = enc[start:start + bs]
        batch = real + [real[-1]] * (bs - len(real))  # the last batch is padded with a copy
        l_NxK1, wm = _score_batch(graphdef, params, batch, widths, pad, probe_Q, rules, opts)
        h_NxK1, g_NxK = np.asarray(wm.h_NxK1), np.asarray(wm.g_NxK)
        gains_N = np.asarray(wm_lib.gain_sum(wm))
        for i, e in enumerate(real):
            ki = int(e["step_mask"].sum())
            results.append(dict(
                line=e["line"], question=e["question"],
                steps=_merge_capped(e["steps"], k, opts.delimiter), answer=e["answer"],
                num_steps=ki, l=[float(x) for x in l_NxK1[i, :ki + 1]],
                h=[float(x) for x in h_NxK1[i, :ki + 1]], g=[float(x) for x in g_NxK[i, :ki]],
                gain_sum=float(gains_N[i])))
    return results, bad


def compute_credit(model_dir: str, records: list[dict], **opts) -> list[dict]:
    """Credit of every record (dicts as in the input file), in order; `opts` are the fields of
    `CreditOptions`. A malformed record raises RecordError naming its index and field."""
    options = CreditOptions(**opts)
    items = [(f"record {i}", i, rec) for i, rec in enumerate(records)]
    for where, _, rec in items:
        check_record(rec, where)
    results, _ = score_items(model_dir, items, options)
    return results


def _parser() -> argparse.ArgumentParser:
    d = CreditOptions()
    p = argparse.ArgumentParser(prog="python -m migjax.credit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", required=True, help="input JSONL: question, steps, answer")
    p.add_argument("--out", required=True, help="output JSONL, one line per scored record")
    p.add_argument("--html", help="also write an HTML page of the steps coloured by g_k")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--probe", default=d.probe)
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="K; later steps merge into the last (default: the most in the data)")
    p.add_argument("--delimiter", choices=DELIMITERS, default=d.delimiter)
    p.add_argument("--variant-reduce", choices=mig.VARIANT_REDUCTIONS, default=d.variant_reduce)
    p.add_argument("--count-closing-tokens", action="store_true")
    p.add_argument("--h0", choices=wm_lib.H0_MODES, default=d.h0)
    p.add_argument("--no-watermark", action="store_true", help="g_k = l_k - l_{k-1}")
    p.add_argument("--likelihood-space", choices=("log", "prob"), default=d.likelihood_space)
    p.add_argument("--template", default=d.template)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction,
                   default=d.use_chat_template)
    p.add_argument("--system-prompt", default=d.system_prompt)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--chunk", type=int, default=d.chunk)
    p.add_argument("--naive", action="store_true", help="one forward per prefix (reference)")
    p.add_argument("--skip-bad", action="store_true",
                   help="count, report and skip malformed records instead of stopping")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    opts = CreditOptions(
        probe=a.probe, max_steps=a.max_steps, delimiter=a.delimiter,
        variant_reduce=a.variant_reduce, count_closing_tokens=a.count_closing_tokens, h0=a.h0,
        watermark=not a.no_watermark, likelihood_space=a.likelihood_space, template=a.template,
        use_chat_template=a.chat_template, system_prompt=a.system_prompt,
        batch_size=a.batch_size, dtype=a.dtype, chunk=a.chunk, naive=a.naive,
        tokenizer_path=a.tokenizer)
    try:
        items, bad = read_records(a.data, skip_bad=a.skip_bad)
        results, bad_later = score_items(a.model, items, opts, skip_bad=a.skip_bad)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad += bad_later
    from migjax.checkpointing import atomic_write_text
    from migjax.viz import credit_html, write_html

    atomic_write_text(a.out, "".join(json.dumps(r) + "\n" for r in results))
    if a.html:
        shown = [dict(r, answer=" | ".join(r["answer"]) if isinstance(r["answer"], list)
                      else r["answer"]) for r in results]
        write_html(a.html, credit_html(shown, title=f"Step credit: {a.data}"))
    for msg in bad:
        print(f"skipped: {msg}", file=sys.stderr)
    print(f"scored {len(results)} record(s), skipped {len(bad)} malformed; wrote {a.out}",
          file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
