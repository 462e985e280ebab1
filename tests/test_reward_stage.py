"""The reward stage on real arithmetic text: a forced completion prefix (`task.completion_prefix`)
and the step delimiter reach segmentation, the format reward and the update's credit."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from migjax.data.arith import ArithTask, arith_spec, format_prompt
from migjax.data.tokenizer import build_arith_tokenizer, token_strings
from migjax.models import PRESETS
from migjax.rewards.stage import MigRules, RewardStage, scoring_shapes
from migjax.rewards.verify import Verifier
from migjax.types import Rollout
from migjax.update import UpdateHParams, credit

PREFIX = "<think>\n"
PROBE = "\n</think>\n<answer>"
CFG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tok = build_arith_tokenizer(str(tmp_path_factory.mktemp("tok")))
    items = [ArithTask(arith_spec("train"))[i] for i in range(4)]
    verifier = Verifier(timeout_s=2.0)
    yield tok, items, verifier, random_params(CFG.replace(vocab_size=len(tok)))
    verifier.close()


def rollout_of(tok, prompts, completions) -> Rollout:
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    p_ids, c_ids = [enc(p) for p in prompts], [enc(c) for c in completions]
    pad, n = tok.pad_token_id, len(prompts)
    p_len, c_len = max(map(len, p_ids)), max(map(len, c_ids))
    prompt = np.full((n, p_len), pad, np.int32)
    tokens = np.full((n, c_len), pad, np.int32)
    for i in range(n):
        prompt[i, p_len - len(p_ids[i]):] = p_ids[i]
        tokens[i, :len(c_ids[i])] = c_ids[i]
    mask = np.arange(c_len)[None] < np.array([len(c) for c in c_ids])[:, None]
    return Rollout(jnp.asarray(prompt), jnp.asarray(prompt != pad), jnp.asarray(tokens),
                   jnp.asarray(mask), jnp.zeros((n, c_len)), jnp.zeros((n,), bool))


def run_stage(case, prompts, completions, *, prefix="", delimiter="step", fast=True):
    tok, items, verifier, (graphdef, params) = case
    stage = RewardStage(tok, token_strings(tok, size=len(tok)), probe=PROBE, verifier=verifier,
                        completion_prefix=prefix,
                        rules=MigRules(max_steps=6, delimiter=delimiter, chunk=16, fast=fast))
    answers = [tok.encode(it.answer, add_special_tokens=False) for it in items]
    width = max(map(len, answers))
    ans = np.zeros((len(items), 1, width), np.int32)
    ans_mask = np.zeros(ans.shape, bool)
    for i, a in enumerate(answers):
        ans[i, 0, :len(a)], ans_mask[i, 0, :len(a)] = a, True
    return stage(graphdef, params, rollout_of(tok, prompts, completions), ans, ans_mask,
                 [(it.answer,) for it in items], group_size=1)


def test_forced_think_prefix_keeps_steps_format_and_credit(case):
    _, items, _, _ = case
    assert all(it.solution.startswith(PREFIX) for it in items)
    prompts = [format_prompt(it.question) + PREFIX for it in items]
    completions = [it.solution[len(PREFIX):] for it in items]
    batch, info = run_stage(case, prompts, completions, prefix=PREFIX)
    np.testing.assert_array_equal(np.asarray(batch.num_steps_N), [len(it.steps) for it in items])
    np.testing.assert_array_equal(np.asarray(batch.r_format_N), 1.0)
    np.testing.assert_array_equal(np.asarray(batch.r_correct_N), 1.0)
    assert all(t.startswith(PREFIX) for t in info["texts"])
    # the prompt already holds <think>: prefix_0 is empty, and the CoT starts at token 0
    cuts = np.asarray(info["seg"].cuts_NxK1)
    assert (cuts[:, 0] == 0).all() and (cuts[:, 1] > 0).all()
    assert np.asarray(batch.cot_mask_NxC)[:, 0].all()
    streams, _, _ = credit(batch._replace(r_correct_N=jnp.asarray([1.0, 0.0, 1.0, 0.0])),
                           UpdateHParams(group_size=2))
    assert np.asarray(streams.mask_process_NxC).sum() > 0
    # the fast pass agrees with the naive one on these cuts
    naive, _ = run_stage(case, prompts, completions, prefix=PREFIX, fast=False)
    np.testing.assert_allclose(np.asarray(batch.l_NxK1), np.asarray(naive.l_NxK1), atol=2e-5)
    # without telling the stage about the prefix, nothing would be credited or formatted
    blind, _ = run_stage(case, prompts, completions)
    assert not np.asarray(blind.num_steps_N).any() and not np.asarray(blind.r_format_N).any()


@pytest.mark.parametrize("delimiter", ["newline", "blank_line"])
def test_line_delimiters_pass_the_format_gate(case, delimiter):
    _, items, _, _ = case
    sep = "\n" if delimiter == "newline" else "\n\n"
    completions = ["<think>\n" + sep.join(s.split(": ", 1)[1] for s in it.steps)
                   + f"\n</think>\n<answer>{it.answer}</answer>" for it in items]
    assert not any("Step" in c for c in completions)
    prompts = [format_prompt(it.question) for it in items]
    batch, _ = run_stage(case, prompts, completions, delimiter=delimiter)
    np.testing.assert_array_equal(np.asarray(batch.r_format_N), 1.0)
    np.testing.assert_array_equal(np.asarray(batch.num_steps_N), [len(it.steps) for it in items])
    step_rule, _ = run_stage(case, prompts, completions, delimiter="step")
    assert not np.asarray(step_rule.r_format_N).any()


def test_scoring_shapes_buckets_prefixes_and_columns():
    cuts = np.array([[0, 5, 9, 9, 9, 9, 9], [0, 3, 3, 3, 3, 3, 3]], np.int32)
    # two steps at most: 3 prefixes (a bucket of 2^i + 1); the largest cut 9 -> a quarter of 72
    assert scoring_shapes(cuts, np.array([2, 1]), 72) == (3, 24)
    assert scoring_shapes(cuts, np.array([4, 1]), 72) == (5, 24)
    assert scoring_shapes(cuts, np.array([6, 1]), 72) == (7, 24)  # capped at max_steps + 1
    assert scoring_shapes(np.minimum(cuts * 6, 72), np.array([6, 1]), 72) == (7, 72)
    assert scoring_shapes(np.zeros((2, 7), np.int32), np.zeros(2), 72) == (2, 24)  # no CoT at all
    assert scoring_shapes(cuts, np.array([2, 1]), 12) == (3, 12)  # never past the completion


def test_trimmed_likelihood_pass_equals_the_full_one(case):
    """Short chains, one completion without a CoT and padded columns past every cut: the stage
    scores fewer prefixes and columns, and l_NxK1 still equals the naive pass on all K1."""
    tok, items, _, _ = case
    prompts = [format_prompt(it.question) for it in items]
    completions = [it.solution for it in items]
    completions[0] = "<answer>" + items[0].answer + "</answer>"  # no CoT
    completions[1] = completions[1] + " and then some words after the answer " * 3
    batch, info = run_stage(case, prompts, completions)
    seg = info["seg"]
    k1, cols = scoring_shapes(seg.cuts_NxK1, seg.num_steps_N, batch.tokens_NxC.shape[1])
    assert k1 < seg.cuts_NxK1.shape[1] and cols < batch.tokens_NxC.shape[1]
    assert np.asarray(batch.l_NxK1).shape == seg.cuts_NxK1.shape
    naive, _ = run_stage(case, prompts, completions, fast=False)
    np.testing.assert_allclose(np.asarray(batch.l_NxK1), np.asarray(naive.l_NxK1), atol=2e-5)
