"""The Monotonic Historical Watermark: per-step gains of the answer likelihood over its running high.

    h_0 = l_0 (h0="l0") or 0 (h0="zero");  h_k = max(h_{k-1}, l_k);  g_k = max(0, l_k - h_{k-1})

A step earns credit only when it lifts the answer likelihood to a new high, so
`sum_k g_k = max(h_0, max_{k<=K} l_k) - h_0`. Padded steps (step mask False) earn 0 and carry
h forward unchanged. `monotonic=False` is the ablation without a watermark:
h_k = l_k on valid steps and g_k = l_k - h_{k-1} (= l_k - l_{k-1} with h0="l0"), so the gains
telescope to `l_K - h_0`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

H0_MODES = ("l0", "zero")


class Watermark(NamedTuple):
    """Step-conditioned likelihoods, their running high and the per-step gains (a pytree)."""

    l_NxK1: jax.Array  # float32, l_0..l_K (as given)
    h_NxK1: jax.Array  # float32, h_0..h_K
    g_NxK: jax.Array  # float32, g_1..g_K (0 on padded steps)
    step_mask_NxK: jax.Array  # bool, step k exists


def watermark(
    l_NxK1: jax.Array, step_mask_NxK: jax.Array, *, h0: str = "l0", monotonic: bool = True
) -> Watermark:
    """Builds the watermark record from likelihoods `l_NxK1` and the step mask (jittable)."""
    if h0 not in H0_MODES:
        raise ValueError(f"h0 must be one of {H0_MODES}, got {h0!r}")
    l_NxK1 = jnp.asarray(l_NxK1, jnp.float32)
    step_mask_NxK = jnp.asarray(step_mask_NxK, bool)
    n_seq, k1 = l_NxK1.shape
    if step_mask_NxK.shape != (n_seq, k1 - 1):
        raise ValueError(
            f"step_mask_NxK {step_mask_NxK.shape} does not match l_NxK1 {l_NxK1.shape} "
            f"(expected {(n_seq, k1 - 1)})"
        )
    h0_N = l_NxK1[:, 0] if h0 == "l0" else jnp.zeros((n_seq,), jnp.float32)
    l_NxK = l_NxK1[:, 1:]
    if monotonic:
        running_NxK = jax.lax.cummax(jnp.where(step_mask_NxK, l_NxK, -jnp.inf), axis=1)
        h_NxK = jnp.maximum(h0_N[:, None], running_NxK)
    else:
        # h_k is l at the last valid step <= k (h_0 before any valid step).
        k_idx = jnp.arange(1, k1, dtype=jnp.int32)[None, :]
        last_NxK = jax.lax.cummax(jnp.where(step_mask_NxK, k_idx, 0), axis=1)
        vals_NxK1 = jnp.concatenate([h0_N[:, None], l_NxK], axis=1)
        h_NxK = jnp.take_along_axis(vals_NxK1, last_NxK, axis=1)
    h_NxK1 = jnp.concatenate([h0_N[:, None], h_NxK], axis=1)
    delta_NxK = l_NxK - h_NxK1[:, :-1]
    if monotonic:
        delta_NxK = jnp.maximum(delta_NxK, 0.0)
    g_NxK = jnp.where(step_mask_NxK, delta_NxK, 0.0)
    return Watermark(l_NxK1=l_NxK1, h_NxK1=h_NxK1, g_NxK=g_NxK, step_mask_NxK=step_mask_NxK)


def gain_sum(wm: Watermark) -> jax.Array:
    """R_mig = sum_k g_k per completion, [N]."""
    return jnp.sum(wm.g_NxK, axis=1)


def end_of_cot(l_NxK1: jax.Array, num_steps_N: jax.Array) -> jax.Array:
    """l_K per completion, [N]: the likelihood after the whole CoT (l_0 when K = 0)."""
    idx_N = jnp.clip(jnp.asarray(num_steps_N, jnp.int32), 0, l_NxK1.shape[1] - 1)
    return jnp.take_along_axis(l_NxK1, idx_N[:, None], axis=1)[:, 0]


def zero_gain_step_frac(wm: Watermark) -> jax.Array:
    """Fraction of valid steps that earn no credit (g <= 0); 0 when there is no valid step."""
    mask = wm.step_mask_NxK
    zero = jnp.sum(jnp.where(mask, wm.g_NxK <= 0.0, False))
    return zero / jnp.maximum(jnp.sum(mask), 1)
