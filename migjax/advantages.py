"""Group-relative advantages for the outcome and process streams, and their token masks.

Groups are contiguous blocks of `group_size` samples along the N axis (sample n belongs to group
n // group_size). Every function is pure jax.numpy and jittable with its string and bool options
static. A group whose rewards are all equal gets exactly 0, never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "rloo", "dr_grpo")
PROCESS_MODES = ("trajectory", "stepwise")


def _check(estimator: str, group_size: int, n: int, name: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is not one of {ESTIMATORS}")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{name} has {n} rows, not a multiple of group_size={group_size}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError("the rloo estimator needs group_size >= 2")


def _normalise(x_BxM, valid_BxM, estimator: str, std_normalize: bool, eps: float,
               unbiased_std: bool = False) -> jax.Array:
    """Group-normalises x over the valid entries of each row (one row = one group)."""
    count_B = jnp.sum(valid_BxM, axis=1)
    denom_B = jnp.maximum(count_B, 1).astype(jnp.float32)
    mean_B = jnp.sum(jnp.where(valid_BxM, x_BxM, 0.0), axis=1) / denom_B
    centred_BxM = x_BxM - mean_B[:, None]
    ddof = 1.0 if unbiased_std else 0.0
    var_B = jnp.sum(jnp.where(valid_BxM, centred_BxM**2, 0.0), axis=1) / jnp.maximum(
        denom_B - ddof, 1.0)
    std_B = jnp.sqrt(var_B)
    if estimator == "rloo":  # r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean)
        centred_BxM = centred_BxM * (denom_B / jnp.maximum(denom_B - 1.0, 1.0))[:, None]
    if std_normalize and estimator != "dr_grpo":
        centred_BxM = centred_BxM / (std_B + eps)[:, None]
    hi_B = jnp.max(jnp.where(valid_BxM, x_BxM, -jnp.inf), axis=1)
    lo_B = jnp.min(jnp.where(valid_BxM, x_BxM, jnp.inf), axis=1)
    varies_B = hi_B > lo_B  # False for constant groups and for groups with < 2 valid entries
    return jnp.where(valid_BxM & varies_B[:, None], centred_BxM, 0.0)


def group_advantages(
    r_N: jax.Array,
    group_size: int,
    *,
    estimator: str = "grpo",
    std_normalize: bool = True,
    unbiased_std: bool = False,
    valid_N: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Per-sample advantages adv_N from rewards r_N.

    grpo: r - mean_g, divided by (std_g + eps) if std_normalize (population std, or the
      unbiased one with `unbiased_std`, as TRL and verl compute it).
    rloo: r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g), divided by (std_g + eps) if
      std_normalize.
    dr_grpo: r - mean_g (never divided by the std).
    `valid_N` (default: all) restricts the group statistics to the valid samples; the others get
    exactly 0 and do not move their group's mean or std.
    """
    r_N = jnp.asarray(r_N, jnp.float32)
    _check(estimator, group_size, r_N.shape[0], "r_N")
    r_BxG = r_N.reshape(-1, group_size)
    valid_BxG = (jnp.ones(r_BxG.shape, bool) if valid_N is None
                 else jnp.asarray(valid_N, bool).reshape(r_BxG.shape))
    return _normalise(r_BxG, valid_BxG, estimator, std_normalize, eps,
                      unbiased_std).reshape(-1)


