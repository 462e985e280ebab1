"""The supervised cold start on real data: worked solutions rendered in the reward's format (every
delimiter), MATH500 never trained on, and a warm start of a Hugging Face model directory on GSM8K
that checkpoints, resumes bit for bit and writes a model directory RL starts from."""

import json
import os

import helpers
import numpy as np
import pytest
from safetensors.numpy import load_file

from migjax.data import demos
from migjax.data.sources import load_examples
from migjax.rewards.answers import extract_answer
from migjax.rewards.segment import step_spans_text
from migjax.rewards.verify import format_reward

DATA = os.path.join(os.path.dirname(helpers.ROOT), "shared", "data")
GSM8K = os.path.join(DATA, "gsm8k", "train.jsonl")
MATH = os.path.join(DATA, "math", "math_train12k_derived.jsonl")


def test_gsm8k_and_math_solutions_by_hand():
    steps, ans = demos.gsm8k_steps("She sold 48/2 = <<48/2=24>>24 clips.\n\nThen 48+24 = "
                                   "<<48+24=72>>72.\n#### 1,072")
    assert steps == ["She sold 48/2 = 24 clips.", "Then 48+24 = 72."] and ans == "1072"
    steps, ans = demos.math_steps("First $x = 2$. So the sum is $\\boxed{\\frac{1}{2}}$.")
    assert steps == ["First $x = 2$.", "So the sum is $\\frac{1}{2}$."] and ans == "\\frac{1}{2}"
    assert demos.render(["a", "b"], "3", "blank_line") == (
        "<think>\na\n\nb\n</think>\n<answer>3</answer>")
    with pytest.raises(ValueError, match="####"):
        demos.gsm8k_steps("no final line")
    with pytest.raises(ValueError, match="no demonstrations for dataset kind 'svamp'"):
        demos.demonstration("svamp", "x")


@pytest.mark.parametrize("delimiter", ["step", "newline", "blank_line"])
@pytest.mark.parametrize("kind,path", [("gsm8k", GSM8K), ("math", MATH)])
def test_real_demonstrations_are_what_the_reward_stage_parses(kind, path, delimiter):
    records, _ = load_examples(kind, path, limit=60)
    assert len(records) == 60 and all(r.solution for r in records)
    for r in records:
        steps, _ = demos.STEP_RULES[kind](r.solution)
        text = demos.demonstration(kind, r.solution, delimiter, answer=r.answers[0])
        assert format_reward(text, delimiter=delimiter) == 1.0, text
        assert len(step_spans_text(text, delimiter=delimiter)) == len(steps), text
        assert extract_answer(text) == r.answers[0], (text, r.answers)
        own = extract_answer(demos.demonstration(kind, r.solution, delimiter))
        assert own == demos.STEP_RULES[kind](r.solution)[1]


def test_math500_problems_are_never_demonstrations():
    from migjax.warmstart import demo_texts

    c = helpers.make_config("math_qwen", helpers.shrink("math_qwen", model_path="/unused"))
    c.task.train_limit = 0  # the whole training file
    c.warmstart.steps, c.warmstart.batch_size = 400, 16
    prompts, completions = demo_texts(c, lambda q: q)
    banned, _ = load_examples("math", c.task.exclude_path)
    norm = lambda s: " ".join(s.split())
    assert not {norm(p) for p in prompts} & {norm(e.question) for e in banned}
    assert len(prompts) == 6400 and all(format_reward(t) == 1.0 for t in completions[:200])


def test_cold_start_of_a_model_directory_resumes_and_feeds_rl(tmp_path, tiny_model,
                                                               compile_cache, monkeypatch):
    from migjax import experiment as ex
    from migjax import trainer, warmstart

    ov = helpers.shrink("gsm8k_qwen", model_path=tiny_model, warmstart__steps=4,
                        warmstart__batch_size=2, warmstart__max_len=512,
                        warmstart__checkpoint_every=2, warmstart__lr=1e-3,
                        checkpoint__async_save=False)
    c = helpers.make_config("gsm8k_qwen", ov)
    tok = ex.build_tokenizer(c, str(tmp_path))
    mesh = ex.build_mesh(c)
    once = warmstart.run_warmstart(c, str(tmp_path / "a"), tok, mesh)

    # a crash in step 4: checkpoint 2 is on disk, the model is not
    real = warmstart.make_sft_step

    def crashing(*a, **kw):
        fn, calls = real(*a, **kw), []

        def step(*args):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return fn(*args)
        return step

    monkeypatch.setattr(warmstart, "make_sft_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        warmstart.run_warmstart(c, str(tmp_path / "b"), tok, mesh)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "b" / "sft_checkpoints")) == ["2"]
    (tmp_path / "b" / "sft_model").mkdir()  # an interrupted save: a folder without config.json
    resumed = warmstart.run_warmstart(c, str(tmp_path / "b"), tok, mesh)
    a, b = load_file(os.path.join(once, "model.safetensors")), load_file(
        os.path.join(resumed, "model.safetensors"))
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], base[k]) for k in a)
    # the loss of every step, once: the resumed run dropped the step logged after checkpoint 2
    logs = {r: [json.loads(x) for x in open(tmp_path / r / warmstart.SFT_METRICS)]
            for r in ("a", "b")}
    assert [x["step"] for x in logs["a"]] == [x["step"] for x in logs["b"]] == [1, 2, 3, 4]
    assert [x["sft/loss"] for x in logs["a"]] == [x["sft/loss"] for x in logs["b"]]
    assert all(np.isfinite(x["sft/loss"]) and x["update/skipped"] == 0 for x in logs["a"])

    # RL starts from the cold-started model by config: warmstart.steps > 0 and init_from_sft
    rl = dict(ov, **{"model.init_from_sft": True, "rl.steps": 1})
    summary = trainer.train(helpers.make_config("gsm8k_qwen", rl), str(tmp_path / "a"))
    assert summary["steps"] == 1
    assert '"init_from_sft": true' in (tmp_path / "a" / "config.json").read_text()
