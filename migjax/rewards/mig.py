"""Step-conditioned answer likelihoods l_0..l_K (METHOD section 2): the fast packed-probe pass and
the naive one-forward-per-prefix reference.

l_k = mean over the reference answer's tokens of log pi(y*_t | prompt, steps 1..k, probe, y*_<t),
where the probe (default "\\n</think>\\n<answer>") closes the CoT and opens the answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from migjax.models.multimodal import decoder_inputs
from migjax.models.scoring import chunked_logprobs, token_logprobs
from migjax.models.transformer import Transformer, positions_from_mask

VARIANT_REDUCTIONS = ("max", "logsumexp", "mean")


def reduce_variants(l_NxK1xV, valid_NxV, how: str):
    """Combines the likelihoods of equivalent reference strings (absent variants ignored)."""
    if how not in VARIANT_REDUCTIONS:
        raise ValueError(f"mig.variant_reduce={how!r}; expected one of {VARIANT_REDUCTIONS}")
    v = valid_NxV[:, None, :]
    neg = jnp.finfo(jnp.float32).min
    if how == "max":
        return jnp.max(jnp.where(v, l_NxK1xV, neg), axis=-1)
    if how == "logsumexp":
        return jax.nn.logsumexp(jnp.where(v, l_NxK1xV, -jnp.inf), axis=-1)
    cnt = jnp.maximum(jnp.sum(v, axis=-1), 1)
    return jnp.sum(jnp.where(v, l_NxK1xV, 0.0), axis=-1) / cnt


def _probe_blocks(probe_Q, answer_NxVxA, answer_mask_NxVxA, k1, count_closing_tokens):
    """Tokens, validity and counted-ness of the K1*V probe blocks, each [N, K1, V, Q+A]."""
    n, nv, a = answer_NxVxA.shape
    q = probe_Q.shape[0]
    tok = jnp.concatenate([jnp.broadcast_to(probe_Q, (n, nv, q)), answer_NxVxA], axis=-1)
    valid = jnp.concatenate([jnp.ones((n, nv, q), bool), answer_mask_NxVxA.astype(bool)], -1)
    count = jnp.concatenate([jnp.full((n, nv, q), count_closing_tokens), answer_mask_NxVxA], -1)
    rep = lambda x: jnp.broadcast_to(x[:, None], (n, k1, nv, q + a))
    return rep(tok), rep(valid), rep(count.astype(bool))


def packed_probe_inputs(prompt_mask_NxP, mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA,
                        answer_mask_NxVxA, count_closing_tokens=False):
    """The packed layout: prompt + completion, then one block (probe + answer variant) per (k, v).

    Block (k, v) attends to the prompt, the first cut_k completion tokens and itself, with position
    ids continuing from the end of prefix k. Returns a dict of arrays; L = P + C + K1*V*(Q+A),
    M = K1*V*(Q+A) (the block tokens whose log-probs are read).
    """
    n, p = prompt_mask_NxP.shape
    c = mask_NxC.shape[1]
    k1 = cuts_NxK1.shape[1]
    nv, a = answer_NxVxA.shape[1:]
    q = probe_Q.shape[0]
    w = q + a
    s0 = p + c
    main_valid = jnp.concatenate([prompt_mask_NxP, mask_NxC], axis=1).astype(bool)
    main_pos = positions_from_mask(main_valid)
    blk_tok, blk_valid, blk_count = _probe_blocks(probe_Q, answer_NxVxA, answer_mask_NxVxA, k1,
                                                  count_closing_tokens)
    m = k1 * nv * w
    prompt_len = jnp.sum(prompt_mask_NxP, axis=1).astype(jnp.int32)
    off = jnp.arange(w)
    cut_M = jnp.broadcast_to(cuts_NxK1[:, :, None, None], (n, k1, nv, w)).reshape(n, m)
    blk_pos = prompt_len[:, None, None, None] + cuts_NxK1[:, :, None, None] + off
    blk_pos = jnp.broadcast_to(blk_pos, (n, k1, nv, w)).reshape(n, m)
    blk_valid = blk_valid.reshape(n, m)

    # Attention: main rows are causal over main keys; block rows see main keys before their cut
    # and earlier tokens of their own block.
    j_main = jnp.arange(s0)
    main_rows = jnp.tril(jnp.ones((s0, s0), bool))[None] & main_valid[:, None, :]
    main_rows = jnp.concatenate([main_rows, jnp.zeros((n, s0, m), bool)], axis=2)
    see_main = (j_main[None, None, :] < (p + cut_M)[:, :, None]) & main_valid[:, None, :]
    blk_id = jnp.arange(m) // w
    blk_off = jnp.arange(m) % w
    same = (blk_id[:, None] == blk_id[None, :]) & (blk_off[None, :] <= blk_off[:, None])
    see_blk = same[None] & blk_valid[:, None, :]
    blk_rows = jnp.concatenate([see_main, see_blk], axis=2)
    attn = jnp.concatenate([main_rows, blk_rows], axis=1)

    # Which hidden state predicts each block token: the previous block token, or for the first
    # probe token the last token of prefix k.
    idx = s0 + jnp.arange(m)
    pred = jnp.where(blk_off[None] == 0, p + cut_M - 1, idx[None] - 1)
    return dict(
        blk_tok=blk_tok.reshape(n, m), valid=jnp.concatenate([main_valid, blk_valid], axis=1),
        positions=jnp.concatenate([main_pos, blk_pos], axis=1), attn=attn, pred=pred,
        count=blk_count.reshape(n, m) & blk_valid, shape=(n, k1, nv, w),
    )


def step_likelihoods(model: Transformer, prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC,
                     cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA, *,
                     variant_reduce="max", count_closing_tokens=False, chunk_size=256,
                     images=None):
    """Fast path: l_NxK1 from one forward per completion over the packed probes (no gradient).
    With `images` (image prompts) every probe sees the prompt with its image."""
    lay = packed_probe_inputs(prompt_mask_NxP, mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA,
                              answer_mask_NxVxA, count_closing_tokens)
    n, k1, nv, w = lay["shape"]
    tokens = jnp.concatenate([prompt_NxP, tokens_NxC, lay["blk_tok"]], axis=1)
    eye = jnp.eye(tokens.shape[1], dtype=bool)[None]
    embeds, pos = decoder_inputs(model, tokens, lay["positions"], images)
    h, _ = model.hidden(tokens, pos, lay["attn"] | eye, embeds_NxTxD=embeds)
    h_pred = jnp.take_along_axis(h, lay["pred"][..., None], axis=1)
    lp, _ = chunked_logprobs(h_pred, model.head(), lay["blk_tok"], chunk_size=chunk_size)
    cnt = lay["count"]
    lp = jnp.where(cnt, lp, 0.0).reshape(n, k1, nv, w)
    denom = jnp.sum(cnt.reshape(n, k1, nv, w), axis=-1)
    l_NxK1xV = jnp.sum(lp, axis=-1) / jnp.maximum(denom, 1)
    valid_v = jnp.any(answer_mask_NxVxA, axis=-1)
    return jax.lax.stop_gradient(reduce_variants(l_NxK1xV, valid_v, variant_reduce))


def step_likelihoods_naive(model: Transformer, prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC,
                           cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA, *,
                           variant_reduce="max", count_closing_tokens=False, forward=None,
                           images=None):
    """Reference path: one left-padded forward over `prompt + prefix_k + probe + y*` for every
    (k, variant), built on the host from the real tokens only. `forward(tokens, mask) -> logp`
    defaults to a jitted `token_logprobs` of `model`. Text prompts only."""
    if images is not None:
        raise ValueError("mig.fast=False (the naive reference pass) takes text prompts only")
    if forward is None:
        forward = jax.jit(lambda t, m: token_logprobs(model, t, m)[0])
    pr, pm = np.asarray(prompt_NxP), np.asarray(prompt_mask_NxP, bool)
    ct, cuts = np.asarray(tokens_NxC), np.asarray(cuts_NxK1)
    probe, ans, am = np.asarray(probe_Q), np.asarray(answer_NxVxA), np.asarray(answer_mask_NxVxA)
    n, k1 = cuts.shape
    nv = ans.shape[1]
    q = len(probe)
    width = pr.shape[1] + ct.shape[1] + q + ans.shape[2]
    out = np.zeros((n, k1, nv), np.float32)
    for k in range(k1):
        for v in range(nv):
            seqs = np.zeros((n, width), np.int32)
            msk = np.zeros((n, width), bool)
            counted = np.zeros((n, width), bool)
            for i in range(n):
                y = ans[i, v][am[i, v]]
                s = np.concatenate([pr[i][pm[i]], ct[i, :cuts[i, k]], probe, y])
                seqs[i, width - len(s):], msk[i, width - len(s):] = s, True
                counted[i, width - len(y):] = True
                if count_closing_tokens:
                    counted[i, width - len(y) - q:width - len(y)] = True
            lp = np.asarray(forward(jnp.asarray(seqs), jnp.asarray(msk)))
            out[:, k, v] = (lp * counted).sum(1) / np.maximum(counted.sum(1), 1)
    valid_v = am.any(-1)
    return reduce_variants(jnp.asarray(out), jnp.asarray(valid_v), variant_reduce)
