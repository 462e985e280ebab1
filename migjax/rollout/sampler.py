"""The jitted sampler: prefill each prompt once, broadcast its KV cache to its G samples, then
decode with `lax.while_loop` until every sample has stopped or the token budget is spent."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from migjax.models import merge
from migjax.models.multimodal import ImageFeatures, decoder_inputs, repeat
from migjax.models.transformer import KVCache, cache_mask, positions_from_mask
from migjax.types import Rollout


@dataclasses.dataclass(frozen=True)
class SamplingRules:
    """How to pick each token and when to stop. Hashable: it is a static jit argument."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()  # single tokens that end a sample (eos, ...)
    stop_seqs: tuple[tuple[int, ...], ...] = ()  # token sequences that end a sample
    pad_id: int = 0


class DecodeState(NamedTuple):
    """The while_loop carry. i: tokens written so far; last_N: the token fed next."""

    i: jax.Array
    key: jax.Array
    cache: KVCache
    pos_N: jax.Array
    last_N: jax.Array
    done_N: jax.Array
    tokens_NxC: jax.Array
    logp_NxC: jax.Array


def filter_logits(logits_NxV, rules: SamplingRules):
    """Temperature, top-k and top-p (nucleus) filtering; filtered entries become the float32
    minimum (probability 0)."""
    x = logits_NxV.astype(jnp.float32) / max(rules.temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if 0 < rules.top_k < x.shape[-1]:  # k at or above the vocabulary keeps every token
        kth = jax.lax.top_k(x, rules.top_k)[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if rules.top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_idx = jnp.sum(cum < rules.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, jnp.minimum(cutoff_idx, x.shape[-1] - 1), axis=-1)
        x = jnp.where(x < cutoff, neg, x)
    return x


def _pick(key, logits_NxV, rules: SamplingRules):
    """(token_N, logp_N): the chosen token and its log-prob under the tempered policy."""
    logp_all = jax.nn.log_softmax(logits_NxV.astype(jnp.float32) / max(rules.temperature, 1e-6))
    if rules.greedy:
        tok = jnp.argmax(logits_NxV, axis=-1)
    else:
        tok = jax.random.categorical(key, filter_logits(logits_NxV, rules), axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]


def _stopped(tokens_NxC, i, tok_N, rules: SamplingRules):
    """Whether writing `tok_N` at column i ends each sample (stop token or stop sequence)."""
    stop = jnp.zeros(tok_N.shape, bool)
    if rules.stop_ids:
        stop = jnp.isin(tok_N, jnp.asarray(rules.stop_ids, jnp.int32))
    for seq in rules.stop_seqs:
        m = len(seq)
        if m == 1:
            stop |= tok_N == seq[0]
            continue
        prev = jax.lax.dynamic_slice_in_dim(
            jnp.pad(tokens_NxC, ((0, 0), (m - 1, 0)), constant_values=-1), i, m - 1, axis=1)
        tail = jnp.concatenate([prev, tok_N[:, None]], axis=1)
        stop |= jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
    return stop


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "group_size", "return_cache"))
def sample(graphdef: nnx.GraphDef, params, prompt_BxP, prompt_mask_BxP, key, *,
           rules: SamplingRules, group_size: int = 1,
           images: ImageFeatures | None = None, return_cache: bool = False):
    """Samples `group_size` completions per left-padded prompt. Deterministic for a given key.
    `images`: the prompts' image features (`migjax.models.multimodal`), B rows.

    Returns the `Rollout`; with `return_cache`, (rollout, cache): the KV cache of the N samples,
    where slot s < P holds prompt column s and slot P + j completion column j for every column
    before a sample's last (the last sampled token is never fed back). MIG's step likelihoods
    read it instead of running the completion again (`rewards.mig.step_likelihoods_on_cache`)."""
    model = merge(graphdef, params)
    cfg = model.cfg
    b, p = prompt_BxP.shape
    g, c = group_size, rules.max_new_tokens
    n = b * g
    mask_p = prompt_mask_BxP.astype(bool)

    # Prefill: one pass per prompt, then every sample of the group shares the prompt's cache.
    cache = KVCache.empty(cfg, b, p + c)
    cache, attn = cache_mask(cache, mask_p)
    embeds, pos_p = decoder_inputs(model, prompt_BxP, positions_from_mask(mask_p), images)
    h, cache = model.hidden(prompt_BxP, pos_p, attn, cache, embeds_NxTxD=embeds, causal=True)
    logits = model.logits(h[:, -1:])[:, 0]
    cache = cache.repeat(g)
    logits = jnp.repeat(logits, g, axis=0)
    pos_B = jnp.sum(mask_p, axis=1).astype(jnp.int32)
    if images is not None:  # text after an image prompt continues from its M-RoPE positions
        pos_B = pos_B + images.delta_N
    pos_N = jnp.repeat(pos_B, g)

    k0, key = jax.random.split(key)
    tok, lp = _pick(k0, logits, rules)
    tokens = jnp.full((n, c), rules.pad_id, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((n, c), jnp.float32).at[:, 0].set(lp)
    done = _stopped(tokens, 0, tok, rules)
    state = DecodeState(jnp.ones((), jnp.int32), key, cache, pos_N, tok, done, tokens, logps)

    def cond(s: DecodeState):
        return (s.i < c) & ~jnp.all(s.done_N)

    def body(s: DecodeState):
        cache, attn = cache_mask(s.cache, jnp.ones((n, 1), bool))
        h, cache = model.hidden(s.last_N[:, None], s.pos_N[:, None], attn, cache)
        logits = model.logits(h)[:, 0]
        tok, lp = _pick(jax.random.fold_in(s.key, s.i), logits, rules)
        tok = jnp.where(s.done_N, rules.pad_id, tok)
        lp = jnp.where(s.done_N, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens_NxC, tok[:, None], s.i, axis=1)
        logps = jax.lax.dynamic_update_slice_in_dim(s.logp_NxC, lp[:, None], s.i, axis=1)
        done = s.done_N | _stopped(s.tokens_NxC, s.i, tok, rules)
        return DecodeState(s.i + 1, s.key, cache, s.pos_N + 1, tok, done, tokens, logps)

    s = jax.lax.while_loop(cond, body, state)
    # A sample's real tokens run up to and including its stop token.
    stop_col = _first_stop(s.tokens_NxC, rules)
    cols = jnp.arange(c)[None]
    mask = cols <= stop_col[:, None]
    truncated = stop_col >= c
    rollout = Rollout(
        prompt_NxP=jnp.repeat(prompt_BxP, g, axis=0),
        prompt_mask_NxP=jnp.repeat(mask_p, g, axis=0),
        tokens_NxC=jnp.where(mask, s.tokens_NxC, rules.pad_id),
        mask_NxC=mask,
        sampler_logp_NxC=jnp.where(mask, s.logp_NxC, 0.0),
        truncated_N=truncated,
        images=repeat(images, g),
    )
    return (rollout, s.cache) if return_cache else rollout


def _first_stop(tokens_NxC, rules: SamplingRules):
    """Column of each sample's stop token (C when it never stopped)."""
    n, c = tokens_NxC.shape
    hit = jnp.zeros((n, c), bool)
    if rules.stop_ids:
        hit = jnp.isin(tokens_NxC, jnp.asarray(rules.stop_ids, jnp.int32))
    for seq in rules.stop_seqs:
        m = len(seq)
        padded = jnp.pad(tokens_NxC, ((0, 0), (m - 1, 0)), constant_values=-1)
        win = jnp.stack([padded[:, j:j + c] for j in range(m)], axis=-1)  # [N, C, m]
        hit |= jnp.all(win == jnp.asarray(seq, jnp.int32), axis=-1)
    return jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), c)
