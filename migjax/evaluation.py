"""Held-out evaluation: greedy pass@1 and sampled pass@k over an encoded example set."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from migjax.data.pipeline import EncodedExamples
from migjax.rewards.answers import extract_answer
from migjax.rewards.verify import Verifier
from migjax.rollout import SamplingRules, sample


def evaluate(graphdef, params, data: EncodedExamples, tokenizer, verifier: Verifier, *,
             rules: SamplingRules, batch_size: int, k: int, key, put=jnp.asarray,
             fetch=np.asarray, max_examples: int | None = None, images=None):
    """{"pass_at_1": greedy accuracy, "pass_at_k": any of k samples correct, "mean_at_k": the fraction
    of the k samples that are correct (the sampling policy's own accuracy), each with its
    standard error `<key>_se`, and "n": the problems} and example rows.

    Batches have a fixed size (the last is padded by wrapping around) so nothing recompiles.
    `put` places a host batch (the same numpy array on every process) on the devices and
    `fetch` brings a sampled array back whole (across processes, in a multi-process run).
    `images(idx)` gives the image features of rows `idx` of an image task (None: text).
    """
    n = min(len(data), max_examples or len(data))
    greedy = dataclasses.replace(rules, greedy=True)
    hits1, hitsk, meank, rows = [], [], [], []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        toks, mask = put(data.tokens_ExP[idx]), put(data.mask_ExP[idx])
        real = min(batch_size, n - start)
        img = None if images is None else images(idx)
        r1 = sample(graphdef, params, toks, mask, key, rules=greedy, group_size=1, images=img)
        texts1 = completion_texts(tokenizer, r1, fetch)
        ok1 = [_correct(verifier, t, data.answers[i]) for t, i in zip(texts1, idx, strict=True)]
        hits1 += ok1[:real]
        if k > 0:
            rk = sample(graphdef, params, toks, mask, jax.random.fold_in(key, start), rules=rules,
                        group_size=k, images=img)
            okk = [_correct(verifier, t, data.answers[idx[j // k]])
                   for j, t in enumerate(completion_texts(tokenizer, rk, fetch))]
            hitsk += [any(okk[i * k:(i + 1) * k]) for i in range(real)]
            meank += [float(np.mean(okk[i * k:(i + 1) * k])) for i in range(real)]
        if start == 0:
            rows = [dict(prompt=data.questions[i], completion=t, correct=bool(o),
                         reference=data.answers[i][0] if data.answers[i] else "",
                         prediction=extract_answer(t), **data.image_of(i))
                    for i, t, o in zip(idx[:real], texts1, ok1, strict=False)]
    out = {"pass_at_1": float(np.mean(hits1)) if hits1 else 0.0}
    if k > 0:
        out[f"pass_at_{k}"] = float(np.mean(hitsk)) if hitsk else 0.0
        out[f"mean_at_{k}"] = float(np.mean(meank)) if meank else 0.0
    return with_standard_errors(out, n), rows


def with_standard_errors(rates: dict[str, float], n: int) -> dict[str, float]:
    """`rates` with `<key>_se` = sqrt(p (1 - p) / n) beside each and `n` (problems). For
    pass@k this is the binomial standard error over problems; for mean@k, each problem's
    fraction of correct samples varies at most as much as one Bernoulli draw, so it is an upper
    bound."""
    out = dict(rates)
    for key, p in rates.items():
        out[f"{key}_se"] = float(np.sqrt(p * (1.0 - p) / n)) if n else float("nan")
    out["n"] = float(n)
    return out


def completion_texts(tokenizer, rollout, fetch=np.asarray) -> list[str]:
    """The decoded completions of a rollout (special tokens dropped), one per sample."""
    toks, mask = np.asarray(fetch(rollout.tokens_NxC)), np.asarray(fetch(rollout.mask_NxC), bool)
    return [tokenizer.decode(t[m], skip_special_tokens=True) for t, m in zip(toks, mask, strict=True)]


def _correct(verifier: Verifier, text: str, refs) -> bool:
    return verifier.verify(extract_answer(text), list(refs))
