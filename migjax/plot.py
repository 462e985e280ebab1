"""Learning curves from one or more runs' metrics.jsonl, drawn to a PNG.

    python -m migjax.plot RUN_DIR [RUN_DIR ...] [--out curves.png] [--keys k1,k2] [--smooth N]

One panel per metric key or pattern (`eval/*/pass_at_1` matches every evaluation set), one line
per run and matching key. Evaluation curves are points with a band of one binomial standard
error (`<key>_se`); training curves are drawn faintly as logged and solidly as a moving average
of `--smooth` logged steps. The title names each run (its directory) and its variant (the
`:variant` of the command line in RUN_DIR/config.json). Keys that no run logged are skipped.
The default output is RUN_DIR/curves.png for a single run and ./curves.png for several.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from migjax.metrics import METRICS_FILE, is_rate, read_metrics

DEFAULT_KEYS = (
    "eval/*/pass_at_1",
    "eval/*/mean_at_*",
    "reward/correct",
    "reward/format",
    "rollout/len",
    "mig/gain_sum",
)
TITLES = {
    "eval/*/pass_at_1": "evaluation: greedy pass@1 (band: 1 s.e.)",
    "eval/*/mean_at_*": "evaluation: sampled mean@k (band: 1 s.e.)",
    "reward/correct": "training reward (correct)",
    "reward/format": "format rate",
    "rollout/len": "completion length (tokens)",
    "mig/gain_sum": "MIG gain per completion",
}
STYLES = ("-", "--", ":", "-.")
SMOOTH = 10  # logged steps in the moving average of training curves


class Curve(NamedTuple):
    label: str  # run, and the matched key where the panel is a pattern
    steps: list[int]
    values: list[float]
    se: list[float] | None  # evaluation curves: one standard error per point
    run: int = 0  # index of the run: its colour in every panel
    part: int = 0  # index of the matched key among the run's: its line style


def run_labels(dirs: Sequence[str]) -> list[str]:
    """Directory names as labels; the full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(d) for d in dirs]


def run_variant(run_dir: str) -> str | None:
    """The config variant a run was started with (`--config=FILE:VARIANT` in the command line
    config.json records; the recipes' default `mig` without one), or None when unknown."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            command = json.load(f).get("provenance", {}).get("command", [])
    except (OSError, ValueError, AttributeError):
        return None
    specs = [a.split("=", 1)[1] for a in command if str(a).startswith("--config=")]
    if not specs:
        return None
    return specs[-1].partition(":")[2] or "mig"


def _matches(pattern: str, records: list[dict]) -> list[str]:
    keys = {k for r in records for k in r}
    if "*" not in pattern and "?" not in pattern and "[" not in pattern:
        return [pattern] if pattern in keys else []
    return sorted(k for k in keys if fnmatch.fnmatchcase(k, pattern)
                  and (not k.startswith("eval/") or is_rate(k)))


def _matched_part(pattern: str, key: str) -> str:
    """What a pattern's wildcards matched in `key` (`eval/*/pass_at_1`, `eval/ood/pass_at_1`:
    `ood`); "" for a plain key."""
    if key == pattern:
        return ""
    p, k = pattern.split("/"), key.split("/")
    if len(p) != len(k):
        return key
    return " ".join(b for a, b in zip(p, k, strict=True) if a != b)


def _se(record: dict, key: str) -> float:
    if f"{key}_se" in record:
        return float(record[f"{key}_se"])
    n = record.get(key.rsplit("/", 1)[0] + "/n")
    p = float(record[key])
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def collect_curves(dirs: Sequence[str], keys: Sequence[str] | None = None
                   ) -> dict[str, list[Curve]]:
    """{key or pattern: [Curve, ...]} for those at least one run logged, in key order.

    Raises FileNotFoundError naming the first directory without a metrics.jsonl.
    """
    for d in dirs:
        if not os.path.isfile(os.path.join(d, METRICS_FILE)):
            raise FileNotFoundError(f"no {METRICS_FILE} in run directory {d}")
    runs = [(label, read_metrics(d)) for label, d in zip(run_labels(dirs), dirs, strict=True)]
    curves: dict[str, list[Curve]] = {}
    for pattern in DEFAULT_KEYS if keys is None else keys:
        for r_i, (label, records) in enumerate(runs):
            for p_i, key in enumerate(_matches(pattern, records)):
                rows = sorted((int(r["step"]), i) for i, r in enumerate(records) if key in r)
                steps = [s for s, _ in rows]
                values = [float(records[i][key]) for _, i in rows]
                se = [_se(records[i], key) for _, i in rows] if key.startswith("eval/") \
                    else None
                part = _matched_part(pattern, key)
                name = label if not part else part if len(runs) == 1 else f"{label}: {part}"
                curves.setdefault(pattern, []).append(
                    Curve(name, steps, values, se, run=r_i, part=p_i))
    return curves


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The trailing mean of the last `window` values at each point, NaNs ignored."""
    x = np.asarray(values, float)
    if window <= 1:
        return x
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        w = x[max(0, i - window + 1):i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def _title(dirs: Sequence[str]) -> str:
    parts = []
    for label, d in zip(run_labels(dirs), dirs, strict=True):
        variant = run_variant(d)
        parts.append(f"{label} [{variant}]" if variant else label)
    return " vs ".join(parts)


def plot_runs(dirs: Sequence[str], out: str | None = None,
              keys: Sequence[str] | None = None, smooth: int = SMOOTH) -> str:
    """Draws the learning curves of `dirs` to the PNG `out`; returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dirs = [os.fspath(d) for d in dirs]
    if not dirs:
        raise ValueError("plot_runs needs at least one run directory")
    curves = collect_curves(dirs, keys)
    if not curves:
        wanted = ", ".join(DEFAULT_KEYS if keys is None else keys)
        raise ValueError(f"none of the keys [{wanted}] is logged in {', '.join(dirs)}")
    if out is None:
        out = os.path.join(dirs[0], "curves.png") if len(dirs) == 1 else "curves.png"
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(_title(dirs), fontsize="medium")
    for i, (key, runs) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        several = len(dirs) > 1
        for j, c in enumerate(runs):
            # several runs: a colour per run, a line style per matched key (evaluation set)
            color = f"C{(c.run if several else j) % 10}"
            style = STYLES[c.part % len(STYLES)] if several else "-"
            steps, values = np.asarray(c.steps), np.asarray(c.values, float)
            if c.se is not None:
                se = np.asarray(c.se, float)
                ax.plot(steps, values, marker="o", ms=4, color=color, linestyle=style,
                        label=c.label)
                ax.fill_between(steps, values - se, values + se, color=color, alpha=0.2,
                                linewidth=0)
            elif smooth > 1 and len(steps) > smooth:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, label=c.label)
            else:
                ax.plot(steps, values, color=color, label=c.label,
                        marker="." if len(steps) < 40 else None)
        ax.set_title(TITLES.get(key, key), fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migjax.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output PNG path")
    parser.add_argument("--keys", default=None,
                        help="comma-separated metric keys or patterns (eval/*/pass_at_1)")
    parser.add_argument("--smooth", type=int, default=SMOOTH,
                        help="logged steps in the moving average of training curves (1: off)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_runs(args.dirs, args.out, keys, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
