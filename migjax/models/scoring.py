"""The one teacher-forced log-prob function: per-token log-probs (and entropy) of a sequence's own
tokens, in float32. Logits that fit `max_logits_bytes` are computed whole and kept for the
backward pass (the fast path: the output head is most of a small model's FLOPs); larger ones are
chunked over the sequence, each chunk's logits recomputed in the backward pass, so full
[N, T, V] logits never exist at once.

It serves the MIG reward (`chunked_logprobs` on the probe blocks' hidden states, and the naive
reference's forwards), the old-policy and reference log-probs, and the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from migjax.models.multimodal import decoder_inputs
from migjax.models.transformer import Transformer, causal_inputs

LOGITS_BUDGET_BYTES = 1 << 30  # float32 logits up to 1 GiB are materialised whole


def chunked_logprobs(h_NxTxD, w_DxV, targets_NxT, *, chunk_size=256, temperature=1.0,
                     with_entropy=False, max_logits_bytes=LOGITS_BUDGET_BYTES):
    """log p(targets[t] | h[t]) for every t, and the entropy of p(. | h[t]); float32.

    When the float32 logits `N * T * V * 4` bytes fit `max_logits_bytes` they are computed in one
    block and saved for the backward pass. Otherwise the sequence is cut into chunks of
    `chunk_size`; each chunk's logits are rematerialised in the backward pass, so peak memory
    holds one [N, chunk, V] block.
    """
    n, t, d = h_NxTxD.shape
    if n * t * w_DxV.shape[1] * 4 <= max_logits_bytes:
        return _block_logprobs(h_NxTxD, w_DxV, targets_NxT, temperature, with_entropy)
    c = max(1, min(chunk_size, t))
    pad = (-t) % c
    h = jnp.pad(h_NxTxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_NxT, ((0, 0), (0, pad)))
    nc = (t + pad) // c
    h = h.reshape(n, nc, c, d).swapaxes(0, 1)  # [nc, N, c, D]
    y = y.reshape(n, nc, c).swapaxes(0, 1)

    one = jax.checkpoint(
        lambda hy: _block_logprobs(hy[0], w_DxV, hy[1], temperature, with_entropy))
    lp, ent = jax.lax.map(one, (h, y))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(n, nc * c)[:, :t]
    return unchunk(lp), unchunk(ent)


def _block_logprobs(h_NxTxD, w_DxV, targets_NxT, temperature, with_entropy):
    """(log p(target), entropy) of one block of positions: chosen logit minus logsumexp."""
    logits = jnp.einsum("ntd,dv->ntv", h_NxTxD, w_DxV.astype(h_NxTxD.dtype),
                        preferred_element_type=jnp.float32).astype(jnp.float32)
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, targets_NxT[..., None], axis=-1)[..., 0] - lse
    if not with_entropy:
        return lp, jnp.zeros_like(lp)
    p = jax.nn.softmax(logits, axis=-1)
    return lp, lse - jnp.sum(p * logits, axis=-1)


def token_logprobs(model: Transformer, tokens_NxT, attention_mask_NxT=None, *, positions_NxT=None,
                   attn_mask_NxTxT=None, chunk_size=256, temperature=1.0, with_entropy=False,
                   max_logits_bytes=LOGITS_BUDGET_BYTES, images=None, first: int = 1):
    """Teacher-forced log-probs of each token given everything its predecessor may attend to.

    Returns (logp_NxT, entropy_NxT), float32, aligned with `tokens_NxT`: `logp[:, t]` is
    log p(tokens[:, t] | hidden state at t-1), and `entropy[:, t]` the entropy of that same
    distribution; column 0 has no predecessor and is 0. With a custom `attn_mask_NxTxT` (packed
    sequences) the predecessor of a token is simply the token before it in the packed layout.
    `images` (`multimodal.ImageFeatures`): the image prompts the first columns hold. `first`
    (>= 1, static): the first column scored; the output head runs on columns first.. only
    (the update reads the completion's, TRL's `logits_to_keep`) and earlier columns are 0.
    """
    if first < 1:
        raise ValueError(f"token_logprobs: first={first} must be >= 1 (column 0 has no "
                         "predecessor)")
    pos, mask = causal_inputs(tokens_NxT, attention_mask_NxT, positions_NxT, attn_mask_NxTxT)
    embeds, pos = decoder_inputs(model, tokens_NxT, pos, images)
    h, _ = model.hidden(tokens_NxT, pos, mask, embeds_NxTxD=embeds,
                        causal=attn_mask_NxTxT is None)
    lp, ent = chunked_logprobs(h[:, first - 1:-1], model.head(), tokens_NxT[:, first:],
                               chunk_size=chunk_size, temperature=temperature,
                               with_entropy=with_entropy, max_logits_bytes=max_logits_bytes)
    zero = jnp.zeros((tokens_NxT.shape[0], first), jnp.float32)
    return jnp.concatenate([zero, lp], axis=1), jnp.concatenate([zero, ent], axis=1)
