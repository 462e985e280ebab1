"""Tests for migjax.metrics: the JSON-lines log, resume, TensorBoard scalars, sample tables."""

import glob
import json
import math
import os
import re
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboardX.proto import event_pb2

from migjax.metrics import MetricsWriter, Timer, format_sample_table, read_metrics


def _tb_scalars(workdir):
    """{(tag, step): value} from every event file under workdir/tb, last write wins."""
    out = {}
    purges = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("file_version") and event.step:
                purges.append(event.step)
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out, purges


def test_write_and_read_round_trip(tmp_path):
    before = time.time()
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"reward/correct": 0.25, "loss/total": np.float32(1.5), "count": 3})
        w.write(2, {"reward/correct": float("nan"), "loss/total": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and before <= first["time"] <= time.time()
    assert first["reward/correct"] == 0.25 and first["loss/total"] == 1.5 and first["count"] == 3.0
    assert json.loads(lines[1])["loss/total"] is None  # strict JSON, no NaN/Infinity tokens
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[1]["reward/correct"]) and math.isnan(records[1]["loss/total"])


def test_write_is_flushed_before_close(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(7, {"a": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["a"] == 1.0
    w.close()
    assert not (tmp_path / "tb").exists()


def test_write_rejects_bad_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="metric 'name' has non-numeric value 'abc'"):
            w.write(1, {"name": "abc"})
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 3.0})
    assert read_metrics(tmp_path) == []


def test_tensorboard_scalars_and_purge_on_resume(tmp_path, monkeypatch):
    # Both writers open within the same wall-clock second, as in a fast restart.
    monkeypatch.setattr(time, "time", lambda: 1700000000.0)
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 5):
            w.write(step, {"loss/total": step / 2})
    with MetricsWriter(tmp_path) as w:
        w.resume(2)
        w.write(3, {"loss/total": 30.0})
    scalars, purges = _tb_scalars(tmp_path)
    assert scalars[("loss/total", 1)] == 0.5
    assert scalars[("loss/total", 4)] == 2.0
    assert scalars[("loss/total", 3)] == 30.0
    assert purges == [3]


def test_resume_keeps_steps_up_to_checkpoint_and_drops_truncated_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, {"x": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 6, "time": 1.0, "x": 6.')  # crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.resume(3)
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
        w.write(4, {"x": 40.0})
        w.write(5, {"x": 50.0})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["x"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0]
    assert [p for p in os.listdir(tmp_path)] == ["metrics.jsonl"]


def test_resume_drops_the_final_evaluation(tmp_path):
    """A run resumed at its last checkpoint (killed before summary.json) or extended past it
    evaluates again at its end: the earlier final evaluation must not stay behind."""
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"eval": 0.1})
        w.write(1, {"x": 1.0})
        w.write(2, {"x": 2.0})
        w.write(2, {"eval": 0.5}, final=True)
        with pytest.raises(ValueError, match="reserved"):
            w.write(3, {"final": 1.0})
    records = read_metrics(tmp_path)
    assert [r.get("final", False) for r in records] == [False, False, False, True]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.resume(2)  # killed between the final evaluation and summary.json
        w.write(2, {"eval": 0.5}, final=True)
    assert [(r["step"], "eval" in r) for r in read_metrics(tmp_path)] == \
        [(0, True), (1, False), (2, False), (2, True)]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.resume(2)  # extended to 3 steps
        w.write(3, {"x": 3.0})
        w.write(3, {"eval": 0.7}, final=True)
    assert [(r["step"], r.get("final", False)) for r in read_metrics(tmp_path)] == \
        [(0, False), (1, False), (2, False), (3, False), (3, True)]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.resume(-1)  # restarted before its first checkpoint: the step-0 evaluation goes too
    assert read_metrics(tmp_path) == []


