"""Tests for group-relative advantages and decoupled masking (migjax.advantages)."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.advantages import (
    combine_streams,
    group_advantages,
    sequence_process_advantages,
    stepwise_advantages,
    token_process_advantages,
)

EPS = 1e-6
STD = np.sqrt(3.5)  # population std of [1, 2, 3, 6]


@pytest.mark.parametrize(
    "estimator, std_normalize, expected",
    [
        ("grpo", True, np.array([-2, -1, 0, 3]) / (STD + EPS)),
        ("grpo", False, [-2, -1, 0, 3]),
        ("rloo", True, np.array([-8 / 3, -4 / 3, 0, 4]) / (STD + EPS)),
        ("rloo", False, [-8 / 3, -4 / 3, 0, 4]),
        ("dr_grpo", True, [-2, -1, 0, 3]),
        ("dr_grpo", False, [-2, -1, 0, 3]),
    ],
)
def test_group_estimators_hand_computed(estimator, std_normalize, expected):
    # second group is constant: exactly zero for every estimator.
    r_N = np.array([1.0, 2.0, 3.0, 6.0, 0.1, 0.1, 0.1, 0.1], np.float32)
    fn = jax.jit(
        functools.partial(
            group_advantages, group_size=4, estimator=estimator, std_normalize=std_normalize
        )
    )
    adv_N = np.asarray(fn(r_N))
    np.testing.assert_allclose(adv_N[:4], expected, rtol=1e-5, atol=1e-6)
    assert np.all(adv_N[4:] == 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=6, max_size=6))
def test_rloo_is_leave_one_out(rewards):
    r_N = np.array(rewards, np.float32)
    adv_N = np.asarray(group_advantages(r_N, 3, estimator="rloo", std_normalize=False))
    for n in range(6):
        g0 = 3 * (n // 3)
        others = [r_N[j] for j in range(g0, g0 + 3) if j != n]
        expected = r_N[n] - np.mean(others) if len(set(rewards[g0 : g0 + 3])) > 1 else 0.0
        np.testing.assert_allclose(adv_N[n], expected, atol=1e-5)


def test_zero_variance_and_single_sample_groups():
    r_N = np.full(4, 0.3, np.float32)
    for estimator in ("grpo", "rloo", "dr_grpo"):
        adv = group_advantages(r_N, 2, estimator=estimator)
        assert np.all(np.asarray(adv) == 0.0) and np.all(np.isfinite(adv))
    assert np.all(np.asarray(group_advantages(np.arange(3.0), 1)) == 0.0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.arange(3.0), 1, estimator="rloo")
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(np.arange(5.0), 2)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(np.arange(4.0), 2, estimator="ppo")


# Worked example: G = 2, K = 3, the last step of sample 1 is padding (its 100.0 must not count).
G_NxK = np.array([[0.5, 0.0, 0.2], [0.1, 0.3, 100.0]], np.float32)
MASK_NxK = np.array([[True, True, True], [True, True, False]])


def test_stepwise_hand_computed():
    # credits [0.5, 0, 0.2 | 0.1, 0.3]: mean 0.22, population variance 0.0296.
    adv = stepwise_advantages(G_NxK, MASK_NxK, 2)
    expected = np.array([[0.28, -0.22, -0.02], [-0.12, 0.08, 0.0]]) / (np.sqrt(0.0296) + EPS)
    expected[1, 2] = 0.0
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    adv = stepwise_advantages(G_NxK, MASK_NxK, 2, std_normalize=False)
    np.testing.assert_allclose(adv, [[0.28, -0.22, -0.02], [-0.12, 0.08, 0.0]], atol=1e-6)


def test_stepwise_reward_to_go_hand_computed():
    # reward-to-go credits [0.7, 0.2, 0.2 | 0.4, 0.3]: mean 0.36, population variance 0.0344.
    adv = stepwise_advantages(G_NxK, MASK_NxK, 2, reward_to_go=True)
    expected = np.array([[0.34, -0.16, -0.16], [0.04, -0.06, 0.0]]) / (np.sqrt(0.0344) + EPS)
    expected[1, 2] = 0.0
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)


def test_stepwise_zero_variance_group_and_no_steps():
    g_NxK = np.array([[0.0, 0.0], [0.0, 0.0], [0.4, 0.0], [9.0, 9.0]], np.float32)
    mask = np.array([[True, True], [True, False], [False, False], [False, False]])
    adv = np.asarray(stepwise_advantages(g_NxK, mask, 2))
    assert np.all(adv == 0.0)
    # a group with a single valid step has no spread either.
    adv = np.asarray(stepwise_advantages(g_NxK[2:], np.array([[True, False], [False, False]]), 2))
    assert np.all(adv == 0.0)


STEP_ID_NxC = np.array([[0, 1, 1, 2, 3, 0, 0], [0, 1, 2, 2, 0, 0, 0]], np.int32)
COT_NxC = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]], bool)
FULL_NxC = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], bool)


def test_token_process_advantages_stepwise():
    adv_NxK = np.asarray(stepwise_advantages(G_NxK, MASK_NxK, 2))
    adv_NxC = token_process_advantages(
        "stepwise", G_NxK, MASK_NxK, STEP_ID_NxC, COT_NxC, group_size=2
    )
    a, b = adv_NxK[0], adv_NxK[1]
    expected = [[0, a[0], a[0], a[1], a[2], 0, 0], [0, b[0], b[1], b[1], 0, 0, 0]]
    np.testing.assert_allclose(adv_NxC, expected, atol=1e-7)


def test_token_process_advantages_trajectory():
    # R_mig = [0.7, 0.4]: mean 0.55, std 0.15 -> +-1 on every CoT token.
    adv_NxC = token_process_advantages(
        "trajectory", G_NxK, MASK_NxK, STEP_ID_NxC, COT_NxC, group_size=2
    )
    one = 0.15 / (0.15 + EPS)
    np.testing.assert_allclose(adv_NxC, np.where(COT_NxC, [[one], [-one]], 0.0), rtol=1e-5)
    seq = sequence_process_advantages("trajectory", G_NxK, MASK_NxK, 2)
    np.testing.assert_allclose(seq, [one, -one], rtol=1e-5)
    assert np.all(np.asarray(sequence_process_advantages("stepwise", G_NxK, MASK_NxK, 2)) == 0.0)
    with pytest.raises(ValueError, match="mode"):
        token_process_advantages("token", G_NxK, MASK_NxK, STEP_ID_NxC, COT_NxC, group_size=2)


def test_combine_streams_decoupled():
    adv_proc = np.where(COT_NxC, [[2.0], [-1.0]], 0.0) + 0.5  # junk outside the CoT
    streams = jax.jit(combine_streams)(adv_proc, np.array([3.0, -4.0]), COT_NxC, FULL_NxC)
    np.testing.assert_array_equal(streams.mask_process_NxC, COT_NxC)
    np.testing.assert_array_equal(streams.mask_outcome_NxC, FULL_NxC)
    np.testing.assert_allclose(streams.adv_process_NxC, np.where(COT_NxC, adv_proc, 0.0))
    np.testing.assert_allclose(streams.adv_outcome_NxC, np.where(FULL_NxC, [[3.0], [-4.0]], 0.0))
    # the answer tokens (in M_full, not in M_cot) carry only the outcome signal.
    answer = FULL_NxC & ~COT_NxC
    assert np.all(np.asarray(streams.adv_process_NxC)[answer] == 0.0)
    assert not np.asarray(streams.mask_process_NxC)[answer].any()


def test_combine_streams_coupled():
    adv_out = np.array([3.0, -4.0])
    # trajectory: the sequence's process advantage also applies outside the CoT.
    proc_seq = np.array([1.0, -1.0])
    adv_proc = np.where(COT_NxC, proc_seq[:, None], 0.0)
    fn = jax.jit(functools.partial(combine_streams, decoupled=False))
    streams = fn(adv_proc, adv_out, COT_NxC, FULL_NxC, proc_seq_N=proc_seq)
    np.testing.assert_allclose(streams.adv_outcome_NxC, np.where(FULL_NxC, [[4.0], [-5.0]], 0.0))
    np.testing.assert_array_equal(streams.mask_outcome_NxC, FULL_NxC)
    assert not np.asarray(streams.mask_process_NxC).any()
    assert np.all(np.asarray(streams.adv_process_NxC) == 0.0)
    # stepwise: per-token process advantages inside the CoT, 0 outside.
    adv_proc = np.array([[0, 1, 1, 2, 3, 0, 7], [0, 5, 6, 6, 0, 0, 7]], np.float32)
    streams = fn(adv_proc, adv_out, COT_NxC, FULL_NxC)
    expected = [[3, 4, 4, 5, 6, 3, 3], [-4, 1, 2, 2, -4, -4, 0]]
    np.testing.assert_allclose(streams.adv_outcome_NxC, expected)
