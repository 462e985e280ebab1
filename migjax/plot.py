"""Learning curves from one or more runs' metrics.jsonl, drawn to a PNG.

    python -m migjax.plot RUN_DIR [RUN_DIR ...] [--out curves.png] [--keys k1,k2]

One subplot per metric key, one line per run (labelled by its directory name). Keys that
no run logged are skipped. The default output is RUN_DIR/curves.png for a single run
and ./curves.png for several.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from migjax.metrics import METRICS_FILE, read_metrics

DEFAULT_KEYS = (
    "reward/correct",
    "eval/pass_at_1",
    "mig/gain_sum",
    "mig/lK",
    "policy/entropy",
    "loss/total",
)

Curve = tuple[str, list[int], list[float]]  # (run label, steps, values)


def run_labels(dirs: Sequence[str]) -> list[str]:
    """Directory names as labels; the full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(d) for d in dirs]


def collect_curves(dirs: Sequence[str], keys: Sequence[str] | None = None
                   ) -> dict[str, list[Curve]]:
    """{key: [(label, steps, values), ...]} for the keys at least one run logged, in key order.

    Raises FileNotFoundError naming the first directory without a metrics.jsonl.
    """
    for d in dirs:
        if not os.path.isfile(os.path.join(d, METRICS_FILE)):
            raise FileNotFoundError(f"no {METRICS_FILE} in run directory {d}")
    runs = [(label, read_metrics(d)) for label, d in zip(run_labels(dirs), dirs, strict=True)]
    keys = list(DEFAULT_KEYS if keys is None else keys)
    curves: dict[str, list[Curve]] = {}
    for key in keys:
        for label, records in runs:
            points = [(int(r["step"]), float(r[key])) for r in records if key in r]
            if points:
                points.sort(key=lambda p: p[0])
                steps, values = zip(*points, strict=True)
                curves.setdefault(key, []).append((label, list(steps), list(values)))
    return curves


def plot_runs(dirs: Sequence[str], out: str | None = None,
              keys: Sequence[str] | None = None) -> str:
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
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, runs) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, steps, values in runs:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(dirs) > 1:
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
    parser.add_argument("--keys", default=None, help="comma-separated metric keys")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_runs(args.dirs, args.out, keys)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
