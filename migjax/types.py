"""The records that cross stage boundaries (prompts, rollouts, scored rollouts, train batches),
with the shape of every field. All are pytrees (NamedTuples of arrays)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class PromptBatch(NamedTuple):
    """B prompts, left-padded to P tokens, with their reference answers (V variants of A tokens)."""

    tokens_BxP: jax.Array  # int32
    mask_BxP: jax.Array  # bool, True on real tokens
    answer_BxVxA: jax.Array  # int32, reference answer tokens, right-padded
    answer_mask_BxVxA: jax.Array  # bool; a variant with no token is absent
    example_id_B: jax.Array  # int32, index of the example in its source


class Rollout(NamedTuple):
    """N = B*G sampled completions of C tokens; sample n belongs to prompt n // G."""

    prompt_NxP: jax.Array  # int32, left-padded prompt repeated G times
    prompt_mask_NxP: jax.Array  # bool
    tokens_NxC: jax.Array  # int32, completion tokens (pad after the stop)
    mask_NxC: jax.Array  # bool, real completion tokens (the stop token included)
    sampler_logp_NxC: jax.Array  # float32, log-probs of the sampled tokens under the sampler
    truncated_N: jax.Array  # bool, hit the token budget before a stop token
    images: Any = None  # multimodal.ImageFeatures of each sample's prompt (None: text only)


class TrainBatch(NamedTuple):
    """Everything the jitted update needs for N completions (host work already done)."""

    prompt_NxP: jax.Array  # int32
    prompt_mask_NxP: jax.Array  # bool
    tokens_NxC: jax.Array  # int32
    mask_NxC: jax.Array  # bool, M_full
    cot_mask_NxC: jax.Array  # bool, M_cot
    step_id_NxC: jax.Array  # int32, 0 outside steps, k for step k
    sampler_logp_NxC: jax.Array  # float32, log-probs the sampler reported
    l_NxK1: jax.Array  # float32, step-conditioned answer log-likelihoods l_0..l_K
    step_mask_NxK: jax.Array  # bool
    num_steps_N: jax.Array  # int32, K of each completion (0 = no parseable CoT)
    r_correct_N: jax.Array  # float32
    r_format_N: jax.Array  # float32
    r_custom_N: jax.Array | None = None  # float32, weighted sum of reward.custom (None: none)
    truncated_N: jax.Array | None = None  # bool, hit the token budget (rl.mask_truncated)
    images: Any = None  # multimodal.ImageFeatures of each prompt (None: text only)
