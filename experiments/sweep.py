"""Ablation sweeps: runs a recipe under several variants and seeds, one workdir each, then
tabulates their summaries.

    python experiments/sweep.py --config configs/arith_tiny.py --variants mig,grpo,no_watermark \
        --seeds 0,1 --root runs/sweep [--set rl.steps=40] [--dry-run]

Runs are sequential subprocesses (each resumes if interrupted: rerun the same command). The table
(`ROOT/table.md`) lists pass@1 before/after per evaluation set, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict


def commands(config: str, variants: list[str], seeds: list[int], root: str, sets: list[str]):
    for v in variants:
        for s in seeds:
            workdir = os.path.join(root, f"{v}_seed{s}")
            cmd = [sys.executable, "-m", "migjax.main", f"--config={config}:{v}",
                   f"--workdir={workdir}", f"--config.seed={s}"]
            cmd += [f"--config.{kv}" for kv in sets]
            yield v, s, workdir, cmd


def table(root: str, runs: list[tuple[str, int, str]]) -> str:
    """Markdown table of mean pass@1 before/after over seeds, one row per variant."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys: set[str] = set()
    for v, _, workdir in runs:
        path = os.path.join(workdir, "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            summ = json.load(fh)
        for k, val in summ["after"].items():
            acc[v][k].append(val)
            acc[v][k + " (before)"].append(summ["before"].get(k, float("nan")))
            keys.add(k)
    cols = sorted(keys)
    lines = ["| variant | " + " | ".join(f"{k} before -> after" for k in cols) + " | runs |",
             "|---" * (len(cols) + 2) + "|"]
    for v, d in acc.items():
        cells = []
        for k in cols:
            b, a = d[k + " (before)"], d[k]
            cells.append(f"{sum(b) / len(b):.3f} -> {sum(a) / len(a):.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {len(d[cols[0]]) if cols else 0} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variants", default="mig,grpo")
    p.add_argument("--seeds", default="0")
    p.add_argument("--root", default="runs/sweep")
    p.add_argument("--set", action="append", default=[], help="extra override a.b=value")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    runs = []
    for v, s, workdir, cmd in commands(a.config, variants, seeds, a.root, a.set):
        print(" ".join(cmd), flush=True)
        runs.append((v, s, workdir))
        if not a.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                print(f"run {workdir} failed with exit code {rc}", file=sys.stderr)
                return rc
    if not a.dry_run:
        os.makedirs(a.root, exist_ok=True)
        text = table(a.root, runs)
        with open(os.path.join(a.root, "table.md"), "w") as fh:
            fh.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
