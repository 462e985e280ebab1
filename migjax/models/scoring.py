"""The one teacher-forced log-prob function: per-token log-probs (and entropy) of a sequence's own
tokens, in float32, chunked over the sequence so full [N, T, V] logits never exist at once.

It serves the MIG reward (packed answer probes with a custom mask), the old-policy and reference
log-probs, and the loss (its backward recomputes each chunk's logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from migjax.models.transformer import Transformer, causal_inputs


def chunked_logprobs(h_NxTxD, w_DxV, targets_NxT, *, chunk_size=256, temperature=1.0,
                     with_entropy=False):
    """log p(targets[t] | h[t]) for every t, and the entropy of p(. | h[t]); float32.

    The sequence is cut into chunks of `chunk_size`; each chunk's logits are rematerialised in the
    backward pass, so peak memory holds one [N, chunk, V] block.
    """
    n, t, d = h_NxTxD.shape
    c = max(1, min(chunk_size, t))
    pad = (-t) % c
    h = jnp.pad(h_NxTxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_NxT, ((0, 0), (0, pad)))
    nc = (t + pad) // c
    h = h.reshape(n, nc, c, d).swapaxes(0, 1)  # [nc, N, c, D]
    y = y.reshape(n, nc, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(hy):
        hc, yc = hy
        logits = jnp.einsum("ncd,dv->ncv", hc, w_DxV.astype(hc.dtype),
                            preferred_element_type=jnp.float32).astype(jnp.float32)
        logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return lp, jnp.zeros_like(lp)
        p = jax.nn.softmax(logits, axis=-1)
        ent = lse - jnp.sum(p * logits, axis=-1)
        return lp, ent

    lp, ent = jax.lax.map(one, (h, y))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(n, nc * c)[:, :t]
    return unchunk(lp), unchunk(ent)


def token_logprobs(model: Transformer, tokens_NxT, attention_mask_NxT=None, *, positions_NxT=None,
                   attn_mask_NxTxT=None, chunk_size=256, temperature=1.0, with_entropy=False):
    """Teacher-forced log-probs of each token given everything its predecessor may attend to.

    Returns (logp_NxT, entropy_NxT), float32, aligned with `tokens_NxT`: `logp[:, t]` is
    log p(tokens[:, t] | hidden state at t-1), and `entropy[:, t]` the entropy of that same
    distribution; column 0 has no predecessor and is 0. With a custom `attn_mask_NxTxT` (packed
    sequences) the predecessor of a token is simply the token before it in the packed layout.
    """
    pos, mask = causal_inputs(tokens_NxT, attention_mask_NxT, positions_NxT, attn_mask_NxTxT)
    h, _ = model.hidden(tokens_NxT, pos, mask)
    lp, ent = chunked_logprobs(h[:, :-1], model.head(), tokens_NxT[:, 1:], chunk_size=chunk_size,
                               temperature=temperature, with_entropy=with_entropy)
    zero = jnp.zeros((tokens_NxT.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero, lp], axis=1), jnp.concatenate([zero, ent], axis=1)
