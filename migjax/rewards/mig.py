"""Step-conditioned answer likelihoods l_0..l_K (METHOD section 2): the fast pass (the completion
once, causally, read by short probe blocks) and the naive one-forward-per-prefix reference.

l_k = mean over the reference answer's tokens of log pi(y*_t | prompt, steps 1..k, probe, y*_<t),
where the probe (default "\\n</think>\\n<answer>") closes the CoT and opens the answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from migjax.models.multimodal import decoder_inputs, text_positions
from migjax.models.scoring import chunked_logprobs, token_logprobs
from migjax.models.transformer import KVCache, Transformer, causal_inputs, positions_from_mask

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


def _within_blocks(valid_NxM, w: int):
    """(offset of each token in its block [M], mask [N, M, M]): a block token sees the valid
    tokens of its own block up to itself (and always itself)."""
    m = valid_NxM.shape[1]
    blk_id, blk_off = jnp.arange(m) // w, jnp.arange(m) % w
    same = (blk_id[:, None] == blk_id[None, :]) & (blk_off[None, :] <= blk_off[:, None])
    return blk_off, (same[None] & valid_NxM[:, None, :]) | jnp.eye(m, dtype=bool)[None]


def _answer_means(h_pred_NxMxD, head, tok_NxM, count_NxM, shape, answer_mask_NxVxA,
                  variant_reduce, chunk_size):
    """l_NxK1: each block's mean log-prob of its counted tokens (predicted by `h_pred`), the
    answer variants reduced; no gradient."""
    n, k1, nv, w = shape
    lp, _ = chunked_logprobs(h_pred_NxMxD, head, tok_NxM, chunk_size=chunk_size)
    lp = jnp.where(count_NxM, lp, 0.0).reshape(n, k1, nv, w)
    denom = jnp.sum(count_NxM.reshape(n, k1, nv, w), axis=-1)
    l_NxK1xV = jnp.sum(lp, axis=-1) / jnp.maximum(denom, 1)
    valid_v = jnp.any(answer_mask_NxVxA, axis=-1)
    return jax.lax.stop_gradient(reduce_variants(l_NxK1xV, valid_v, variant_reduce))


def probe_inputs(prompt_mask_NxP, mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA,
                 count_closing_tokens=False):
    """The probe blocks that read the sequence prompt + completion (S0 = P + C tokens): one block
    (probe + answer variant, W = Q + A tokens) per (k, v), M = K1*V*W tokens in all.

    Block (k, v) attends to the prompt, the first cut_k completion tokens and itself, with position
    ids continuing from the end of prefix k: `mask` [N, M, S0 + M] over the sequence's keys, then
    the blocks'. Its first token is predicted by the sequence's hidden state at `first` (the last
    token of prefix k), the others by the block token before them. Returns a dict of arrays.
    """
    n, p = prompt_mask_NxP.shape
    s0 = p + mask_NxC.shape[1]
    k1 = cuts_NxK1.shape[1]
    nv, a = answer_NxVxA.shape[1:]
    w = probe_Q.shape[0] + a
    m = k1 * nv * w
    main_valid = jnp.concatenate([prompt_mask_NxP, mask_NxC], axis=1).astype(bool)
    tok, valid, count = (x.reshape(n, m) for x in _probe_blocks(
        probe_Q, answer_NxVxA, answer_mask_NxVxA, k1, count_closing_tokens))
    prompt_len = jnp.sum(prompt_mask_NxP, axis=1).astype(jnp.int32)
    cut_M = jnp.broadcast_to(cuts_NxK1[:, :, None, None], (n, k1, nv, w)).reshape(n, m)
    blk_off, see_blk = _within_blocks(valid, w)
    see_main = (jnp.arange(s0) < (p + cut_M)[:, :, None]) & main_valid[:, None, :]
    return dict(tok=tok, pos=prompt_len[:, None] + cut_M + blk_off,
                mask=jnp.concatenate([see_main, see_blk], axis=2), first=p + cut_M - 1,
                is_first=blk_off == 0, count=count & valid, shape=(n, k1, nv, w))


def step_likelihoods(model: Transformer, prompt_NxP, prompt_mask_NxP, tokens_NxC, mask_NxC,
                     cuts_NxK1, probe_Q, answer_NxVxA, answer_mask_NxVxA, *,
                     variant_reduce="max", count_closing_tokens=False, chunk_size=256,
                     images=None):
    """Fast path: l_NxK1 from one pass over the layers per completion (no gradient): the
    sequence prompt + completion attends causally (`model.hidden_with_probes`, flash-eligible),
    and the K1*V short probe blocks attend to its prefixes and to themselves. With `images`
    (image prompts) every probe sees the prompt with its image."""
    lay = probe_inputs(prompt_mask_NxP, mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA,
                       answer_mask_NxVxA, count_closing_tokens)
    seq = jnp.concatenate([prompt_NxP, tokens_NxC], axis=1)
    pos, mask = causal_inputs(seq, jnp.concatenate([prompt_mask_NxP, mask_NxC], axis=1))
    embeds, pos = decoder_inputs(model, seq, pos, images)
    h, h_blk = model.hidden_with_probes(seq, pos, mask, lay["tok"],
                                        text_positions(lay["pos"], images), lay["mask"],
                                        embeds_NxTxD=embeds)
    h_first = jnp.take_along_axis(h, lay["first"][..., None], axis=1)
    h_prev = jnp.pad(h_blk[:, :-1], ((0, 0), (1, 0), (0, 0)))
    h_pred = jnp.where(lay["is_first"][None, :, None], h_first, h_prev)
    return _answer_means(h_pred, model.head(), lay["tok"], lay["count"], lay["shape"],
                         answer_mask_NxVxA, variant_reduce, chunk_size)


def step_likelihoods_on_cache(model: Transformer, cache: KVCache, prompt_NxP, prompt_mask_NxP,
                              tokens_NxC, mask_NxC, cuts_NxK1, probe_Q, answer_NxVxA,
                              answer_mask_NxVxA, *, variant_reduce="max",
                              count_closing_tokens=False, chunk_size=256):
    """`step_likelihoods` without running the completion again: the probe blocks read the keys
    and values the sampler left in `cache` (`sample(..., return_cache=True)`, made with the same
    parameters). A text-only path.

    The cache holds no hidden state, so block (k, v) starts with the last token of prefix k
    again (the completion's token cut_k - 1, or the prompt's last for cut_k = 0) at its own
    position, attending to the cache slots before it; its output predicts the probe's first
    token, as the sequence's hidden state there does in `step_likelihoods`."""
    n, p = prompt_NxP.shape
    c = tokens_NxC.shape[1]
    k1 = cuts_NxK1.shape[1]
    nv, a = answer_NxVxA.shape[1:]
    w = 1 + probe_Q.shape[0] + a
    m = k1 * nv * w
    s = cache.k.shape[3]
    if s != p + c:
        raise ValueError(f"cache of {s} slots for a prompt of {p} and a completion of {c} columns")
    blk, valid, count = _probe_blocks(probe_Q, answer_NxVxA, answer_mask_NxVxA, k1,
                                      count_closing_tokens)  # [N, K1, V, W - 1]
    last_k = jnp.where(cuts_NxK1 > 0,
                       jnp.take_along_axis(tokens_NxC, jnp.maximum(cuts_NxK1 - 1, 0), axis=1),
                       prompt_NxP[:, -1:])  # [N, K1]
    lead = lambda x, rest: jnp.concatenate(  # one column before each block's tokens
        [jnp.broadcast_to(x, (n, k1, nv, 1)).astype(rest.dtype), rest], -1).reshape(n, m)
    tok = lead(last_k[:, :, None, None], blk)
    valid, count = lead(jnp.asarray(True), valid), lead(jnp.asarray(False), count)
    prompt_len = jnp.sum(prompt_mask_NxP, axis=1).astype(jnp.int32)
    cut_M = jnp.broadcast_to(cuts_NxK1[:, :, None, None], (n, k1, nv, w)).reshape(n, m)
    blk_off, see_blk = _within_blocks(valid, w)
    slot_valid = jnp.concatenate([prompt_mask_NxP, mask_NxC], axis=1).astype(bool)
    see_cache = (jnp.arange(s) < (p + cut_M - 1)[:, :, None]) & slot_valid[:, None, :]
    key_pos = positions_from_mask(jnp.concatenate([prompt_mask_NxP, jnp.ones_like(mask_NxC)], 1))
    h = model.probes_on_cache(cache, key_pos, tok, prompt_len[:, None] + cut_M - 1 + blk_off,
                              jnp.concatenate([see_cache, see_blk], axis=2))
    h_pred = jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))  # token j from the block's j - 1
    return _answer_means(h_pred, model.head(), tok, count, (n, k1, nv, w), answer_mask_NxVxA,
                         variant_reduce, chunk_size)


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
