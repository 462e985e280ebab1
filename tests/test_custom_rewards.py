"""User reward functions by name (`reward.custom`): TRL's signature, weights, worker-process
isolation with a time limit (a raising or hanging function gives 0 for its items and is
counted), a one-line start-up error for a name that does not import, and the outcome
advantage of the update built from r_correct + w_format * r_format + r_custom."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from migjax import advantages as adv_lib
from migjax.rewards.custom import CustomRewards, load_function
from migjax.rewards.stage import MigRules, RewardStage
from migjax.types import Rollout
from migjax.update import credit
from tests.test_variants import batch_with_structure, hparams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE = '''
import time

def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]

def uses_columns(prompts, completions, answer, references, prediction, correct, **kw):
    return [float(p == a) + 10 * c + 100 * (len(r) == 2) for p, a, r, c in
            zip(prediction, answer, references, correct)]

def fragile(prompts, completions, **kw):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    if any("hang" in c for c in completions):
        time.sleep(60)
    return [1.0] * len(completions)

def wrong_length(prompts, completions, **kw):
    return [1.0]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_weighted_sum_and_columns(reward_module):
    r = CustomRewards([f"{reward_module}:length", f"{reward_module}:uses_columns"], [0.5, 1.0])
    try:
        out = r(["p1", "p2"], ["abcd", "xy"], answer=["4", "5"], references=[["4"], ["5", "5.0"]],
                prediction=["4", None], correct=[1.0, 0.0])
    finally:
        r.close()
    np.testing.assert_allclose(out, [0.5 * 4 + 1 + 10, 0.5 * 2 + 0 + 100])
    assert r.n_failed == 0 and r.n_timeouts == 0


def test_failures_give_zero_per_item_and_are_counted(reward_module):
    r = CustomRewards([f"{reward_module}:fragile"], [2.0], timeout_s=1.0)
    try:
        out = r(["p"] * 4, ["ok", "boom", "hang", "fine"], answer=[""] * 4)
        assert r.n_failed == 2 and r.n_timeouts == 1  # the batch raised; "hang" alone timed out
        np.testing.assert_allclose(out, [2.0, 0.0, 0.0, 2.0])
        np.testing.assert_allclose(r(["p"], ["again"], answer=[""]), [2.0])  # a fresh worker
    finally:
        r.close()
    bad = CustomRewards([f"{reward_module}:wrong_length"], [1.0])
    try:
        np.testing.assert_allclose(bad(["p"] * 3, ["a", "b", "c"]), [1.0, 1.0, 1.0])
        assert bad.n_failed == 0  # one item at a time, a one-element list is right
        np.testing.assert_allclose(bad(["p"], ["a"]), [1.0])
    finally:
        bad.close()


@pytest.mark.parametrize("name,match", [
    ("no_such_module_xyz:fn", r"reward\.custom\[0\]='no_such_module_xyz:fn': cannot import"),
    ("my_rewards:missing", r"cannot import it \(AttributeError"),
    ("my_rewards:NOT_A_FUNCTION", "is not callable"),
    ("my_rewards.length", "expected 'package.module:function'"),
])
def test_bad_names_fail_at_start_up(reward_module, name, match):
    with pytest.raises(ValueError, match=match):
        CustomRewards([name], [1.0])
    assert load_function(f"{reward_module}:length")([""], ["ab"]) == [2.0]


def test_bad_name_on_the_command_line_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "migjax.main", "--config=arith_tiny", f"--workdir={tmp_path}/w",
         "--config.reward.custom=('no_such_module_xyz:fn',)",
         "--config.reward.custom_weights=(0.5,)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "reward.custom[0]='no_such_module_xyz:fn': cannot import" in lines[0]
    assert not (tmp_path / "w").exists()


class _CharTokenizer:
    def encode(self, s, add_special_tokens=False):
        return [ord(ch) for ch in s]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_reward_stage_passes_prompts_completions_and_columns(reward_module):
    def arr(texts, width):
        ids = np.zeros((len(texts), width), np.int32)
        mask = np.zeros((len(texts), width), bool)
        for i, t in enumerate(texts):
            ids[i, width - len(t):], mask[i, width - len(t):] = [ord(ch) for ch in t], True
        return ids, mask

    custom = CustomRewards([f"{reward_module}:uses_columns", f"{reward_module}:length"],
                           [1.0, 1.0])
    stage = RewardStage(_CharTokenizer(), [chr(i) for i in range(256)], probe="</think>",
                        rules=MigRules(), verifier=None, custom=custom)
    prompt, pmask = arr(["Q1", "Q1"], 4)
    toks, tmask = arr(["<answer>7</answer>", "<answer>8</answer>"], 20)
    rollout = Rollout(prompt, pmask, toks, tmask, np.zeros(toks.shape, np.float32),
                      np.zeros((2,), bool))
    texts = stage.texts(toks, tmask)
    try:
        r_N = stage.custom_rewards(rollout, texts, [("7",), ("7",)], ["7", "8"],
                                   np.array([1.0, 0.0]))
    finally:
        custom.close()
    np.testing.assert_allclose(r_N, [1 + 10 + len(texts[0]), 0 + len(texts[1])])


def test_custom_reward_enters_the_outcome_advantage():
    hp = dataclasses.replace(hparams("grpo_matched"), w_format=0.1)
    batch = batch_with_structure()
    r_custom_N = jnp.asarray([0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, -2.0])
    streams, _, stats = credit(batch._replace(r_custom_N=r_custom_N), hp)
    r_out_N = batch.r_correct_N + 0.1 * batch.r_format_N + r_custom_N
    expected_N = adv_lib.group_advantages(r_out_N, hp.group_size, estimator=hp.estimator,
                                          std_normalize=hp.std_normalize,
                                          unbiased_std=hp.unbiased_std)
    adv_NxC = np.asarray(streams.adv_outcome_NxC)
    mask_NxC = np.asarray(streams.mask_outcome_NxC)
    for n in range(8):
        np.testing.assert_allclose(adv_NxC[n][mask_NxC[n]], float(expected_N[n]), rtol=1e-5)
    without, _, _ = credit(batch, hp)
    assert not np.allclose(np.asarray(without.adv_outcome_NxC), adv_NxC)
    assert float(stats["reward/custom"]) == pytest.approx(0.25)


def test_custom_weights_must_match():
    from migjax.config_checks import validate
    from migjax.configs import arith_tiny

    c = arith_tiny.get_config()
    c.reward.custom = ("a.b:f",)
    with pytest.raises(ValueError, match="reward.custom_weights has 0 weights"):
        validate(c, 1)
    c.reward.custom_weights = (0.5,)
    validate(c, 1)


@pytest.mark.slow
def test_a_run_with_custom_rewards_and_masked_truncation(tmp_path, reward_module, tiny_model,
                                                        compile_cache):
    """Two RL steps of a shrunk real-data recipe with a custom reward (every completion's length)
    and `rl.mask_truncated`: the reward reaches the logged outcome reward and nothing fails."""
    import helpers

    from migjax import trainer

    ov = helpers.shrink("smollm2_gsm8k", model_path=tiny_model, rl__steps=2,
                        sampler__max_new_tokens=16)
    ov.update({"reward.custom": (f"{reward_module}:length",), "reward.custom_weights": (0.01,),
               "rl.mask_truncated": True})
    c = helpers.make_config("smollm2_gsm8k", ov)
    with helpers.recording() as rec:
        trainer.train(c, str(tmp_path / "run"))
    assert rec["steps"] == [1, 2]
    for m in rec["metrics"]:
        assert m["reward/custom"] > 0.0 and m["reward/custom_failed"] == 0.0
        assert m["reward/outcome"] == pytest.approx(
            m["reward/correct"] + 0.1 * m["reward/format"] + m["reward/custom"], rel=1e-5)
        assert m["rollout/truncated_frac"] > 0.0  # 16 tokens: random completions run out
        assert np.isfinite(m["loss/total"])
