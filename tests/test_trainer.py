"""End-to-end runs of every recipe, shrunk to a tiny model by overrides: metrics, evaluation,
checkpoints, summary and the command line; malformed data files; the baseline variants."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest

from migjax import trainer
from migjax.config_checks import validate
from migjax.data.sources import DataError

pytestmark = pytest.mark.slow


def run(recipe, workdir, overrides, variant="mig"):
    """train() in this process; returns (summary, per-step record)."""
    c = helpers.make_config(recipe, overrides, variant)
    validate(c, jax.device_count())
    with helpers.recording() as rec:
        summary = trainer.train(c, str(workdir))
    return summary, rec


def read_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_run(workdir, rec, summary, *, steps, eval_names, pass_k, ckpt_steps):
    """What every finished run leaves behind, checked against what it computed."""
    lines = read_lines(workdir)
    train_lines = [r for r in lines if "reward/correct" in r]
    assert [r["step"] for r in train_lines] == list(range(1, steps + 1))
    rates = {f"eval/{n}/{m}" for n in eval_names
             for m in ("pass_at_1", f"pass_at_{pass_k}", f"mean_at_{pass_k}")}
    eval_keys = rates | {k + "_se" for k in rates} | {f"eval/{n}/n" for n in eval_names}
    for r, metrics in zip(train_lines, rec["metrics"], strict=True):
        missing = [k for k in helpers.STEP_METRICS + helpers.LOSS_METRICS if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        for k in helpers.STEP_METRICS + helpers.LOSS_METRICS + ("optim/grad_norm",):
            assert r[k] is not None and math.isfinite(r[k]), (r["step"], k, r[k])
            assert r[k] == pytest.approx(metrics[k], rel=1e-6, abs=1e-9), k  # logged as computed
        for k in ("reward/correct", "reward/format", "mig/no_cot_frac", "sft/pass_frac",
                  "policy/clipfrac", "mig/zero_gain_step_frac"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert 0.0 <= r["mig/steps_per_completion"] <= 6.0
        assert r["mig/lK"] <= 0.0 and r["mig/l0"] <= 0.0  # log-likelihoods
        assert all(r[k] > 0 for k in ("perf/rollout_tok_s", "perf/score_tok_s",
                                      "perf/update_tok_s", "perf/rollout_s", "perf/reward_s",
                                      "perf/update_s"))
        assert r["update/skipped"] == 0.0
    first, final = lines[0], lines[-1]  # evaluation before RL is logged at step 0
    assert first["step"] == 0 and {k: first[k] for k in eval_keys} == summary["before"]
    assert final["step"] == steps and eval_keys <= set(final)
    assert {k: final[k] for k in eval_keys} == {k: summary["after"][k] for k in eval_keys}
    assert eval_keys == set(summary["before"]) == set(summary["after"])
    assert all(0.0 <= summary["after"][k] <= 1.0 for k in rates)
    for when in ("before", "after"):  # binomial standard errors over the problems evaluated
        got = summary[when]
        for k in rates:
            n = got[k.rsplit("/", 1)[0] + "/n"]
            assert n == 4  # task.eval_limit of helpers.shrink
            assert got[k + "_se"] == pytest.approx(math.sqrt(got[k] * (1 - got[k]) / n))
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["steps"] == steps and saved["after"] == summary["after"]
    assert saved["before"] == summary["before"]
    ckpt = os.path.join(workdir, "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == ckpt_steps
    with open(os.path.join(workdir, "eval_samples.html"), encoding="utf-8") as f:
        page = f.read()  # every evaluation set, each with its reference and prediction
    assert re.findall(r"<h2>evaluation set ([^<]+)</h2>", page) == list(eval_names)
    assert page.count("<th>reference</th>") == page.count("<th>prediction</th>") == \
        page.count('<div class="card">') > 0
    return lines


def test_arith_tiny_end_to_end(tmp_path, compile_cache):
    """The embedded default from scratch: warm start, before-eval, 3 RL steps with a mid-run
    evaluation and sample logging, checkpoints, final evaluation and a Hugging Face export."""
    ov = helpers.shrink("arith_tiny", eval__every=2, log__samples_every=2,
                        checkpoint__export_hf=True)
    summary, rec = run("arith_tiny", tmp_path, ov)
    lines = check_run(tmp_path, rec, summary, steps=3, eval_names=("test", "ood"), pass_k=2,
                      ckpt_steps=[2, 3])
    mid = [r for r in lines if r["step"] == 2 and "eval/test/pass_at_1" in r]
    assert len(mid) == 1 and "eval/ood/pass_at_2" in mid[0]
    assert os.path.isfile(tmp_path / "sft_model" / "config.json")  # the warm start's output
    page = (tmp_path / "samples" / "step_000002.html").read_text(encoding="utf-8")
    cards = page.count('<div class="card">')
    assert cards == 8  # 4 prompts x 2 samples
    for field in ("reference", "prediction", "advantage (outcome)", "advantage (process)"):
        assert page.count(f"<th>{field}</th>") == cards, field
    assert [int(g) for g in re.findall(r"#\d+ group (\d+) ", page)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "<div class=\"label\">question</div>\n<div class=\"text\"></div>" not in page
    if 'class="step"' in page:  # steps show l_k, h_k and g_k, under a legend
        assert re.search(r'<span class="g">l=-?\d+\.\d+ h=-?\d+\.\d+ g=\d+\.\d+</span>', page)
        assert page.count('<div class="legend">') == 1
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")
    from migjax.models import load_pretrained, split

    model, cfg = load_pretrained(summary["export"])
    assert cfg.hidden_size == 32 and cfg.num_layers == 2
    _, exported = split(model)
    for k, v in rec["params"].items():  # the export is the final state, bit for bit
        np.testing.assert_array_equal(np.asarray(exported[k]), v, err_msg=k)


@pytest.mark.parametrize("recipe", ["gsm8k_qwen", "math_qwen", "smollm2_gsm8k"])
def test_real_data_recipe_end_to_end(recipe, tmp_path, tiny_model, compile_cache):
    """A real-data recipe (its dtype, template and data files) on tiny random weights."""
    summary, rec = run(recipe, tmp_path, helpers.shrink(recipe, model_path=tiny_model))
    c = helpers.load_recipe(recipe)
    check_run(tmp_path, rec, summary, steps=3, eval_names=tuple(c.task.eval.keys()), pass_k=2,
              ckpt_steps=[2, 3])
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["model"]["dtype"] == c.model.dtype and saved["task"]["kind"] == c.task.kind
    assert rec["params"]["embed"].dtype == np.dtype(jax.numpy.dtype(c.model.dtype))


def test_main_prints_before_after_table(tmp_path, sft_model, compile_cache):
    """`python -m migjax.main` with --config.x=y overrides runs and closes with the table."""
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=2)
    args = [sys.executable, "-m", "migjax.main", "--config=configs/arith_tiny.py",
            f"--workdir={tmp_path}", *helpers.flag_args(ov)]
    proc = subprocess.run(args, cwd=helpers.ROOT, env=helpers.subprocess_env(compile_cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    out = proc.stdout
    assert re.search(r"^evaluation\s+before\s+after\s+n$", out, re.M), out
    for key in ("eval/test/pass_at_1", "eval/test/pass_at_2", "eval/ood/pass_at_1", "eval/ood/pass_at_2"):
        m = re.search(rf"^{re.escape(key)}\s+(\S+) \+- (\S+)\s+(\S+) \+- (\S+)\s+(\d+)$", out,
                      re.M)
        assert m, f"no row {key} in:\n{out}"
        for when, i in (("before", 1), ("after", 3)):  # value, then its standard error
            assert float(m.group(i)) == pytest.approx(summary[when][key], abs=5e-4)
            assert float(m.group(i + 1)) == pytest.approx(summary[when][key + "_se"], abs=5e-4)
        assert int(m.group(5)) == summary["after"][key.rsplit("/", 1)[0] + "/n"]
    assert not re.search(r"^eval/\S+(_se|/n)\s", out, re.M)  # no rows of their own
    assert "(+- one binomial standard error, sqrt(p (1 - p) / n), over n problems)" in out
    for when in ("before", "after"):  # a sample is right no more often than any of k is
        for name in ("test", "ood"):
            mean, any_k = summary[when][f"eval/{name}/mean_at_2"], summary[when][f"eval/{name}/pass_at_2"]
            assert 0.0 <= mean <= any_k <= 2 * mean + 1e-9
    assert f"metrics      {tmp_path / 'metrics.jsonl'}" in out
    assert [r["step"] for r in read_lines(tmp_path)] == [0, 1, 2, 2]


def test_eval_mode_measures_what_rl_measures_before_its_first_step(tmp_path, sft_model,
                                                                  compile_cache):
    """mode="eval" evaluates model.path with RL's evaluation keys and trains nothing, not even
    the warm start a recipe asks for."""
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=1)
    rl, _ = run("arith_tiny", tmp_path / "rl", ov)
    ov.update({"mode": "eval", "model.init_from_sft": True, "warmstart.steps": 3})
    ev, rec = run("arith_tiny", tmp_path / "eval", ov)
    assert ev["after"] == rl["before"] and ev["before"] == {} and ev["steps"] == 0
    assert rec["steps"] == []
    assert not (tmp_path / "eval" / "checkpoints").exists()
    assert not (tmp_path / "eval" / "sft_model").exists()
    with open(tmp_path / "eval" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["after"] == ev["after"]
    lines = read_lines(tmp_path / "eval")
    assert [r["step"] for r in lines] == [0]
    assert {k: lines[0][k] for k in ev["after"]} == ev["after"]
    assert (tmp_path / "eval" / "eval_samples.html").is_file()
    table = trainer.report(ev)
    assert re.search(r"^eval/test/pass_at_1\s+-\s+\d\.\d{3} \+- ", table, re.M), table
    # the cold-start report reads the two workdirs: raw, "after the cold start" (RL's before), RL
    from experiments import cold_start_report as csr
    out = tmp_path / "report"
    assert csr.main(["--raw", str(tmp_path / "eval"), "--run", str(tmp_path / "rl"), "--out",
                     str(out), "--name", "tiny"]) == 0
    res = json.loads((out / "results.json").read_text())
    p1 = lambda s: (s["eval/test/pass_at_1"], s["eval/test/pass_at_1_se"], 4)
    assert tuple(res["pass_at_1"]["raw"]["test"]) == p1(ev["after"])
    assert tuple(res["pass_at_1"]["cold_start"]["test"]) == p1(rl["before"])
    assert tuple(res["pass_at_1"]["rl"]["test"]) == p1(rl["after"])
    step1 = [r for r in read_lines(tmp_path / "rl") if "reward/correct" in r][0]
    assert res["batch"]["reward/format"]["first"] == step1["reward/format"]
    assert res["rl_steps"] == 1 and res["samples_per_step"] == 8
    assert "| test greedy pass@1 |" in (out / "results.md").read_text()
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "raw" / "summary.json").is_file()
    with pytest.raises(ValueError, match="not an evaluation-only run"):
        csr.collect(str(tmp_path / "rl"), str(tmp_path / "rl"))


GOOD = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
        ("A box holds 6 pens. How many pens are in 2 boxes?", "12"),
        ("Sara reads 5 pages a day for 3 days. How many pages does she read?", "15"),
        ("There are 9 birds and 4 fly away. How many birds are left?", "5"),
        ("Each cake needs 2 eggs. How many eggs do 4 cakes need?", "8"),
        ("Ann had 10 dollars and spent 3. How many dollars are left?", "7")]


def write_malformed(path):
    """A GSM8K-format file: good records around a bad JSON line, a record without an answer, an
    empty question and a line with a non-UTF-8 byte. Returns the 1-based bad line numbers."""
    good = [json.dumps({"question": q, "answer": f"{q} so the total is {a}.\n#### {a}"})
            .encode() for q, a in GOOD]
    bad = [b'{"question": "Half a record', json.dumps({"question": "What is 2 + 2?"}).encode(),
           json.dumps({"question": "   ", "answer": "#### 4"}).encode(),
           b'{"question": "Caf\xe9 prices?", "answer": "#### 3"}']
    lines = good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return [3, 4, 7, 8]


def test_malformed_records_are_skipped_and_counted(tmp_path, tiny_model, compile_cache, caplog):
    train_file = tmp_path / "train.jsonl"
    bad_lines = write_malformed(train_file)
    eval_file = tmp_path / "eval.jsonl"
    evals = [json.dumps({"question": q, "answer": int(a)}) for q, a in GOOD[:4]]
    evals.insert(1, '{"question": "no answer here"}')
    eval_file.write_text("\n".join(evals) + "\n", encoding="utf-8")
    ov = helpers.shrink("smollm2_gsm8k", model_path=tiny_model, rl__steps=2,
                        task__train_path=str(train_file), task__train_limit=0)
    ov["task.eval"] = {"mine": f"jsonl:{eval_file}"}
    work = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        summary, rec = run("smollm2_gsm8k", work, ov)
    assert rec["steps"] == [1, 2]
    assert all(math.isfinite(v) for m in rec["metrics"] for v in m.values())
    text = caplog.text
    assert re.search(rf"{re.escape(str(train_file))}: skipped 4 malformed records", text), text
    for reason in ("bad_json", "missing_answer", "missing_question", "bad_utf8"):
        assert f"'{reason}': 1" in text
    for line in bad_lines:  # each skipped record is named by file and line
        assert f"{train_file}:{line}: skipped record" in text
    assert re.search(rf"{re.escape(str(eval_file))}: skipped 1 malformed records", text)
    rates = {"eval/mine/pass_at_1", "eval/mine/pass_at_2", "eval/mine/mean_at_2"}
    assert set(summary["after"]) == rates | {k + "_se" for k in rates} | {"eval/mine/n"}

    strict = dict(ov, **{"task.strict": True})
    with pytest.raises(DataError, match=re.escape(f"{train_file}:{bad_lines[0]}: invalid JSON")):
        run("smollm2_gsm8k", tmp_path / "strict", strict)


def test_variants_change_only_the_update(tmp_path, sft_model, compile_cache):
    """grpo_matched, stepwise and coupled run 2 finite steps; their first rollout equals the MIG run's
    (sampling does not depend on the loss) while their losses follow their settings."""
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=2)
    recs = {}
    for variant in ("mig", "grpo_matched", "stepwise", "coupled"):
        _, recs[variant] = run("arith_tiny", tmp_path / variant, ov, variant)
        assert recs[variant]["steps"] == [1, 2]
        for m in recs[variant]["metrics"]:
            bad = {k: v for k, v in m.items() if not math.isfinite(v)}
            assert not bad, (variant, bad)
    mig = recs["mig"]["metrics"][0]
    assert mig["mig/no_cot_frac"] < 1.0 and mig["optim/grad_norm"] > 0.0, \
        "the warm-started model should write think blocks that earn credit"
    same = ("reward/correct", "reward/format", "mig/l0", "mig/lK", "mig/gain_sum",
            "mig/steps_per_completion", "adv/outcome_std")
    for variant, rec in recs.items():
        assert rec["token_digests"][0] == recs["mig"]["token_digests"][0], variant
        first = rec["metrics"][0]
        for k in same:
            assert first[k] == pytest.approx(mig[k], rel=1e-5, abs=1e-6), (variant, k)
    assert mig["loss/total"] == pytest.approx(
        mig["loss/process"] + mig["loss/outcome"] + 0.1 * mig["loss/sft"], rel=1e-4, abs=1e-6)
    grpo = recs["grpo_matched"]["metrics"][0]  # alpha = gamma = 0: the outcome stream alone...
    for m in recs["grpo_matched"]["metrics"]:
        assert m["loss/total"] == pytest.approx(m["loss/outcome"], rel=1e-5, abs=1e-7)
    for k in ("loss/process", "loss/outcome", "adv/process_std"):  # ...of unchanged advantages
        assert grpo[k] == pytest.approx(mig[k], rel=1e-5, abs=1e-7), k
    coupled = recs["coupled"]["metrics"][0]  # one stream: process + outcome on every token
    assert coupled["loss/process"] == 0.0 and coupled["adv/process_std"] == 0.0
    assert coupled["loss/outcome"] != pytest.approx(mig["loss/outcome"], rel=1e-3, abs=1e-5)
    stepwise = recs["stepwise"]["metrics"][0]  # per-step process credit
    assert stepwise["loss/outcome"] == pytest.approx(mig["loss/outcome"], rel=1e-5, abs=1e-7)
    assert (stepwise["loss/process"], stepwise["adv/process_std"]) != pytest.approx(
        (mig["loss/process"], mig["adv/process_std"]), rel=1e-3, abs=1e-5)


def test_wandb_receives_what_metrics_jsonl_holds(tmp_path, sft_model, compile_cache, monkeypatch):
    """log.wandb=True with a stand-in wandb package: one W&B run named after the workdir, the
    resolved config, and every record of metrics.jsonl at its step."""
    import types

    logged, inits = [], []
    wb_run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)),
                                   finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or wb_run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=2, log__wandb=True)
    run_dir = tmp_path / "wb"
    summary, _ = run("arith_tiny", run_dir, ov)
    (init,) = inits
    assert init["name"] == "wb" and init["project"] == "migjax"
    assert init["config"]["rl"]["steps"] == 2 and init["config"]["log"]["wandb"] is True
    lines = read_lines(run_dir)
    assert [s for s, _ in logged] == [r["step"] for r in lines] == [0, 1, 2, 2]
    assert logged[-1][1]["eval/test/pass_at_1"] == summary["after"]["eval/test/pass_at_1"]
    assert logged[1][1]["reward/correct"] == lines[1]["reward/correct"]
