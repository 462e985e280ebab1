"""Tests for the Monotonic Historical Watermark (migjax.rewards.watermark)."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.rewards.watermark import (
    end_of_cot,
    gain_sum,
    watermark,
    zero_gain_step_frac,
)

N, K = 4, 6


@functools.partial(jax.jit, static_argnames=("h0", "monotonic"))
def _wm(l_NxK1, step_mask_NxK, h0="l0", monotonic=True):
    return watermark(l_NxK1, step_mask_NxK, h0=h0, monotonic=monotonic)


def reference(l_row, num_steps, h0, monotonic):
    """Plain-python loop over the valid steps of one completion."""
    h = [l_row[0] if h0 == "l0" else 0.0]
    g = []
    for k in range(1, len(l_row)):
        if k <= num_steps:
            g.append(max(0.0, l_row[k] - h[-1]) if monotonic else l_row[k] - h[-1])
            h.append(max(h[-1], l_row[k]) if monotonic else l_row[k])
        else:
            g.append(0.0)
            h.append(h[-1])
    return np.array(h), np.array(g)


def test_detour_and_recovery_only_credits_the_new_high():
    l_NxK1 = np.array([[0.0, -1.0, -2.0, -1.0, 0.0, 0.5]], np.float32)
    wm = _wm(l_NxK1, np.ones((1, 5), bool))
    np.testing.assert_allclose(wm.g_NxK[0], [0, 0, 0, 0, 0.5])
    np.testing.assert_allclose(wm.h_NxK1[0], [0, 0, 0, 0, 0, 0.5])
    np.testing.assert_allclose(gain_sum(wm), [0.5])
    np.testing.assert_allclose(zero_gain_step_frac(wm), 0.8)
    # without the watermark the detour is punished and the recovery paid back.
    wm = _wm(l_NxK1, np.ones((1, 5), bool), monotonic=False)
    np.testing.assert_allclose(wm.g_NxK[0], [-1, -1, 1, 1, 0.5])
    np.testing.assert_allclose(wm.h_NxK1[0], l_NxK1[0])
    np.testing.assert_allclose(gain_sum(wm), [0.5])


def test_h0_modes_and_padding_hand_computed():
    l_NxK1 = np.array([[0.2, 0.5, 0.3, 0.9, 7.0], [-2.0, -1.5, -3.0, 0.0, 0.0]], np.float32)
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    wm = _wm(l_NxK1, mask)
    np.testing.assert_allclose(wm.g_NxK, [[0.3, 0, 0.4, 0], [0.5, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(wm.h_NxK1, [[0.2, 0.5, 0.5, 0.9, 0.9], [-2, -1.5, -1.5, -1.5, -1.5]])
    wm = _wm(l_NxK1, mask, h0="zero")
    np.testing.assert_allclose(wm.g_NxK, [[0.5, 0, 0.4, 0], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(wm.h_NxK1, [[0, 0.5, 0.5, 0.9, 0.9], [0, 0, 0, 0, 0]])
    wm = _wm(l_NxK1, mask, h0="zero", monotonic=False)
    np.testing.assert_allclose(wm.g_NxK, [[0.5, -0.2, 0.6, 0], [-1.5, -1.5, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(wm.h_NxK1, [[0, 0.5, 0.3, 0.9, 0.9], [0, -1.5, -3, -3, -3]])
    np.testing.assert_allclose(zero_gain_step_frac(wm), 3 / 5)
    assert wm.g_NxK.dtype == np.float32 and wm.step_mask_NxK.dtype == bool


def test_end_of_cot():
    l_NxK1 = np.array([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]], np.float32)
    np.testing.assert_allclose(end_of_cot(l_NxK1, np.array([1, 0, 2])), [0.2, 1.0, 7.0])


def test_no_valid_step():
    wm = _wm(np.zeros((2, 4), np.float32), np.zeros((2, 3), bool))
    assert float(zero_gain_step_frac(wm)) == 0.0
    np.testing.assert_array_equal(gain_sum(wm), [0.0, 0.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="h0"):
        watermark(np.zeros((1, 3)), np.ones((1, 2), bool), h0="max")
    with pytest.raises(ValueError, match="step_mask_NxK"):
        watermark(np.zeros((1, 3)), np.ones((1, 3), bool))


# XLA on CPU flushes subnormal floats to zero, so a subnormal log-likelihood can
# come back as 0 after a max; real log-likelihoods are never that close to zero.
values = st.floats(-6.0, 1.0, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    lik=st.lists(values, min_size=N * (K + 1), max_size=N * (K + 1)),
    junk=st.lists(values, min_size=N * (K + 1), max_size=N * (K + 1)),
    steps=st.lists(st.integers(0, K), min_size=N, max_size=N),
    h0=st.sampled_from(["l0", "zero"]),
    monotonic=st.booleans(),
)
def test_properties(lik, junk, steps, h0, monotonic):
    l_NxK1 = np.array(lik, np.float32).reshape(N, K + 1)
    steps_N = np.array(steps)
    mask_NxK = np.arange(1, K + 1)[None] <= steps_N[:, None]
    wm = _wm(l_NxK1, mask_NxK, h0=h0, monotonic=monotonic)
    g, h = np.asarray(wm.g_NxK), np.asarray(wm.h_NxK1)
    for n in range(N):
        h_ref, g_ref = reference(l_NxK1[n].astype(np.float64), steps[n], h0, monotonic)
        np.testing.assert_allclose(h[n], h_ref, atol=1e-6)
        np.testing.assert_allclose(g[n], g_ref, atol=1e-5)
    h0_N = l_NxK1[:, 0] if h0 == "l0" else np.zeros(N)
    if monotonic:
        assert np.all(g >= 0)
        assert np.all(np.diff(h, axis=1) >= 0)
        best_N = np.array([max([h0_N[n], *l_NxK1[n, 1 : steps[n] + 1]]) for n in range(N)])
        np.testing.assert_allclose(g.sum(1), best_N - h0_N, atol=1e-5)
    else:
        last_N = np.where(steps_N > 0, l_NxK1[np.arange(N), steps_N], h0_N)
        np.testing.assert_allclose(g.sum(1), last_N - h0_N, atol=1e-5)
    assert np.all(g[~mask_NxK] == 0)
    # padding never changes the valid part.
    junk_NxK1 = np.array(junk, np.float32).reshape(N, K + 1)
    pad_NxK1 = np.concatenate([np.zeros((N, 1), bool), ~mask_NxK], axis=1)
    wm2 = _wm(np.where(pad_NxK1, junk_NxK1, l_NxK1), mask_NxK, h0=h0, monotonic=monotonic)
    np.testing.assert_array_equal(wm2.g_NxK, g)
    np.testing.assert_array_equal(wm2.h_NxK1, h)
    np.testing.assert_array_equal(end_of_cot(l_NxK1, steps_N), l_NxK1[np.arange(N), steps_N])
