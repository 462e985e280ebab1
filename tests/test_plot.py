"""Tests for migjax.plot: curve collection, PNG output, defaults and errors."""

import math
import os

import pytest
from matplotlib.image import imread

from migjax.metrics import MetricsWriter
from migjax.plot import DEFAULT_KEYS, collect_curves, main, plot_runs, run_labels


def _run(path, rows):
    with MetricsWriter(path, tensorboard=False) as w:
        for step, metrics in rows:
            w.write(step, metrics)
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    a = _run(
        tmp_path / "grpo",
        [
            (1, {"reward/correct": 0.1, "loss/total": 2.0}),
            (2, {"reward/correct": 0.3, "loss/total": float("nan")}),
            (2, {"eval/pass_at_1": 0.5}),
        ],
    )
    b = _run(
        tmp_path / "mig",
        [
            (1, {"reward/correct": 0.2, "mig/gain_sum": 0.7}),
            (3, {"reward/correct": 0.4, "custom": 9.0}),
        ],
    )
    return a, b


def test_collect_curves_default_keys(two_runs):
    a, b = two_runs
    curves = collect_curves([a, b])
    assert list(curves) == ["reward/correct", "eval/pass_at_1", "mig/gain_sum", "loss/total"]
    assert curves["reward/correct"] == [("grpo", [1, 2], [0.1, 0.3]), ("mig", [1, 3], [0.2, 0.4])]
    assert curves["eval/pass_at_1"] == [("grpo", [2], [0.5])]
    assert curves["mig/gain_sum"] == [("mig", [1], [0.7])]
    ((label, steps, values),) = curves["loss/total"]
    assert label == "grpo" and steps == [1, 2] and values[0] == 2.0 and math.isnan(values[1])
    assert "custom" not in curves and "custom" not in DEFAULT_KEYS


def test_collect_curves_explicit_keys_keep_order(two_runs):
    curves = collect_curves(list(two_runs), ["custom", "missing", "mig/gain_sum"])
    assert list(curves) == ["custom", "mig/gain_sum"]
    assert curves["custom"] == [("mig", [3], [9.0])]


def test_run_labels_disambiguate():
    assert run_labels(["x/a", "y/b/"]) == ["a", "b"]
    assert run_labels(["x/seed0", "y/seed0"]) == ["x/seed0", "y/seed0"]


def test_plot_runs_png_default_out_one_dir(two_runs):
    a, _ = two_runs
    out = plot_runs([a], keys=["reward/correct"])
    assert out == os.path.join(a, "curves.png")
    img = imread(out)
    assert img.shape[:2] == (340, 480)  # one subplot: 4.8 x 3.4 inches at 100 dpi
    assert img[..., :3].min() < 0.5  # something was drawn


def test_plot_runs_several_dirs_grid(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = plot_runs(list(two_runs))
    assert out == "curves.png" and os.path.isfile(tmp_path / "curves.png")
    img = imread(out)
    assert img.shape[:2] == (680, 1440)  # four keys: a 2 x 3 grid


def test_main_cli(two_runs, tmp_path, capsys):
    out = str(tmp_path / "plots" / "c.png")
    assert main([*two_runs, "--out", out, "--keys", "reward/correct, mig/gain_sum"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert imread(out).shape[:2] == (340, 960)


def test_errors_name_the_problem(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no metrics.jsonl in run directory {empty}"):
        plot_runs([two_runs[0], str(empty)])
    with pytest.raises(ValueError, match=r"none of the keys \[nope\] is logged"):
        plot_runs([two_runs[0]], keys=["nope"])
    assert main([str(empty)]) == 2
    assert "no metrics.jsonl in run directory" in capsys.readouterr().err
