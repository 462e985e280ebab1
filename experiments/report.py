"""The report of a sweep: tables over seeds, paired comparisons with MIG, and learning curves.

    python -m experiments.report experiments/results/mig_vs_baselines [--with DIR ...]

Reads RESULTS/runs/<regime>/<variant>/seed<k>/{summary.json,metrics.jsonl} (what
`experiments.launch` copies there; `--with` adds the runs of another sweep, e.g. MIG's own points
beside its ablations) and writes RESULTS/results.md and RESULTS/*.png:

- per regime and variant: final held-out pass@1, pass@k and mean@k, mean +- standard error over
  seeds with the per-seed values, and wall time;
- sample efficiency: the RL steps (and samples) until the training accuracy, smoothed over
  `SMOOTH` steps, first reaches a fixed threshold (per regime: halfway from the start to the best
  variant's final value, and at least `MIN_RISE` above the start), per seed;
- MIG against each other variant: the mean paired difference over seeds (pairs share a seed,
  hence data order and evaluation noise), its standard error, the effect size d_z (mean
  difference over the standard deviation of the differences) and the exact two-sided sign-flip
  permutation p-value;
- learning curves (training accuracy and the share of all-wrong groups, smoothed; held-out
  pass@1 at each evaluation) with a band of +- one standard error over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

from migjax.metrics import is_rate

SMOOTH = 5  # steps in the moving average of training curves
MIN_RISE = 0.01  # the accuracy threshold lies at least this far above the start
BASE = "mig"


def load_runs(results: str) -> dict:
    """{(regime, variant): {seed: {"summary": ..., "metrics": [records]}}}."""
    runs: dict = defaultdict(dict)
    root = os.path.join(results, "runs")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist: no finished point of this sweep")
    for regime in sorted(os.listdir(root)):
        for variant in sorted(os.listdir(os.path.join(root, regime))):
            vdir = os.path.join(root, regime, variant)
            for sdir in sorted(os.listdir(vdir)):
                path = os.path.join(vdir, sdir)
                if not (sdir.startswith("seed") and os.path.isfile(
                        os.path.join(path, "summary.json"))):
                    continue
                with open(os.path.join(path, "summary.json"), encoding="utf-8") as f:
                    summary = json.load(f)
                with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as f:
                    metrics = [json.loads(line) for line in f if line.strip()]
                cfg_path = os.path.join(path, "config.json")
                cfg = {}
                if os.path.isfile(cfg_path):
                    with open(cfg_path, encoding="utf-8") as f:
                        cfg = json.load(f)
                runs[(regime, variant)][int(sdir[4:])] = {"summary": summary, "metrics": metrics,
                                                          "config": cfg}
    return dict(runs)


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(list(xs), float)
    if len(xs) == 0:
        return math.nan, math.nan
    se = xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return float(xs.mean()), float(se)


def paired(a: dict, b: dict) -> dict | None:
    """MIG (a) minus a baseline (b) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    sd = d.std(ddof=1)
    flips = np.array(list(itertools.product((1, -1), repeat=len(d))))
    null = np.abs((flips * d).mean(axis=1))
    p = float(np.mean(null >= abs(d.mean()) - 1e-12))
    return {"n": len(d), "diff": float(d.mean()), "se": float(sd / math.sqrt(len(d))),
            "dz": float(d.mean() / sd) if sd > 0 else math.nan, "p": p}


