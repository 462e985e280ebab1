"""Tests for aggregation, the PPO surrogate, KL estimators, dual-gated SFT and the objective
(migjax.losses)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from migjax.losses import (
    aggregate,
    kl_penalty,
    objective,
    ppo_surrogate,
    sft_gate,
    sft_loss,
    token_entropy,
)

X_NxC = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32)
M_NxC = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 7 / 3),
        ("seq_mean_token_mean", (1.5 + 4.0) / 2),  # the empty third sequence does not count
        ("seq_mean_token_sum_norm", 7 / 9),
    ],
)
def test_aggregate_hand_computed(mode, expected):
    fn = jax.jit(aggregate, static_argnames="mode")
    np.testing.assert_allclose(fn(X_NxC, M_NxC, mode=mode), expected, rtol=1e-6)
    assert float(aggregate(X_NxC, np.zeros_like(M_NxC), mode)) == 0.0


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(X_NxC, M_NxC, "sum")


RATIOS = np.array([[1.5, 1.5, 0.5, 0.5, 1.1, 1.25]], np.float32)
ADV = np.array([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0]], np.float32)


def test_ppo_clip_both_sides_asymmetric():
    logp = np.log(RATIOS) - 1.0
    old = np.full_like(logp, -1.0)
    mask = np.ones_like(logp, bool)
    fn = jax.jit(
        functools.partial(ppo_surrogate, eps_low=0.2, eps_high=0.28, aggregation="token_mean")
    )
    loss, stats = fn(logp, old, ADV, mask)
    # per token: -1.28 (clipped high), 1.5, -0.5, 0.8 (clipped low), -2.2, -1.25 (inside 1.28)
    per_token = np.array([-1.28, 1.5, -0.5, 0.8, -2.2, -1.25])
    np.testing.assert_allclose(loss, per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["clipfrac"], 2 / 6, rtol=1e-6)
    k3 = (RATIOS - 1) - np.log(RATIOS)
    np.testing.assert_allclose(stats["approx_kl"], k3.mean(), rtol=1e-5)
    # symmetric eps = 0.2 clips the first token at 1.2 and the 1.25 token too.
    loss, stats = ppo_surrogate(logp, old, ADV, mask, eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(loss, (per_token.sum() + (1.28 - 1.2) + (1.25 - 1.2)) / 6, rtol=1e-5)
    np.testing.assert_allclose(stats["clipfrac"], 3 / 6, rtol=1e-6)
    # clipped tokens get no gradient; the others get -A * ratio.
    grad = jax.grad(lambda lp: ppo_surrogate(lp, old, ADV, mask, eps_high=0.28)[0])(logp)
    expected = np.array([0.0, 1.5, -0.5, 0.0, -2.2, -1.25]) / 6
    np.testing.assert_allclose(grad[0], expected, rtol=1e-5, atol=1e-7)


def test_kl_estimators_hand_computed():
    logp = np.array([[-1.0, -2.5, -3.0]], np.float32)
    ref = np.array([[-2.0, -2.0, -3.0]], np.float32)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [[1.0, -0.5, 0.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [[0.5, 0.125, 0.0]])
    k3 = [[np.exp(-1.0) + 1.0 - 1.0, np.exp(0.5) - 0.5 - 1.0, 0.0]]
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), k3, rtol=1e-6)
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_sft_gates():
    correct = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    fmt = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    gains = np.array([0.2, 0.5, 0.3, 0.0, 0.1])
    assert sft_gate(correct, fmt, gains).tolist() == [True, False, False, True, False]
    both = sft_gate(correct, fmt, gains, gates=("correct", "mig_positive"))
    assert both.tolist() == [True, True, False, False, False]
    assert sft_gate(correct, fmt, gains, gates=()).tolist() == [True] * 5
    with pytest.raises(ValueError, match="SFT gate"):
        sft_gate(correct, fmt, gains, gates=("length",))


def test_sft_loss_normalises_over_passing_only():
    logp = -X_NxC
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)
    passing = np.array([True, False, True])
    np.testing.assert_allclose(sft_loss(logp, mask, passing, "token_mean"), 10 / 3, rtol=1e-6)
    np.testing.assert_allclose(
        sft_loss(logp, mask, passing, "seq_mean_token_mean"), (1.5 + 7) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        sft_loss(logp, mask, passing, "seq_mean_token_sum_norm"), 10 / (2 * 3), rtol=1e-6
    )


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_sft_loss_zero_when_nothing_passes(mode):
    logp = np.array([[-1.0, -np.inf], [-2.0, -3.0]], np.float32)
    mask = np.ones_like(logp, bool)
    passing = np.zeros(2, bool)
    loss, grad = jax.value_and_grad(sft_loss)(jnp.asarray(logp), mask, passing, mode)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def tiny_policy(seed=0, n=3, c=5, v=7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(n, c))
    adv = rng.normal(size=(n, c)).astype(np.float32)
    mask = rng.random((n, c)) < 0.7
    mask[0, 0] = True
    return jnp.asarray(logits), tokens, adv, mask


def sampled_logp(logits_NxCxV, tokens_NxC):
    logp_all = jax.nn.log_softmax(logits_NxCxV, axis=-1)
    return jnp.take_along_axis(logp_all, tokens_NxC[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_gradient_at_ratio_one_is_reinforce(eps_low, eps_high):
    logits, tokens, adv, mask = tiny_policy()

    def loss_fn(lg):
        logp = sampled_logp(lg, tokens)
        old = jax.lax.stop_gradient(logp)
        loss, _ = ppo_surrogate(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
        return loss

    grad = np.asarray(jax.grad(loss_fn)(logits))
    # REINFORCE: -sum_t A_t grad log pi(y_t) / #tokens, with grad_logits log softmax(y) =
    # onehot(y) - softmax.
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    onehot = np.eye(logits.shape[-1])[tokens]
    weight = np.where(mask, adv, 0.0) / mask.sum()
    expected = -weight[..., None] * (onehot - probs)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert np.all(grad[~mask] == 0.0)


def test_masked_tokens_get_exactly_zero_gradient_even_when_not_finite():
    logits, tokens, adv, mask = tiny_policy(seed=1)
    logp = np.asarray(sampled_logp(logits, tokens))
    old = logp - 0.1
    junk = np.where(np.arange(logp.shape[1]) % 2 == 0, np.nan, -np.inf)
    logp_bad = np.where(mask, logp, junk).astype(np.float32)
    adv_bad = np.where(mask, adv, np.nan).astype(np.float32)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        fn = lambda lp, m=mode: ppo_surrogate(lp, old, adv_bad, mask, aggregation=m)[0]
        loss, grad = jax.value_and_grad(fn)(jnp.asarray(logp_bad))
        assert np.isfinite(loss)
        assert np.all(np.asarray(grad)[~mask] == 0.0)
        assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad)[mask] != 0.0)


def test_objective_combines_terms():
    logits, tokens, adv, mask = tiny_policy(seed=2)
    logp = sampled_logp(logits, tokens)
    old = logp + 0.05
    ref = logp - 0.3
    cot = mask.copy()
    cot[:, -2:] = False
    passing = np.array([True, False, True])
    kw = dict(eps_low=0.2, eps_high=0.28, aggregation="seq_mean_token_mean")
    total, metrics = jax.jit(
        functools.partial(objective, alpha=0.5, beta=2.0, gamma=0.1, kl_coef=0.05, **kw)
    )(logp, old, adv, cot, -adv, mask, mask, passing, ref_logp_NxC=ref)
    l_proc, _ = ppo_surrogate(logp, old, adv, cot, **kw)
    l_out, s_out = ppo_surrogate(logp, old, -adv, mask, **kw)
    l_sft = sft_loss(logp, mask, passing, "seq_mean_token_mean")
    l_kl = aggregate(kl_penalty(logp, ref, "k3"), mask, "seq_mean_token_mean")
    np.testing.assert_allclose(l_kl, np.exp(-0.3) + 0.3 - 1.0, rtol=1e-4)
    expected = 0.5 * l_proc + 2.0 * l_out + 0.1 * l_sft + 0.05 * l_kl
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/kl"], l_kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["policy/clipfrac"], s_out["clipfrac"])
    np.testing.assert_allclose(metrics["sft/pass_frac"], 2 / 3)
    # an all-False process mask (coupled ablation) contributes nothing.
    total, metrics = objective(
        logp, old, adv, np.zeros_like(mask), -adv, mask, mask, passing, gamma=0.0
    )
    assert float(metrics["loss/process"]) == 0.0
    np.testing.assert_allclose(total, ppo_surrogate(logp, old, -adv, mask)[0], rtol=1e-6)


def test_token_entropy():
    np.testing.assert_allclose(
        token_entropy(jnp.zeros((2, 3, 8))), np.full((2, 3), np.log(8)), rtol=1e-6
    )
    logits = jnp.array([[[0.0, -1e9]]])
    np.testing.assert_allclose(token_entropy(logits), [[0.0]], atol=1e-6)
