"""Policy losses: masked aggregation, the PPO-clipped surrogate, KL estimators, dual-gated SFT
and the full objective L = alpha L_process + beta L_outcome + gamma L_sft + kl_coef KL.

Pure jax.numpy, jittable with string options static. Masked tokens never feed their values into
the loss (they are replaced before any exp or log), so they receive exactly zero gradient even
when their log-probs are not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")
SFT_GATES = ("format", "correct", "mig_positive")


def aggregate(x_NxC: jax.Array, mask_NxC: jax.Array, mode: str) -> jax.Array:
    """Reduces per-token values to a scalar over the masked tokens.

    token_mean: sum(x m) / max(sum m, 1).
    seq_mean_token_mean: mean, over sequences with at least one token, of sum_t x m / sum_t m.
    seq_mean_token_sum_norm: sum(x m) / (N * C), C the static completion length (Dr.GRPO).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}")
    mask_NxC = jnp.asarray(mask_NxC, bool)
    xm_NxC = jnp.where(mask_NxC, x_NxC, 0.0)
    if mode == "token_mean":
        return jnp.sum(xm_NxC) / jnp.maximum(jnp.sum(mask_NxC), 1)
    if mode == "seq_mean_token_sum_norm":
        return jnp.sum(xm_NxC) / (x_NxC.shape[0] * x_NxC.shape[1])
    count_N = jnp.sum(mask_NxC, axis=1)
    seq_N = jnp.sum(xm_NxC, axis=1) / jnp.maximum(count_N, 1)
    has_N = count_N > 0
    return jnp.sum(jnp.where(has_N, seq_N, 0.0)) / jnp.maximum(jnp.sum(has_N), 1)


def masked_mean(x_NxC: jax.Array, mask_NxC: jax.Array) -> jax.Array:
    """Mean of x over the masked tokens (0 when the mask is empty)."""
    return aggregate(x_NxC, mask_NxC, "token_mean")


