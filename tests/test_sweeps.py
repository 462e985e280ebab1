"""Sweeps as code: every sweep file expands into valid run configs through the same flag parsing
as `migjax.main`; the launcher shares one warm start per regime, gives each point its own
workdir, copies results, skips finished points and resumes an interrupted one; the report
tabulates seeds and pairs."""

import glob
import json
import os
import shutil
import subprocess
import sys

import helpers
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import launch, report
from experiments.sweep import Sweep, cross, grid, load_sweep, zipped
from migjax.config_checks import validate

SWEEP_FILES = sorted(glob.glob(os.path.join(helpers.ROOT, "experiments", "sweeps", "*.py")))
SWEEP_FILES = [f for f in SWEEP_FILES if not f.endswith("__init__.py")]


def parse(cmd: list[str]):
    """The config `migjax.main` would build from a command line."""
    argv = ["main", *cmd[3:]]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv.config, fv.workdir


def test_grid_zip_and_cross():
    assert grid(a=[1, 2], b=range(2)) == [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 0},
                                          {"a": 2, "b": 1}]
    assert zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="different lengths"):
        zipped(a=[1], b=[1, 2])
    assert cross([{"a": 1}], r=["x", "y"]) == [{"r": "x", "a": 1}, {"r": "y", "a": 1}]
    s = Sweep("s", "configs/arith_tiny.py", points=[{"seed": 0}, {"seed": 0}])
    with pytest.raises(ValueError, match="appears twice"):
        s.expand()
    with pytest.raises(ValueError, match="regime 'nope'"):
        Sweep("s", "c.py", points=[{"seed": 0, "regime": "nope"}]).expand()


@pytest.mark.parametrize("path", SWEEP_FILES, ids=os.path.basename)
def test_every_sweep_point_is_a_valid_config(path, tmp_path):
    sweep = load_sweep(path)
    points = sweep.expand()
    assert points
    workdirs = set()
    for regime in {p.regime for p in points}:
        c, _ = parse(launch.warmstart_command(sweep, regime, str(tmp_path)))
        validate(c)
        assert c.mode == "sft" and c.seed == 0
    for p in points:
        c, workdir = parse(launch.point_command(sweep, p, str(tmp_path)))
        validate(c)
        assert c.seed == p.seed and c.mode == "rl"
        assert c.model.path == os.path.join(
            launch.warmstart_dir(sweep, p.regime, str(tmp_path)), "sft_model")
        for k, v in sweep.regimes[p.regime].items():
            node = c
            for part in k.split("."):
                node = node[part]
            assert node == v, (p.name, k)
        workdirs.add(workdir)
    assert len(workdirs) == len(points)  # one workdir each


def test_dry_run_lists_every_run(capsys):
    path = os.path.join(helpers.ROOT, "experiments", "sweeps", "mig_vs_baselines.py")
    assert launch.main([path, "--dry-run", "--root", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    n = len(load_sweep(path).expand())
    assert out.count("-m migjax.main") == n + 2  # two regimes, two warm starts
    assert f"# {n} points, 2 warm starts" in out


def test_launcher_shares_the_warm_start_skips_and_resumes(tmp_path, compile_cache):
    ov = helpers.shrink("arith_tiny", rl__steps=2, checkpoint__every=1)
    sweep_file = tmp_path / "tiny.py"
    sweep_file.write_text(
        "from experiments.sweep import Sweep, grid\n"
        f"SWEEP = Sweep(name='tiny', config={os.path.join(helpers.ROOT, 'configs', 'arith_tiny.py')!r},"
        f" overrides={ov!r}, points=grid(variant=['mig', 'grpo_matched'], seed=[0, 1])[:3])\n")
    root, results = tmp_path / "runs", tmp_path / "results"
    args = [sys.executable, "-m", "experiments.launch", str(sweep_file), "--root", str(root),
            "--results", str(results)]
    env = helpers.subprocess_env(compile_cache)
    out = subprocess.run(args, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(glob.glob(str(root / "warmstarts" / "*" / "sft_model" / "config.json"))) == 1
    names = ["default/mig/seed0", "default/mig/seed1", "default/grpo_matched/seed0"]
    for name in names:
        for f in launch.RESULT_FILES:
            assert (results / "tiny" / "runs" / name / f).is_file(), (name, f)
    cfgs = [json.loads((results / "tiny" / "runs" / n / "config.json").read_text()) for n in names]
    assert {c["model"]["path"] for c in cfgs} == {
        glob.glob(str(root / "warmstarts" / "*" / "sft_model"))[0]}
    assert [c["seed"] for c in cfgs] == [0, 1, 0]
    assert cfgs[2]["loss"]["w_process"] == 0.0

    # finished points are skipped; an interrupted point (its checkpoint kept, its summary and
    # results gone) resumes from its checkpoint instead of starting again
    victim = root / "tiny" / "default" / "mig" / "seed1"
    (victim / "summary.json").unlink()
    for f in launch.RESULT_FILES:
        (results / "tiny" / "runs" / "default" / "mig" / "seed1" / f).unlink()
    again = subprocess.run(args, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(partial)") == 1
    assert "mig/seed0" not in again.stdout and "grpo_matched" not in again.stdout
    log = (root / "tiny" / "launch.log").read_text()
    assert "resumed from checkpoint 2" in log
    assert (results / "tiny" / "runs" / "default" / "mig" / "seed1" / "summary.json").is_file()

    text = report.report(str(results / "tiny"))
    assert "| mig | 2 |" in text and "| grpo_matched | 1 |" in text
    assert (results / "tiny" / "curves_default.png").stat().st_size > 1000


def test_paired_statistics_by_hand():
    r = report.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.6})
    d = np.array([0.1, 0.2, 0.1])
    assert r["n"] == 3 and r["diff"] == pytest.approx(d.mean())
    assert r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert r["dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert r["p"] == pytest.approx(2 / 8)  # only all-positive and all-negative flips are as far
    assert report.paired({0: 1.0}, {0: 0.0}) is None
    same = report.paired({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})  # every seed +0.1: no spread
    assert same["se"] == pytest.approx(0, abs=1e-12)
    assert report._paired_text(same) == "+0.100 +- 0.000, p 0.50 (n=2)"
    assert report._paired_text(r) == "+0.133 +- 0.033, d_z +2.31, p 0.25 (n=3)"
    curve = report.train_curve([{"step": s, "reward/correct": float(s)} for s in range(1, 7)],
                               "reward/correct")
    np.testing.assert_allclose(curve, [1, 1.5, 2, 2.5, 3, 4])  # trailing mean of 5
    assert report.steps_to(curve, 2.5) == 4 and report.steps_to(curve, 9) is None


def test_report_with_another_sweep_takes_its_runs_in_these_regimes(tmp_path):
    """An ablation report beside MIG's own points from the baseline sweep (committed runs):
    only the regimes of this sweep, only the variants asked for."""
    src = os.path.join(helpers.ROOT, "experiments", "results")
    here = tmp_path / "abl"
    shutil.copytree(os.path.join(src, "mig_ablations", "runs", "sparse", "coupled"),
                    here / "runs" / "sparse" / "coupled")
    base = os.path.join(src, "mig_vs_baselines")
    text = report.report(str(here), [base], ["mig"])
    assert "| mig | 5 |" in text and "| coupled |" in text
    assert "grpo_matched" not in text and "Regime `default`" not in text
    assert "--with " + base + " --variants mig" in text
    wide = report.report(str(here), [base])
    assert "| grpo_matched | 5 |" in wide and "Regime `default`" not in wide
