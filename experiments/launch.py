"""Runs a sweep file's points one after another, each in its own deterministic workdir, all points
of a regime from one shared warm start; skips finished points and resumes interrupted ones.

    python -m experiments.launch experiments/sweeps/mig_vs_baselines.py [--dry-run]
        [--root runs/sweeps] [--results experiments/results] [--only default/mig] [--commit]

--dry-run lists every run (warm starts first) with its state and command, and runs nothing:
paste the commands into a cluster's job script to run them elsewhere (a point's command resumes
its own workdir). A finished point's summary.json, config.json and metrics.jsonl are copied to
RESULTS/<sweep>/runs/<point>/; with --commit each copy is committed to git at once, so results
survive the machine. A point with results there counts as finished. Rerunning the same command
after an interruption picks up where it stopped: the interrupted point resumes from its last
checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from experiments.sweep import Point, Sweep, flag, load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILES = ("summary.json", "config.json", "metrics.jsonl")


def warmstart_dir(sweep: Sweep, regime: str, root: str) -> str:
    """Where a regime's warm start lives: keyed by the recipe and its overrides, so sweeps whose
    regimes train the same warm start share one."""
    key = json.dumps([sweep.config, sorted((k, repr(v)) for k, v in
                                            sweep.warmstart_overrides(regime).items())])
    return os.path.join(root, "warmstarts", f"{regime}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")


def main_command(config: str, variant: str | None, workdir: str, overrides: dict) -> list[str]:
    spec = config if variant is None else f"{config}:{variant}"
    return [sys.executable, "-m", "migjax.main", f"--config={spec}", f"--workdir={workdir}",
            *(flag(k, v) for k, v in overrides.items())]


def warmstart_command(sweep: Sweep, regime: str, root: str) -> list[str]:
    return main_command(_config_path(sweep), None, warmstart_dir(sweep, regime, root),
                        sweep.warmstart_overrides(regime))


def point_command(sweep: Sweep, point: Point, root: str) -> list[str]:
    model = os.path.join(warmstart_dir(sweep, point.regime, root), "sft_model")
    return main_command(_config_path(sweep), point.variant, point_dir(point, root),
                        {**sweep.point_overrides(point), "model.path": model,
                         "model.init_from_sft": False})


def point_dir(point: Point, root: str) -> str:
    return os.path.join(root, point.sweep, point.name)


def result_dir(point: Point, results: str) -> str:
    return os.path.join(results, point.sweep, "runs", point.name)


def _config_path(sweep: Sweep) -> str:
    return sweep.config if os.path.isabs(sweep.config) else os.path.join(ROOT, sweep.config)


def state(point: Point, root: str, results: str) -> str:
    if os.path.isfile(os.path.join(result_dir(point, results), "summary.json")):
        return "done"
    if os.path.isfile(os.path.join(point_dir(point, root), "summary.json")):
        return "finished (results not copied)"
    if os.path.isdir(os.path.join(point_dir(point, root), "checkpoints")):
        return "partial"
    return "todo"


def save_results(point: Point, root: str, results: str, commit: bool) -> None:
    src, dst = point_dir(point, root), result_dir(point, results)
    os.makedirs(dst, exist_ok=True)
    for name in RESULT_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    if commit:
        git_commit(dst, f"Sweep results: {point.sweep} {point.name}")


def git_commit(path: str, message: str, tries: int = 5) -> None:
    """Commits `path` alone to the repository that holds it (other staged changes stay staged),
    retrying while another git command holds the index lock."""
    for i in range(tries):
        add = subprocess.run(["git", "add", "--", "."], cwd=path, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", "."], cwd=path, capture_output=True,
            text=True).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * i)
    print(f"warning: could not commit {path}; its files are there, commit them by hand",
          file=sys.stderr)


def run(cmd: list[str], log_path: str) -> int:
    """Runs a command with its output teed to `log_path` (appended)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
        return proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="a sweep file, e.g. experiments/sweeps/mig_vs_baselines.py")
    p.add_argument("--root", default=os.path.join(ROOT, "runs", "sweeps"),
                   help="where workdirs and warm starts go")
    p.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"),
                   help="where finished points' summaries and metrics are copied")
    p.add_argument("--only", default="", help="run only points whose name contains this")
    p.add_argument("--dry-run", action="store_true", help="list the runs and commands only")
    p.add_argument("--commit", action="store_true", help="git-commit each point's results")
    p.add_argument("--warmstarts-only", action="store_true", help="train the warm starts only")
    a = p.parse_args(argv)
    sweep = load_sweep(a.sweep)
    points = [pt for pt in sweep.expand() if a.only in pt.name]
    regimes = list(dict.fromkeys(pt.regime for pt in points))
    if a.dry_run:
        for regime in regimes:
            ws = warmstart_dir(sweep, regime, a.root)
            done = os.path.isfile(os.path.join(ws, "sft_model", "config.json"))
            print(f"# warm start {regime}: {'done' if done else 'todo'}")
            print(" ".join(warmstart_command(sweep, regime, a.root)))
        for pt in points:
            print(f"# {sweep.name}/{pt.name}: {state(pt, a.root, a.results)}")
            print(" ".join(point_command(sweep, pt, a.root)))
        print(f"# {len(points)} points, {len(regimes)} warm starts")
        return 0
    log_path = os.path.join(a.root, sweep.name, "launch.log")
    for regime in regimes:
        ws = warmstart_dir(sweep, regime, a.root)
        if os.path.isfile(os.path.join(ws, "sft_model", "config.json")):
            continue
        print(f"[{sweep.name}] warm start {regime} -> {ws}", flush=True)
        if (rc := run(warmstart_command(sweep, regime, a.root), log_path)):
            print(f"warm start {regime} failed (exit {rc}); see {log_path}", file=sys.stderr)
            return rc
    if a.warmstarts_only:
        return 0
    for i, pt in enumerate(points):
        st = state(pt, a.root, a.results)
        if st == "done":
            continue
        if st == "todo" or st == "partial":
            t0 = time.time()
            print(f"[{sweep.name}] {i + 1}/{len(points)} {pt.name} ({st})", flush=True)
            if (rc := run(point_command(sweep, pt, a.root), log_path)):
                print(f"point {pt.name} failed (exit {rc}); see {log_path}; rerun to resume",
                      file=sys.stderr)
                return rc
            print(f"[{sweep.name}] {pt.name} finished in {(time.time() - t0) / 60:.1f} min",
                  flush=True)
        save_results(pt, a.root, a.results, a.commit)
    print(f"[{sweep.name}] all {len(points)} points finished; "
          f"python -m experiments.report {os.path.join(a.results, sweep.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