def ppo_surrogate(
    logp_NxC: jax.Array,
    old_logp_NxC: jax.Array,
    adv_NxC: jax.Array,
    mask_NxC: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clipped policy loss with ratio = pi / pi_old and clip range [1 - eps_low, 1 + eps_high].

    Per token: -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A), aggregated over the mask.
    Stats (token means over the mask, no gradient): clipfrac, the fraction of tokens where the
    clipped branch is the active one; approx_kl, the k3 estimate (ratio - 1) - log ratio.
    Both measure how far the policy moved from pi_old within one rollout's update: with one
    optimizer step per rollout (rl.epochs = rl.minibatches = 1, `update.update`'s `single`)
    pi_old is the policy being differentiated, the ratio is exactly 1, and both are 0 by
    construction. They become informative with several minibatches or epochs.
    """
    mask_NxC = jnp.asarray(mask_NxC, bool)
    log_ratio_NxC = jnp.where(mask_NxC, logp_NxC - old_logp_NxC, 0.0)
    adv_NxC = jnp.where(mask_NxC, adv_NxC, 0.0)
    ratio_NxC = jnp.exp(log_ratio_NxC)
    ratio = jax.lax.stop_gradient(ratio_NxC)
    clip_active = ((adv_NxC > 0) & (ratio > 1.0 + eps_high)) | (
        (adv_NxC < 0) & (ratio < 1.0 - eps_low)
    )
    # -min(ratio A, clip(ratio) A), with the branch chosen explicitly: where the clipped branch
    # is active it is a constant (no gradient), elsewhere the gradient is exactly A * ratio.
    # Written as a min of clip, a tie (ratio on a clip bound, e.g. ratio 1 with eps 0) would split
    # the gradient between the branches.
    clipped_NxC = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token_NxC = -jnp.where(clip_active, clipped_NxC, ratio_NxC) * adv_NxC
    loss = aggregate(per_token_NxC, mask_NxC, aggregation)
    stats = {
        "clipfrac": masked_mean(clip_active.astype(jnp.float32), mask_NxC),
        "approx_kl": masked_mean((ratio - 1.0) - jax.lax.stop_gradient(log_ratio_NxC), mask_NxC),
    }
    return loss, stats


def kl_penalty(logp_NxC: jax.Array, ref_logp_NxC: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    k1: logp - ref; k2: 0.5 (logp - ref)^2; k3: exp(ref - logp) - (ref - logp) - 1.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"KL estimator {kind!r} is not one of {KL_KINDS}")
    diff_NxC = logp_NxC - ref_logp_NxC
    if kind == "k1":
        return diff_NxC
    if kind == "k2":
        return 0.5 * diff_NxC**2
    return jnp.exp(-diff_NxC) + diff_NxC - 1.0


def sft_gate(
    r_correct_N: jax.Array,
    r_format_N: jax.Array,
    gain_sum_N: jax.Array,
    gates: tuple[str, ...] = ("format", "correct"),
) -> jax.Array:
    """Which completions pass every gate, [N] bool.

    format: r_format > 0.5; correct: r_correct > 0.5; mig_positive: sum_k g_k > 0.
    An empty `gates` lets every completion pass.
    """
    tests = {
        "format": lambda: jnp.asarray(r_format_N) > 0.5,
        "correct": lambda: jnp.asarray(r_correct_N) > 0.5,
        "mig_positive": lambda: jnp.asarray(gain_sum_N) > 0.0,
    }
    pass_N = jnp.ones(jnp.shape(r_correct_N), bool)
    for gate in gates:
        if gate not in tests:
            raise ValueError(f"SFT gate {gate!r} is not one of {SFT_GATES}")
        pass_N = pass_N & tests[gate]()
    return pass_N


def sft_loss(
    logp_NxC: jax.Array, mask_NxC: jax.Array, pass_N: jax.Array, aggregation: str = "token_mean"
) -> jax.Array:
    """NLL of the passing completions' tokens, normalised over the passing completions only.

    For seq_mean_token_sum_norm the divisor is (number passing) * C. Exactly 0, with zero
    gradient, when nothing passes.
    """
    mask_NxC = jnp.asarray(mask_NxC, bool) & jnp.asarray(pass_N, bool)[:, None]
    nll_NxC = -jnp.where(mask_NxC, logp_NxC, 0.0)
    loss = aggregate(nll_NxC, mask_NxC, aggregation)
    if aggregation == "seq_mean_token_sum_norm":
        n_pass = jnp.sum(jnp.asarray(pass_N, bool))
        loss = loss * logp_NxC.shape[0] / jnp.maximum(n_pass, 1)
    return loss


def token_entropy(logits_NxCxV: jax.Array) -> jax.Array:
    """Entropy of the softmax over the last axis, per token (float32)."""
    logits = jnp.asarray(logits_NxCxV, jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def objective(
    logp_NxC: jax.Array,
    old_logp_NxC: jax.Array,
    adv_process_NxC: jax.Array,
    mask_process_NxC: jax.Array,
    adv_outcome_NxC: jax.Array,
    mask_outcome_NxC: jax.Array,
    completion_mask_NxC: jax.Array,
    sft_pass_N: jax.Array,
    *,
    ref_logp_NxC: jax.Array | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.1,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = alpha L_process + beta L_outcome + gamma L_sft + kl_coef KL, and its metrics.

    L_process and L_outcome are PPO surrogates over their stream masks (`combine_streams`);
    L_sft is the NLL of the completions in `sft_pass_N` over `completion_mask_NxC`; the KL
    term (skipped when kl_coef is the Python number 0 or ref_logp_NxC is None) is aggregated over
    the completion. The coefficients may be Python numbers or traced scalars.
    """
    surrogate = dict(eps_low=eps_low, eps_high=eps_high, aggregation=aggregation)
    l_proc, s_proc = ppo_surrogate(
        logp_NxC, old_logp_NxC, adv_process_NxC, mask_process_NxC, **surrogate
    )
    l_out, s_out = ppo_surrogate(
        logp_NxC, old_logp_NxC, adv_outcome_NxC, mask_outcome_NxC, **surrogate
    )
    l_sft = sft_loss(logp_NxC, completion_mask_NxC, sft_pass_N, aggregation)
    total = alpha * l_proc + beta * l_out + gamma * l_sft
    l_kl = jnp.zeros((), jnp.float32)
    kl_off = isinstance(kl_coef, int | float) and kl_coef == 0.0
    if ref_logp_NxC is not None and not kl_off:
        full = jnp.asarray(completion_mask_NxC, bool)
        safe_logp = jnp.where(full, logp_NxC, 0.0)
        safe_ref = jnp.where(full, ref_logp_NxC, 0.0)
        l_kl = aggregate(kl_penalty(safe_logp, safe_ref, kl_kind), full, aggregation)
        total = total + kl_coef * l_kl
    metrics = {
        "loss/total": total,
        "loss/process": l_proc,
        "loss/outcome": l_out,
        "loss/sft": l_sft,
        "loss/kl": l_kl,
        "policy/clipfrac": s_out["clipfrac"],
        "policy/clipfrac_process": s_proc["clipfrac"],
        "policy/approx_kl": s_out["approx_kl"],
        "sft/pass_frac": jnp.mean(jnp.asarray(sft_pass_N, jnp.float32)),
    }
    return total, metrics
