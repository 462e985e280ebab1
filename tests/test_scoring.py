"""Teacher-forced scoring: chunked log-probs and entropies against a direct full-logits
log_softmax reference, their gradients, left padding, temperature and custom attention masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from migjax.models import PRESETS, merge
from migjax.models.scoring import chunked_logprobs, token_logprobs
from migjax.models.transformer import causal_inputs

CFG = PRESETS["tiny"]
N, T = 3, 13
PADS = (0, 4, 9)  # left padding of each row
CHUNK = 5  # does not divide T - 1 = 12



def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_reference(logits_NxTxV, tokens_NxT, temperature=1.0):
    """(logp, entropy) [N, T] in float64 from full logits: column t scores tokens[t] from row t-1."""
    logp_all = np_log_softmax(np.asarray(logits_NxTxV)[:, :-1] / temperature)
    tok = np.asarray(tokens_NxT)
    lp = np.take_along_axis(logp_all, tok[:, 1:, None], axis=-1)[..., 0]
    ent = -(np.exp(logp_all) * logp_all).sum(-1)
    pad = lambda a: np.concatenate([np.zeros((a.shape[0], 1)), a], 1)
    return pad(lp), pad(ent)


@pytest.fixture(scope="module")
def model_parts():
    return random_params(CFG)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (N, T)).astype(np.int32)
    mask = np.ones((N, T), bool)
    for i, p in enumerate(PADS):
        mask[i, :p] = False
        tokens[i, :p] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def fns(model_parts):
    """Jitted functions shared by the tests (temperature is traced: one compilation)."""
    graphdef, _ = model_parts
    m = lambda p: merge(graphdef, p)
    return dict(
        logits=jax.jit(lambda p, t, mask: m(p)(t, mask)),
        hidden=jax.jit(lambda p, t, mask: m(p).hidden(t, *causal_inputs(t, mask))[0]),
        head=jax.jit(lambda p: m(p).head()),
        score=jax.jit(lambda p, t, mask, temp: token_logprobs(
            m(p), t, mask, chunk_size=CHUNK, temperature=temp, with_entropy=True)),
        score_custom=jax.jit(lambda p, t, mask, pos, attn: token_logprobs(
            m(p), t, mask, positions_NxT=pos, attn_mask_NxTxT=attn, chunk_size=CHUNK,
            with_entropy=True)),
    )


@pytest.fixture(scope="module")
def reference(model_parts, batch, fns):
    _, params = model_parts
    return np.asarray(fns["logits"](params, *batch))


def test_token_logprobs_equal_full_log_softmax(model_parts, batch, fns, reference):
    _, params = model_parts
    lp, ent = fns["score"](params, *batch, 1.0)
    want_lp, want_ent = np_reference(reference, batch[0])
    assert lp.shape == ent.shape == (N, T) and lp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5, rtol=0)
    assert np.all(np.asarray(lp[:, 0]) == 0.0) and np.all(np.asarray(ent[:, 0]) == 0.0)
    # the distributions are far from uniform, so the comparison is not vacuous
    real = np.asarray(batch[1])[:, 1:]
    assert np.std(np.asarray(lp)[:, 1:][real]) > 0.5
    assert np.asarray(ent)[:, 1:][real].max() < np.log(CFG.vocab_size) - 0.5


@pytest.mark.parametrize("first", [1, 3, 7])
def test_first_scores_only_the_later_columns(model_parts, batch, fns, first):
    graphdef, params = model_parts
    full_lp, full_ent = fns["score"](params, *batch, 1.0)
    lp, ent = jax.jit(lambda p, t, m: token_logprobs(merge(graphdef, p), t, m, chunk_size=CHUNK,
                                                    with_entropy=True, first=first))(
        params, *batch)
    np.testing.assert_allclose(lp[:, first:], full_lp[:, first:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ent[:, first:], full_ent[:, first:], atol=1e-6, rtol=0)
    assert np.all(np.asarray(lp[:, :first]) == 0.0)
    with pytest.raises(ValueError, match="first=0"):
        token_logprobs(merge(graphdef, params), *batch, first=0)


# max_logits_bytes 0 forces the chunked, rematerialised path; None the one-block path
@pytest.mark.parametrize("chunk_size,budget", [(1, 0), (4, 0), (5, 0), (12, 0), (64, 0),
                                               (5, None)])
def test_chunked_logprobs_any_chunk_size(model_parts, batch, fns, reference, chunk_size, budget):
    """Chunk sizes that divide T - 1 = 12, that do not, and one larger than the sequence; and
    logits small enough for one block."""
    _, params = model_parts
    h = fns["hidden"](params, *batch)
    kw = {} if budget is None else {"max_logits_bytes": budget}
    f = jax.jit(functools.partial(chunked_logprobs, chunk_size=chunk_size, with_entropy=True,
                                  **kw))
    lp, ent = f(h[:, :-1], fns["head"](params), batch[0][:, 1:])
    want_lp, want_ent = np_reference(reference, batch[0])
    assert lp.shape == (N, T - 1)
    np.testing.assert_allclose(lp, want_lp[:, 1:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, want_ent[:, 1:], atol=1e-5, rtol=0)


def test_chunked_logprobs_by_hand():
    """Two-token vocabulary and identity head: log p = logit - logsumexp, by hand."""
    h = jnp.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    lp, ent = chunked_logprobs(h, jnp.eye(2), jnp.array([[0, 0, 1]]), chunk_size=2,
                               with_entropy=True)
    want = [1 - np.log(np.exp(1) + 1), -np.log(1 + np.exp(2)), -np.log(2)]
    np.testing.assert_allclose(lp[0], want, rtol=1e-6)
    p = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(ent[0, 0], -(p * np.log(p) + (1 - p) * np.log(1 - p)), rtol=1e-6)
    np.testing.assert_allclose(ent[0, 2], np.log(2), rtol=1e-6)
    lp_t, _ = chunked_logprobs(h, jnp.eye(2), jnp.array([[0, 0, 1]]), temperature=0.5)
    np.testing.assert_allclose(lp_t[0, 0], 2 - np.log(np.exp(2) + 1), rtol=1e-6)


def test_temperature_scales_the_logits(model_parts, batch, fns, reference):
    _, params = model_parts
    lp, ent = fns["score"](params, *batch, 0.7)
    want_lp, want_ent = np_reference(reference, batch[0], temperature=0.7)
    np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5, rtol=0)
    plain, _ = np_reference(reference, batch[0])
    assert np.abs(np.asarray(lp) - plain).max() > 1e-2


@pytest.mark.parametrize("chunk_size,temperature,budget", [(5, 1.0, 0), (12, 0.7, 0),
                                                           (5, 0.7, None)])
def test_gradients_equal_the_direct_version(model_parts, batch, fns, chunk_size, temperature,
                                            budget):
    """d/d(hidden states, head) of a weighted sum of log-probs and entropies through the chunked,
    rematerialised path equals the gradient through full logits. token_logprobs is the decoder's
    hidden states fed to chunked_logprobs, so by the chain rule its parameter gradients agree too.
    """
    _, params = model_parts
    tokens, mask = batch
    h = fns["hidden"](params, tokens, mask)[:, :-1]
    w_DxV = fns["head"](params)
    y = tokens[:, 1:]
    wt = jnp.asarray(np.random.RandomState(1).randn(N, T - 1), jnp.float32) * mask[:, 1:]

    def chunked(h, w):
        kw = {} if budget is None else {"max_logits_bytes": budget}
        lp, ent = chunked_logprobs(h, w, y, chunk_size=chunk_size, temperature=temperature,
                                   with_entropy=True, **kw)
        return jnp.sum(wt * lp) + 0.3 * jnp.sum(wt * ent)

    def direct(h, w):
        logp_all = jax.nn.log_softmax(jnp.einsum("ntd,dv->ntv", h, w) / temperature, axis=-1)
        lp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return jnp.sum(wt * lp) + 0.3 * jnp.sum(wt * ent)

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, w_DxV)
    want = jax.jit(jax.grad(direct, argnums=(0, 1)))(h, w_DxV)
    for g1, g2, name in zip(got, want, ("hidden", "head"), strict=True):
        scale = float(jnp.abs(g2).max())
        assert scale > 1e-3, name
        np.testing.assert_allclose(g1, g2, atol=1e-5 * max(1.0, scale), rtol=1e-4, err_msg=name)
    # padded rows get no gradient where their weight is zero
    assert float(jnp.abs(got[0][2, :PADS[2] - 1]).max()) == 0.0


def test_left_padding_does_not_change_real_tokens(model_parts, batch, fns):
    """Row i without its padding (real tokens first, then filler that causal attention cannot
    see) gives the same log-probs and entropies for every real token after the first (the first
    real token has no real predecessor)."""
    _, params = model_parts
    tokens, mask = batch
    lp, ent = fns["score"](params, tokens, mask, 1.0)
    filler = np.random.RandomState(2).randint(0, CFG.vocab_size, (N, T)).astype(np.int32)
    unpadded = np.stack([np.concatenate([np.asarray(tokens[i, p:]), filler[i, :p]])
                         for i, p in enumerate(PADS)])
    lp1, ent1 = fns["score"](params, jnp.asarray(unpadded), jnp.ones((N, T), bool), 1.0)
    for i, pad in enumerate(PADS):
        np.testing.assert_allclose(lp[i, pad + 1:], lp1[i, 1:T - pad], atol=1e-5, rtol=0)
        np.testing.assert_allclose(ent[i, pad + 1:], ent1[i, 1:T - pad], atol=1e-5, rtol=0)


def test_custom_mask_equal_to_the_causal_one_gives_identical_results(model_parts, batch, fns):
    _, params = model_parts
    tokens, mask = batch
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    lp, ent = fns["score_custom"](params, tokens, mask, pos, causal)
    lp0, ent0 = fns["score"](params, tokens, mask, 1.0)
    np.testing.assert_allclose(lp, lp0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ent, ent0, atol=1e-6, rtol=0)
    # a mask that lets row 2 see its padding changes that row's log-probs
    lp2, _ = fns["score_custom"](params, tokens, mask, pos,
                                 jnp.broadcast_to(causal[:1], causal.shape))
    real = np.asarray(mask[2, 1:])
    assert np.abs(np.asarray(lp2[2, 1:]) - np.asarray(lp0[2, 1:]))[real].max() > 1e-3