def stepwise_advantages(
    g_NxK: jax.Array,
    step_mask_NxK: jax.Array,
    group_size: int,
    *,
    reward_to_go: bool = False,
    **norm,
) -> jax.Array:
    """Per-step advantages adv_NxK from per-step gains.

    The credit of step k is g_k, or sum_{j >= k, valid} g_j with `reward_to_go`. Credits are
    normalised over all valid steps of the group (mean and std over the group's G * K step slots
    that are valid; `norm` holds `group_advantages`' estimator, std_normalize, unbiased_std and
    eps, with the leave-one-out factor n/(n-1) over the group's n valid steps for rloo). Padded
    steps and zero-variance groups get 0.
    """
    g_NxK = jnp.asarray(g_NxK, jnp.float32)
    step_mask_NxK = jnp.asarray(step_mask_NxK, bool)
    n_seq, k_max = g_NxK.shape
    estimator, std_normalize, unbiased_std, eps = _norm_options(**norm)
    _check(estimator, group_size, n_seq, "g_NxK")
    credit_NxK = jnp.where(step_mask_NxK, g_NxK, 0.0)
    if reward_to_go:
        credit_NxK = jnp.flip(jnp.cumsum(jnp.flip(credit_NxK, axis=1), axis=1), axis=1)
    shape_BxM = (n_seq // group_size, group_size * k_max)
    adv = _normalise(credit_NxK.reshape(shape_BxM), step_mask_NxK.reshape(shape_BxM), estimator,
                     std_normalize, eps, unbiased_std)
    return adv.reshape(n_seq, k_max)


def _norm_options(estimator: str = "grpo", std_normalize: bool = True,
                  unbiased_std: bool = False, eps: float = 1e-6):
    return estimator, std_normalize, unbiased_std, eps


def sequence_process_advantages(
    mode: str,
    g_NxK: jax.Array,
    step_mask_NxK: jax.Array,
    group_size: int,
    **norm,
) -> jax.Array:
    """The per-sequence process advantage, [N]: the group-normalised R_mig = sum_k g_k (valid
    steps) in trajectory mode, 0 in stepwise mode (which has no sequence-level advantage).

    A completion without a CoT has R_mig = 0, what it would have if its likelihood stayed at l_0.
    With the watermark 0 is the floor of R_mig, so it never outranks a completion with a CoT,
    and a CoT that raises the likelihood stands out against it (the signal that teaches the
    format). Under end-of-CoT credit it is instead left out of the statistics (`update.credit`).
    """
    if mode not in PROCESS_MODES:
        raise ValueError(f"process advantage mode {mode!r} is not one of {PROCESS_MODES}")
    if mode == "stepwise":
        return jnp.zeros((g_NxK.shape[0],), jnp.float32)
    r_mig_N = jnp.sum(jnp.where(jnp.asarray(step_mask_NxK, bool), g_NxK, 0.0), axis=1)
    return group_advantages(r_mig_N, group_size, **norm)


def token_process_advantages(
    mode: str,
    g_NxK: jax.Array,
    step_mask_NxK: jax.Array,
    step_id_NxC: jax.Array,
    cot_mask_NxC: jax.Array,
    group_size: int,
    *,
    reward_to_go: bool = False,
    **norm,
) -> jax.Array:
    """Process advantages on completion tokens, [N, C] (0 outside the CoT).

    trajectory: the group-normalised R_mig = sum_k g_k (`sequence_process_advantages`) on every
      CoT token.
    stepwise: each token gets its step's advantage from `stepwise_advantages`; tokens with
      step_id 0 (the think tags, text before the first step) get 0.
    """
    cot_mask_NxC = jnp.asarray(cot_mask_NxC, bool)
    if mode == "trajectory":
        adv_N = sequence_process_advantages(mode, g_NxK, step_mask_NxK, group_size, **norm)
        return jnp.where(cot_mask_NxC, adv_N[:, None], 0.0)
    if mode != "stepwise":
        raise ValueError(f"process advantage mode {mode!r} is not one of {PROCESS_MODES}")
    adv_NxK = stepwise_advantages(g_NxK, step_mask_NxK, group_size, reward_to_go=reward_to_go,
                                  **norm)
    adv_NxK1 = jnp.concatenate([jnp.zeros((adv_NxK.shape[0], 1), jnp.float32), adv_NxK], axis=1)
    step_id_NxC = jnp.clip(jnp.asarray(step_id_NxC, jnp.int32), 0, adv_NxK.shape[1])
    adv_NxC = jnp.take_along_axis(adv_NxK1, step_id_NxC, axis=1)
    return jnp.where(cot_mask_NxC, adv_NxC, 0.0)


class Streams(NamedTuple):
    """Token advantages and masks of the two loss streams."""

    adv_process_NxC: jax.Array  # float32
    mask_process_NxC: jax.Array  # bool
    adv_outcome_NxC: jax.Array  # float32
    mask_outcome_NxC: jax.Array  # bool


def combine_streams(
    adv_proc_NxC: jax.Array,
    adv_out_N: jax.Array,
    cot_mask_NxC: jax.Array,
    completion_mask_NxC: jax.Array,
    *,
    decoupled: bool = True,
    proc_seq_N: jax.Array | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Streams:
    """Places the process and outcome advantages on their tokens (decoupled masking).

    decoupled=True: the process stream acts on M_cot (CoT tokens of the completion) with
      `adv_proc_NxC`; the outcome stream acts on M_full (every completion token) with adv_out_N.
      CoT tokens thus carry both signals and answer tokens only the outcome signal. The loss
      weighs the streams by alpha and beta (`alpha` and `beta` are unused here).
    decoupled=False (ablation): a single stream, returned as the outcome stream, with
      adv = alpha * process + beta * outcome on every completion token. Inside the CoT the
      process part is `adv_proc_NxC`; outside it is `proc_seq_N` (the sequence's process
      advantage, trajectory mode; see `sequence_process_advantages`) or 0 when `proc_seq_N` is
      None (stepwise mode). The process stream is all zero with an all-False mask, and the loss
      must weigh the single stream by 1 (`stream_weights`): the clipped surrogate is positively
      homogeneous in the advantage, so with alpha = 0 this is exactly the outcome-only update.
    """
    cot_mask_NxC = jnp.asarray(cot_mask_NxC, bool)
    full_NxC = jnp.asarray(completion_mask_NxC, bool)
    adv_out_N = jnp.asarray(adv_out_N, jnp.float32)
    adv_proc_NxC = jnp.asarray(adv_proc_NxC, jnp.float32)
    if decoupled:
        m_cot_NxC = cot_mask_NxC & full_NxC
        return Streams(
            adv_process_NxC=jnp.where(m_cot_NxC, adv_proc_NxC, 0.0),
            mask_process_NxC=m_cot_NxC,
            adv_outcome_NxC=jnp.where(full_NxC, adv_out_N[:, None], 0.0),
            mask_outcome_NxC=full_NxC,
        )
    outside_N = jnp.zeros_like(adv_out_N) if proc_seq_N is None else jnp.asarray(proc_seq_N)
    proc_NxC = jnp.where(cot_mask_NxC, adv_proc_NxC, outside_N[:, None])
    return Streams(
        adv_process_NxC=jnp.zeros_like(adv_proc_NxC),
        mask_process_NxC=jnp.zeros_like(full_NxC),
        adv_outcome_NxC=jnp.where(full_NxC, alpha * proc_NxC + beta * adv_out_N[:, None], 0.0),
        mask_outcome_NxC=full_NxC,
    )


def stream_weights(decoupled: bool, alpha: float, beta: float) -> tuple[float, float]:
    """The loss weights (process, outcome) of the streams `combine_streams` returns: alpha and
    beta when decoupled; (0, 1) when coupled, whose single stream already holds both."""
    return (alpha, beta) if decoupled else (0.0, 1.0)