def train_curve(metrics: list[dict], key: str) -> np.ndarray:
    """The per-step values of a training metric (steps 1..S), smoothed by a trailing mean."""
    rows = sorted((r["step"], r[key]) for r in metrics if key in r and r["step"] > 0)
    x = np.array([v for _, v in rows], float)
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), SMOOTH)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def eval_curve(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = {}
    for r in metrics:
        if key in r:
            rows[r["step"]] = r[key]  # the final evaluation repeats the last step: keep one
    steps = sorted(rows)
    return steps, [rows[s] for s in steps]


def eval_keys(runs: dict) -> list[str]:
    keys = set()
    for seeds in runs.values():
        for run in seeds.values():
            keys |= {k for k in run["summary"]["after"] if is_rate(k)}
    metric = lambda m: (0 if m == "pass_at_1" else 1 if m.startswith("pass_at") else 2, m)
    order = lambda k: (k.split("/")[1] != "test", k.split("/")[1], metric(k.split("/")[2]))
    return sorted(keys, key=order)


def fmt(m: float, se: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} +- {se:.{digits}f}"


def steps_to(curve: np.ndarray, threshold: float) -> int | None:
    hit = np.flatnonzero(curve >= threshold)
    return int(hit[0]) + 1 if hit.size else None


def regime_tables(regime: str, variants: list[str], runs: dict, keys: list[str]) -> list[str]:
    out = [f"## Regime `{regime}`", ""]
    # final held-out figures
    out += ["| variant | seeds | " + " | ".join(k.removeprefix("eval/") for k in keys)
            + " | wall min |", "|---" * (len(keys) + 3) + "|"]
    first = next(iter(runs[(regime, variants[0])].values()))["summary"]["before"]
    out.append("| (start: greedy, seed 0) | | " + " | ".join(
        f"{first.get(k, math.nan):.3f}" for k in keys) + " | |")
    for v in variants:
        seeds = runs[(regime, v)]
        cells = [fmt(*mean_se(s["summary"]["after"][k] for s in seeds.values())) for k in keys]
        wall = mean_se(s["summary"]["wall_s"] / 60 for s in seeds.values())
        out.append(f"| {v} | {len(seeds)} | " + " | ".join(cells) + f" | {fmt(*wall, 1)} |")
    out += ["", "Per-seed values (seed: value) of the first two columns:", ""]
    for v in variants:
        seeds = runs[(regime, v)]
        per = "; ".join(
            f"{k.removeprefix('eval/')}: " + ", ".join(
                f"{s}: {run['summary']['after'][k]:.3f}" for s, run in sorted(seeds.items()))
            for k in keys[:2])
        out.append(f"- {v}: {per}")
    # sample efficiency on the training batches
    curves = {v: {s: train_curve(r["metrics"], "reward/correct") for s, r in runs[(regime, v)]
                  .items()} for v in variants}
    start = float(np.mean([c[0] for cs in curves.values() for c in cs.values() if len(c)]))
    best = max(np.mean([c[-1] for c in cs.values()]) for cs in curves.values())
    thr = start + max(0.5 * (best - start), MIN_RISE)
    rl = next(iter(runs[(regime, variants[0])].values()))["config"].get("rl", {})
    per_step = rl.get("batch_prompts", 0) * rl.get("group_size", 0)
    out += ["", f"Training accuracy (`reward/correct` of each step's fresh rollout batch, "
            f"{SMOOTH}-step trailing mean): start {start:.3f}, best final {best:.3f}; RL steps to "
            f"reach {thr:.3f} (halfway, at least {MIN_RISE} above the start), per seed (- = not reached; one step is {per_step} "
            "sampled completions):", "",
            "| variant | final train acc | all-wrong groups (first 5 / last 5 steps) | "
            "steps to threshold | reached |", "|---|---|---|---|---|"]
    for v in variants:
        cs = curves[v]
        final = mean_se(c[-1] for c in cs.values())
        hits = {s: steps_to(c, thr) for s, c in cs.items()}
        aw = [np.array([r["reward/all_wrong_group_frac"] for r in run["metrics"]
                        if "reward/all_wrong_group_frac" in r]) for run in runs[(regime, v)]
              .values()]
        aw_txt = (f"{np.mean([a[:5].mean() for a in aw]):.2f} / "
                  f"{np.mean([a[-5:].mean() for a in aw]):.2f}" if all(len(a) for a in aw)
                  else "-")
        steps_txt = ", ".join(f"{s}: {h if h is not None else '-'}" for s, h in
                              sorted(hits.items()))
        reached = sum(h is not None for h in hits.values())
        out.append(f"| {v} | {fmt(*final)} | {aw_txt} | {steps_txt} | {reached}/{len(hits)} |")
    # paired comparisons
    if (regime, BASE) in runs:
        out += ["", "MIG minus each variant, paired by seed (difference +- s.e., d_z, exact "
                "sign-flip p):", "",
                "| variant | " + " | ".join(k.removeprefix("eval/") for k in keys[:4])
                + " | final train acc |", "|---" * (min(len(keys), 4) + 2) + "|"]
        base = runs[(regime, BASE)]
        for v in variants:
            if v == BASE:
                continue
            cells = []
            for k in keys[:4]:
                r = paired({s: x["summary"]["after"][k] for s, x in base.items()},
                           {s: x["summary"]["after"][k] for s, x in runs[(regime, v)].items()})
                cells.append(_paired_text(r))
            r = paired({s: c[-1] for s, c in curves[BASE].items()},
                       {s: c[-1] for s, c in curves[v].items()})
            out.append(f"| {v} | " + " | ".join(cells) + f" | {_paired_text(r)} |")
    out.append("")
    return out


def _paired_text(r: dict | None) -> str:
    if r is None:
        return "-"
    dz = f", d_z {r['dz']:+.2f}" if math.isfinite(r["dz"]) else ""  # none when every seed ties
    return f"{r['diff']:+.3f} +- {r['se']:.3f}{dz}, p {r['p']:.2f} (n={r['n']})"


def plot(regime: str, variants: list[str], runs: dict, keys: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/correct", "training accuracy (smoothed)", "train"),
              ("reward/all_wrong_group_frac", "groups with no right answer (smoothed)", "train")]
    panels += [(k, k.removeprefix("eval/") + " (held out)", "eval") for k in keys[:2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, kind) in zip(axes, panels, strict=True):
        for v in variants:
            seeds = runs[(regime, v)].values()
            if kind == "train":
                cs = [train_curve(r["metrics"], key) for r in seeds]
                n = min(len(c) for c in cs)
                if n == 0:
                    continue
                ys = np.stack([c[:n] for c in cs])
                xs = np.arange(1, n + 1)
            else:
                pts = [eval_curve(r["metrics"], key) for r in seeds]
                common = sorted(set.intersection(*(set(s) for s, _ in pts)))
                if not common:
                    continue
                ys = np.array([[dict(zip(s, y, strict=True))[t] for t in common]
                               for s, y in pts])
                xs = np.array(common)
            m = ys.mean(0)
            se = ys.std(0, ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else np.zeros_like(m)
            (line,) = ax.plot(xs, m, label=v, lw=1.8 if v == BASE else 1.1,
                              marker="o" if kind == "eval" else None, ms=3)
            ax.fill_between(xs, m - se, m + se, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"regime {regime}: mean +- s.e. over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: str, extra: list[str] = (), extra_variants: list[str] = ()) -> str:
    """results.md of a sweep's folder; `extra` folders add their runs in this sweep's regimes
    (only of `extra_variants` when given), e.g. MIG's own points beside its ablations."""
    runs = load_runs(results)
    regimes = {r for r, _ in runs}
    for other in extra:
        for key, seeds in load_runs(other).items():
            if key[0] not in regimes or (extra_variants and key[1] not in extra_variants):
                continue
            runs.setdefault(key, {}).update({s: r for s, r in seeds.items()
                                             if s not in runs.get(key, {})})
    keys = eval_keys(runs)
    name = os.path.basename(os.path.normpath(results))
    lines = [f"# Sweep `{name}`", "",
             f"Generated by `python -m experiments.report {results}"
             + "".join(f" --with {e}" for e in extra)
             + (f" --variants {','.join(extra_variants)}" if extra_variants else "")
             + "` from the runs under `runs/`.", ""]
    for regime in sorted({r for r, _ in runs}):
        variants = sorted({v for r, v in runs if r == regime},
                          key=lambda v: (v != BASE, v))
        lines += regime_tables(regime, variants, runs, keys)
        png = f"curves_{regime}.png"
        plot(regime, variants, runs, keys, os.path.join(results, png))
        lines += [f"![{regime}]({png})", ""]
    text = "\n".join(lines)
    with open(os.path.join(results, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a sweep's results folder, e.g. experiments/results/NAME")
    p.add_argument("--with", dest="extra", action="append", default=[],
                   help="another sweep's results folder whose runs (in these regimes) join these")
    p.add_argument("--variants", default="",
                   help="comma-separated: take only these variants from the --with folders")
    a = p.parse_args(argv)
    print(report(a.results, a.extra, [v for v in a.variants.split(",") if v]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
