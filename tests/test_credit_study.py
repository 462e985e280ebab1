"""The step-credit study: corruption that makes one step's arithmetic wrong and propagates, the
rank statistics by hand, and an end-to-end run on a tiny model."""

import json
import os

import numpy as np
import pytest

from experiments import credit_study as cs


def test_corruption_breaks_one_step_and_propagates():
    steps = ["He sprints 3*3=9 times", "So he runs 9*60=540 meters", "Then 540+10=550 in all"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, j = cs.corrupt(steps, rng)
        assert out[:j] == steps[:j] and out[j] != steps[j]
        for s in out[j + 1:]:  # every later step is recomputed from the wrong value
            expr, result = s.split("=")[0].split()[-1], s.split("=")[1].split()[0]
            assert cs._evaluate(expr) == float(result), s
        assert out[-1] != steps[-1]
    assert cs.corrupt(["no numbers here", "nor here"], rng) is None


def test_rank_statistics_by_hand():
    assert cs.auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert cs.auroc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0])) == 0.5
    assert cs.auroc(np.array([0.1, 0.9, 0.3]), np.array([1, 0, 0])) == 0.0
    np.testing.assert_allclose(cs.ranks(np.array([3.0, 1.0, 3.0])), [2.5, 1.0, 2.5])
    assert cs.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 45])) == pytest.approx(1)
    assert cs.spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1)


def test_study_end_to_end_on_a_tiny_model(tmp_path, tiny_model):
    out = tmp_path / "study"
    assert cs.main(["--model", tiny_model, "--out", str(out), "--n", "6", "--batch-size", "4",
                    "--no-chat-template"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["problems"] == 6 and res["steps"] >= 24
    for group in ("auroc_corrupted_step", "spearman_step_value"):
        assert set(res[group]) == {"gain", "diff", "position"}
        assert all(-1.0 <= v <= 1.0 for v in res[group].values())
    rows = [json.loads(x) for x in open(out / "traces.jsonl")]
    assert len(rows) == 12 and rows[0]["corrupted"] == -1 and rows[1]["corrupted"] >= 0
    assert all(len(r["l"]) == len(r["steps"]) + 1 for r in rows)
    assert os.path.getsize(out / "credit_study.png") > 1000
    # --template default puts the RL recipes' step-format instruction before the question
    out2 = tmp_path / "study_default"
    assert cs.main(["--model", tiny_model, "--out", str(out2), "--n", "6", "--batch-size", "4",
                    "--no-chat-template", "--template", "default"]) == 0
    rows2 = [json.loads(x) for x in open(out2 / "traces.jsonl")]
    assert [r["steps"] for r in rows2] == [r["steps"] for r in rows]
    assert not np.allclose(rows2[0]["l"], rows[0]["l"])
