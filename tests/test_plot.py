"""Tests for migjax.plot: curve collection (evaluation sets by pattern, their standard errors),
smoothing, run names and variants, PNG output, defaults and errors."""

import json
import math
import os

import numpy as np
import pytest
from matplotlib.image import imread

from migjax.metrics import MetricsWriter
from migjax.plot import (
    DEFAULT_KEYS,
    collect_curves,
    main,
    moving_average,
    plot_runs,
    run_labels,
    run_variant,
)


def _run(path, rows, command=None):
    with MetricsWriter(path, tensorboard=False) as w:
        for step, metrics, *final in rows:
            w.write(step, metrics, final=bool(final))
    if command is not None:
        (path / "config.json").write_text(json.dumps({"rl": {"steps": 2},
                                                      "provenance": {"command": command}}))
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    a = _run(
        tmp_path / "grpo",
        [
            (0, {"eval/test/pass_at_1": 0.25, "eval/test/pass_at_1_se": 0.2, "eval/test/n": 4.0,
                 "eval/ood/pass_at_1": 0.0, "eval/ood/pass_at_1_se": 0.0, "eval/ood/n": 4.0}),
            (1, {"reward/correct": 0.1, "rollout/len": 30.0}),
            (2, {"reward/correct": 0.3, "rollout/len": float("nan")}),
            (2, {"eval/test/pass_at_1": 0.5, "eval/test/n": 4.0,  # no _se: computed from n
                 "eval/ood/pass_at_1": 0.25, "eval/ood/pass_at_1_se": 0.2}, "final"),
        ],
        command=["-m", "migjax.main", "--config=configs/arith_tiny.py:grpo_matched"],
    )
    b = _run(
        tmp_path / "mig",
        [
            (1, {"reward/correct": 0.2, "mig/gain_sum": 0.7, "eval/test/mean_at_4": 0.1,
                 "eval/test/mean_at_4_se": 0.05}),
            (3, {"reward/correct": 0.4, "custom": 9.0}),
        ],
        command=["-m", "migjax.main", "--config=configs/arith_tiny.py", "--workdir=x"],
    )
    return a, b


def test_collect_curves_default_panels(two_runs):
    a, b = two_runs
    curves = collect_curves([a, b])
    assert list(curves) == ["eval/*/pass_at_1", "eval/*/mean_at_*", "reward/correct",
                            "rollout/len", "mig/gain_sum"]
    ood, test = curves["eval/*/pass_at_1"]  # sets in name order; the final record included
    assert (ood.label, ood.steps, ood.values, ood.se) == ("grpo: ood", [0, 2], [0.0, 0.25],
                                                          [0.0, 0.2])
    assert (test.label, test.steps, test.values) == ("grpo: test", [0, 2], [0.25, 0.5])
    assert test.se == [0.2, pytest.approx(math.sqrt(0.5 * 0.5 / 4))]
    assert (ood.run, ood.part, test.part) == (0, 0, 1)
    ((mean,),) = [curves["eval/*/mean_at_*"]]  # the _se key itself is no curve
    assert (mean.label, mean.values, mean.se, mean.run) == ("mig: test mean_at_4", [0.1], [0.05], 1)
    assert [(c.label, c.steps, c.values, c.se) for c in curves["reward/correct"]] == \
        [("grpo", [1, 2], [0.1, 0.3], None), ("mig", [1, 3], [0.2, 0.4], None)]
    ((length,),) = [curves["rollout/len"]]
    assert length.values[0] == 30.0 and math.isnan(length.values[1])
    assert "custom" not in curves and "custom" not in DEFAULT_KEYS


def test_one_run_labels_curves_by_set(two_runs):
    curves = collect_curves([two_runs[0]], ["eval/*/pass_at_1", "reward/correct"])
    assert [c.label for c in curves["eval/*/pass_at_1"]] == ["ood", "test"]
    assert [c.label for c in curves["reward/correct"]] == ["grpo"]


def test_collect_curves_explicit_keys_keep_order(two_runs):
    curves = collect_curves(list(two_runs), ["custom", "missing", "mig/gain_sum"])
    assert list(curves) == ["custom", "mig/gain_sum"]
    assert [(c.label, c.steps, c.values) for c in curves["custom"]] == [("mig", [3], [9.0])]


def test_moving_average_by_hand():
    got = moving_average([1.0, 3.0, float("nan"), 5.0, 7.0], 2)
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_array_equal(moving_average([1.0, 2.0], 1), [1.0, 2.0])


def test_run_labels_and_variants(two_runs, tmp_path):
    assert run_labels(["x/a", "y/b/"]) == ["a", "b"]
    assert run_labels(["x/seed0", "y/seed0"]) == ["x/seed0", "y/seed0"]
    a, b = two_runs
    assert run_variant(a) == "grpo_matched" and run_variant(b) == "mig"
    assert run_variant(str(tmp_path)) is None  # no config.json


def test_plot_runs_png_default_out_one_dir(two_runs):
    a, _ = two_runs
    out = plot_runs([a], keys=["reward/correct"])
    assert out == os.path.join(a, "curves.png")
    img = imread(out)
    assert img.shape[:2] == (380, 480)  # one panel: 4.8 x 3.4 inches and a title, at 100 dpi
    assert img[..., :3].min() < 0.5  # something was drawn


def test_plot_runs_several_dirs_grid(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = plot_runs(list(two_runs))
    assert out == "curves.png" and os.path.isfile(tmp_path / "curves.png")
    img = imread(out)
    assert img.shape[:2] == (720, 1440)  # five panels: a 2 x 3 grid


def test_main_cli(two_runs, tmp_path, capsys):
    out = str(tmp_path / "plots" / "c.png")
    assert main([*two_runs, "--out", out, "--keys", "reward/correct, mig/gain_sum",
                 "--smooth", "1"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert imread(out).shape[:2] == (380, 960)


def test_errors_name_the_problem(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no metrics.jsonl in run directory {empty}"):
        plot_runs([two_runs[0], str(empty)])
    with pytest.raises(ValueError, match=r"none of the keys \[nope\] is logged"):
        plot_runs([two_runs[0]], keys=["nope"])
    assert main([str(empty)]) == 2
    assert "no metrics.jsonl in run directory" in capsys.readouterr().err
