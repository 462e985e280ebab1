"""How well step credit finds a wrong step: reference GSM8K solutions, each also with one step
corrupted, scored by a model's step-conditioned answer likelihoods (`migjax.credit`).

    python -m experiments.credit_study --model DIR --out experiments/results/credit_study/NAME \
        [--n 300] [--seed 0]

For each of the first `--n` GSM8K test problems whose solution has at least two lines with an
`= number` result, the reference solution's lines are the steps (`migjax.data.demos`). A copy
gets one corrupted step (chosen at random): the number after its last `=` is changed, so the
step's arithmetic is wrong, and the error propagates: later steps that used that number use the
wrong one. The reference answer stays the right one. Every trace is scored with the reward
stage's segmentation and probe pass, giving l_0..l_K and, with the watermark, g_1..g_K.

Reported (results.json, results.md, credit_study.png in --out):
- AUROC of "this step is the corrupted one" among the steps of the corrupted traces, for three
  credit signals, low credit meaning suspect: the MIG gain g_k, the raw difference
  l_k - l_{k-1} (no watermark) and position-based credit (k / K, rising towards the answer).
- Spearman correlation, over every step of the clean and corrupted traces, between each signal
  and a step-value label: 1 when the prefix through the step is still on a correct path (every
  step of a clean trace, the steps before the corruption), 0 from the corrupted step on.
- How l_K - l_0 separates clean from corrupted traces (AUROC, means).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import numpy as np

from migjax.data import demos
from migjax.data.sources import load_examples
from migjax.data.templates import DEFAULT_TEMPLATE

_RESULT = re.compile(r"=\s*\$?(-?\d+(?:\.\d+)?)")
# "a op b ... = c": the arithmetic left of the last "=" and its stated result
_CALC = re.compile(r"((?:\d+(?:\.\d+)?|[\s+\-*/x×()])+?)\s*=\s*\$?(-?\d+(?:\.\d+)?)")
_NUM = r"(?<![\d.]){}(?![\d])"
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                            "shared", "data", "gsm8k", "test.jsonl")


def _fmt(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.6g}"


def _evaluate(expr: str) -> float | None:
    expr = expr.replace("x", "*").replace("×", "*").strip()
    if not expr or not re.fullmatch(r"[\d.\s+\-*/()]+", expr) or not re.search(r"[+\-*/]", expr):
        return None
    try:
        with warnings.catch_warnings():  # "2 (3)" compiles to a call: a warning, then TypeError
            warnings.simplefilter("ignore", SyntaxWarning)
            return float(eval(expr, {"__builtins__": {}}, {}))  # digits and operators only
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None


def corrupt(steps: list[str], rng: np.random.Generator) -> tuple[list[str], int] | None:
    """(steps with one wrong result, its index), or None when no step has an `= number`.

    The number after the chosen step's last `=` is changed (its arithmetic is now wrong). Later
    steps use the wrong value wherever they used the right one, and a later `a op b = c` whose
    operands changed gets its result recomputed, so the error propagates to the end."""
    candidates = [i for i, s in enumerate(steps) if _RESULT.search(s)]
    if not candidates:
        return None
    j = int(rng.choice(candidates))
    m = list(_RESULT.finditer(steps[j]))[-1]
    old = m.group(1)
    new = _fmt(float(old) + int(rng.choice([-3, -2, -1, 1, 2, 3, 5, 10])))
    out = list(steps)
    out[j] = steps[j][: m.start(1)] + new + steps[j][m.end(1):]
    changed = {old: new}
    for i in range(j + 1, len(steps)):
        s = steps[i]
        for a, b in changed.items():
            s = re.sub(_NUM.format(re.escape(a)), b, s)
        calcs = list(_CALC.finditer(s))
        if calcs and s != steps[i]:
            c = calcs[-1]
            value = _evaluate(c.group(1))
            if value is not None and _fmt(value) != c.group(2):
                changed[c.group(2)] = _fmt(value)
                s = s[: c.start(2)] + _fmt(value) + s[c.end(2):]
        out[i] = s
    return out, j


def build_traces(path: str, n: int, seed: int) -> list[dict]:
    """Clean and corrupted traces of the first `n` usable problems (pairs share an id)."""
    rng = np.random.default_rng(seed)
    records, _ = load_examples("gsm8k", path)
    traces = []
    for e in records:
        if len(traces) // 2 >= n:
            break
        steps, answer = demos.gsm8k_steps(e.solution)
        steps = [re.sub(r"(?<=\d),(?=\d{3})", "", " ".join(s.split())) for s in steps]
        if len(steps) < 2:
            continue
        bad = corrupt(steps, rng)
        if bad is None:
            continue
        base = dict(id=e.id, question=e.question, answer=e.answers[0])
        traces.append(dict(base, steps=steps, corrupted=-1))
        traces.append(dict(base, steps=bad[0], corrupted=bad[1]))
    return traces


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 1-based."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    positive = positive.astype(bool)
    n1, n0 = positive.sum(), (~positive).sum()
    if not n1 or not n0:
        return float("nan")
    r = ranks(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def step_table(traces: list[dict], scored: list[dict]) -> dict[str, np.ndarray]:
    """One row per step of every trace: its signals and labels."""
    rows = {k: [] for k in ("gain", "diff", "position", "is_bad", "on_path", "corrupted_trace")}
    for t, s in zip(traces, scored, strict=True):
        k_n, l, g = s["num_steps"], np.asarray(s["l"]), np.asarray(s["g"])
        for k in range(1, k_n + 1):
            rows["gain"].append(g[k - 1])
            rows["diff"].append(l[k] - l[k - 1])
            rows["position"].append(k / k_n)
            bad = t["corrupted"]
            rows["is_bad"].append(bad == k - 1)
            rows["on_path"].append(bad < 0 or k - 1 < bad)
            rows["corrupted_trace"].append(bad >= 0)
    return {k: np.asarray(v, float) for k, v in rows.items()}


def analyse(traces: list[dict], scored: list[dict]) -> dict:
    tab = step_table(traces, scored)
    in_bad = tab["corrupted_trace"] > 0
    out = {"problems": len(traces) // 2, "steps": int(len(tab["gain"])), "auroc_corrupted_step": {},
           "spearman_step_value": {}}
    for name in ("gain", "diff", "position"):
        out["auroc_corrupted_step"][name] = auroc(-tab[name][in_bad], tab["is_bad"][in_bad])
        out["spearman_step_value"][name] = spearman(tab[name], tab["on_path"])
    rise = np.array([s["l"][s["num_steps"]] - s["l"][0] for s in scored])
    clean = np.array([t["corrupted"] < 0 for t in traces])
    out["lK_minus_l0"] = {"clean_mean": float(rise[clean].mean()),
                          "corrupted_mean": float(rise[~clean].mean()),
                          "auroc_clean_vs_corrupted": auroc(rise, clean),
                          "paired_clean_higher_frac": float(np.mean(rise[0::2] > rise[1::2]))}
    out["lK_clean_minus_corrupted"] = float(np.mean(
        [a["l"][a["num_steps"]] - b["l"][b["num_steps"]] for a, b in zip(scored[0::2],
                                                                       scored[1::2],
                                                                       strict=True)]))
    return out


def plot(traces, scored, res, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rise = np.array([s["l"][s["num_steps"]] - s["l"][0] for s in scored])
    clean = np.array([t["corrupted"] < 0 for t in traces])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    bins = np.linspace(rise.min(), rise.max(), 30)
    axes[0].hist(rise[clean], bins, alpha=0.6, label="clean")
    axes[0].hist(rise[~clean], bins, alpha=0.6, label="one step corrupted")
    axes[0].set_xlabel("l_K - l_0")
    axes[0].legend(fontsize=8)
    names = ["gain", "diff", "position"]
    labels = ["MIG gain g_k", "l_k - l_{k-1}", "position k/K"]
    x = np.arange(3)
    axes[1].bar(x - 0.2, [res["auroc_corrupted_step"][n] for n in names], 0.4,
                label="AUROC: corrupted step")
    axes[1].bar(x + 0.2, [res["spearman_step_value"][n] for n in names], 0.4,
                label="Spearman: step value")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_xticks(x, labels, fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=DEFAULT_DATA, help="GSM8K test JSONL")
    p.add_argument("--n", type=int, default=300, help="problems (each clean and corrupted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", default="{question}",
                   help='task.template; "default": the RL recipes\' step-format instruction')
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--name", default="", help="the model's name in the report")
    a = p.parse_args(argv)
    from migjax.credit import compute_credit

    traces = build_traces(a.data, a.n, a.seed)
    records = [dict(question=t["question"], steps=t["steps"], answer=t["answer"])
               for t in traces]
    template = DEFAULT_TEMPLATE if a.template == "default" else a.template
    scored = compute_credit(a.model, records, batch_size=a.batch_size, template=template,
                            use_chat_template=not a.no_chat_template)
    res = analyse(traces, scored)
    res.update(model=a.model, name=a.name or os.path.basename(os.path.normpath(a.model)),
               command=" ".join(["python -m experiments.credit_study", *(argv or sys.argv[1:])]))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "traces.jsonl"), "w", encoding="utf-8") as f:
        for t, s in zip(traces, scored, strict=True):
            f.write(json.dumps({**t, "l": s["l"], "g": s["g"]}) + "\n")
    plot(traces, scored, res, os.path.join(a.out, "credit_study.png"), res["name"])
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