def test_reopen_without_resume_repairs_truncated_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 1.0, "x": 1.0}\n{"step": 2, "ti')
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(2, {"x": 2.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected an object"):
        read_metrics(path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=15), st.integers(0, 20))
def test_resume_property(tmp_path_factory, steps, resume_at):
    workdir = tmp_path_factory.mktemp("run")
    with MetricsWriter(workdir, tensorboard=False) as w:
        for i, step in enumerate(steps):
            w.write(step, {"i": float(i)})
        w.resume(resume_at)
    expected = [(s, float(i)) for i, s in enumerate(steps) if s <= resume_at]
    assert [(r["step"], r["i"]) for r in read_metrics(workdir)] == expected


def test_format_sample_table_hand_written():
    rows = [
        {
            "prompt": "2+2?",
            "completion": "Step\n1: add\n<answer>4</answer>",
            "reward": 1.0,
            "correct": True,
        },
        {"prompt": "x" * 30, "completion": "no", "reward": 0.123456, "correct": False},
    ]
    table = format_sample_table(rows, ["prompt", "completion", "reward", "correct"], max_width=12)
    assert table.splitlines() == [
        "prompt       | completion   | reward | correct",
        "-------------+--------------+--------+--------",
        "2+2?         | Step⏎1: add… | 1      | True",
        "xxxxxxxxxxx… | no           | 0.1235 | False",
    ]


def test_format_sample_table_numpy_and_int_cells():
    rows = [{"a": np.float32(0.123456), "b": np.int64(12345), "c": 7, "d": np.bool_(True)}]
    assert format_sample_table(rows, "abcd").splitlines()[2] == "0.1235 | 12345 | 7 | True"


def test_format_sample_table_missing_column_and_width():
    table = format_sample_table([{"a": "v"}], ["a", "b"], max_width=5)
    assert table.splitlines()[2] == "v |"
    with pytest.raises(ValueError, match="max_width"):
        format_sample_table([], ["a"], max_width=1)


BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=1, max_size=4), st.integers(2, 30))
def test_format_sample_table_cells_bounded(texts, max_width):
    table = format_sample_table([{"c": t} for t in texts], ["c"], max_width=max_width)
    lines = table.split("\n")
    assert len(lines) == 2 + len(texts)
    for line, text in zip(lines[2:], texts, strict=True):
        assert len(line) <= max_width
        assert not any(ch in BREAKS for ch in line)
        assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in line)
        if len(text) <= max_width and not any(ch in BREAKS + "\t" for ch in text):
            assert line == re.sub("[\x00-\x1f\x7f-\x9f]", "", text).rstrip()


def test_timer_rate():
    with Timer() as t:
        time.sleep(0.02)
    assert 0.015 < t.seconds < 1.0
    assert t.rate(100) == pytest.approx(100 / t.seconds)
    assert Timer().rate(5) == 0.0


def test_standard_errors_by_hand():
    from migjax.evaluation import with_standard_errors
    from migjax.metrics import is_rate

    out = with_standard_errors({"pass_at_1": 0.25, "pass_at_4": 1.0, "mean_at_4": 0.5}, 4)
    assert out["pass_at_1_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))  # 0.2165
    assert out["pass_at_4_se"] == 0.0 and out["mean_at_4_se"] == pytest.approx(0.25)
    assert out["n"] == 4.0 and out["pass_at_1"] == 0.25
    assert math.isnan(with_standard_errors({"pass_at_1": 0.0}, 0)["pass_at_1_se"])
    assert [k for k in sorted(out) if is_rate(k)] == ["mean_at_4", "pass_at_1", "pass_at_4"]
    assert is_rate("eval/test/pass_at_1") and not is_rate("eval/test/pass_at_1_se")
    assert not is_rate("eval/test/n") and not is_rate("reward/correct")


class _FakeWandb:
    """Stands in for the wandb package: records init arguments, logged steps and finish."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_writer_logs_every_record_and_resumes_the_same_run(tmp_path, monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings_ = {"project": "proj", "config": {"rl": {"steps": 2}}}
    with MetricsWriter(tmp_path / "run", tensorboard=False, wandb=settings_) as w:
        w.write(1, {"x": 1.0, "bad": float("nan")})
        w.write(2, {"eval/test/pass_at_1": 0.5}, final=True)
    assert fake.finished == 1
    (init,) = fake.inits
    assert init["project"] == "proj" and init["name"] == "run" and init["resume"] == "allow"
    assert init["config"] == {"rl": {"steps": 2}} and init["dir"] == str(tmp_path / "run")
    assert fake.logged[0][0] == 1 and fake.logged[0][1]["x"] == 1.0
    assert math.isnan(fake.logged[0][1]["bad"])
    assert fake.logged[1] == (2, {"eval/test/pass_at_1": 0.5})
    with MetricsWriter(tmp_path / "run", tensorboard=False, wandb=settings_) as w:
        w.resume(1)
    assert fake.inits[1]["id"] == init["id"] and len(init["id"]) == 16  # the same W&B run
    with MetricsWriter(tmp_path / "other", tensorboard=False, wandb=settings_):
        pass
    assert fake.inits[2]["id"] != init["id"]


def test_wandb_is_optional(tmp_path, monkeypatch):
    import subprocess
    import sys

    code = ("import sys, migjax.trainer, migjax.metrics; "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ImportError, match=r"log.wandb=True needs the wandb package"):
        MetricsWriter(tmp_path, tensorboard=False, wandb={"project": "p"})
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # off: no wandb needed
        w.write(1, {"x": 1.0})
    assert not os.path.exists(tmp_path / "wandb_run_id")


def test_format_sample_table_drops_control_characters():
    table = format_sample_table([{"c": "11\x1b[0m\x00\x07 ok\tx\ny"}], ["c"])
    assert table.splitlines()[2] == "11[0m ok x⏎y"
