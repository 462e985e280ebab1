"""Step-conditioned answer likelihoods: the fast pass (the completion once, read by short probe
blocks) against the naive one-forward-per-prefix reference on random layouts, which attention
calls it makes, and against plain forwards over prefixes tokenised from text for real arithmetic
demonstrations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.data.arith import ArithTask, arith_spec, format_prompt
from migjax.data.tokenizer import build_arith_tokenizer, token_strings
from migjax.models import PRESETS, merge
from migjax.models import transformer as tr
from migjax.models.scoring import token_logprobs
from migjax.rewards.mig import (
    VARIANT_REDUCTIONS,
    reduce_variants,
    step_likelihoods,
    step_likelihoods_naive,
)
from migjax.rewards.segment import segment_completions

CFG = PRESETS["tiny"]
# Shapes of the random layouts (fixed so that each path compiles once).
N, P, C, K1, NV, A, Q = 3, 5, 9, 4, 2, 3, 2
PROBE = "\n</think>\n<answer>"



def np_reduce(l_NxK1xV, valid_NxV, how):
    """Independent numpy version of the variant reduction (absent variants ignored)."""
    v = np.broadcast_to(valid_NxV[:, None, :], l_NxK1xV.shape)
    if how == "max":
        return np.where(v, l_NxK1xV, -np.inf).max(-1)
    if how == "logsumexp":
        x = np.where(v, l_NxK1xV, -np.inf)
        m = np.max(x, -1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            return np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    return np.where(v, l_NxK1xV, 0.0).sum(-1) / np.maximum(v.sum(-1), 1)


@pytest.fixture(scope="module")
def parts():
    return random_params(CFG)


@pytest.fixture(scope="module")
def fast(parts):
    """Jitted fast path returning all three variant reductions (count_closing_tokens static)."""
    graphdef, params = parts

    @functools.partial(jax.jit, static_argnames="count_closing_tokens")
    def run(params, *arrays, count_closing_tokens):
        model = merge(graphdef, params)
        return {how: step_likelihoods(model, *arrays, variant_reduce=how, chunk_size=16,
                                      count_closing_tokens=count_closing_tokens)
                for how in VARIANT_REDUCTIONS}

    return lambda *arrays, count_closing_tokens: {
        k: np.asarray(v) for k, v in
        run(params, *arrays, count_closing_tokens=count_closing_tokens).items()}


@pytest.fixture(scope="module")
def plain_logprobs(parts):
    """Jitted plain teacher-forced log-probs of a left-padded batch (one compile per shape)."""
    graphdef, params = parts
    f = jax.jit(lambda p, t, m: token_logprobs(merge(graphdef, p), t, m)[0])
    return lambda t, m: f(params, t, m)


@st.composite
def layouts(draw):
    """A random batch: prompt lengths (left padding), completion lengths, step counts and
    non-decreasing cuts, answer lengths per variant (0 = absent), token contents (padding slots
    hold random tokens too, which must not matter)."""
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    prompt_len = draw(st.lists(st.integers(1, P), min_size=N, max_size=N))
    comp_len = draw(st.lists(st.integers(0, C), min_size=N, max_size=N))
    cuts = np.zeros((N, K1), np.int32)
    for i in range(N):
        k = draw(st.integers(0, K1 - 1))
        c = sorted(draw(st.lists(st.integers(0, comp_len[i]), min_size=k + 1, max_size=k + 1)))
        cuts[i] = c + [c[-1]] * (K1 - 1 - k)
    ans_len = np.array(draw(st.lists(st.integers(0, A), min_size=N * NV, max_size=N * NV)))
    ans_len = ans_len.reshape(N, NV)
    v = CFG.vocab_size
    return dict(
        prompt_NxP=rng.randint(0, v, (N, P)).astype(np.int32),
        prompt_mask_NxP=np.arange(P)[None] >= P - np.array(prompt_len)[:, None],
        tokens_NxC=rng.randint(0, v, (N, C)).astype(np.int32),
        mask_NxC=np.arange(C)[None] < np.array(comp_len)[:, None],
        cuts_NxK1=cuts,
        probe_Q=rng.randint(0, v, Q).astype(np.int32),
        answer_NxVxA=rng.randint(0, v, (N, NV, A)).astype(np.int32),
        answer_mask_NxVxA=np.arange(A)[None, None] < ans_len[..., None],
    )


ARG_ORDER = ("prompt_NxP", "prompt_mask_NxP", "tokens_NxC", "mask_NxC", "cuts_NxK1", "probe_Q",
             "answer_NxVxA", "answer_mask_NxVxA")


@pytest.mark.parametrize("count_closing_tokens", [False, True])
@settings(max_examples=5, deadline=None)
@given(lay=layouts())
def test_fast_path_equals_naive_path(parts, fast, plain_logprobs, count_closing_tokens, lay):
    graphdef, params = parts
    args = [jnp.asarray(lay[k]) for k in ARG_ORDER]
    got = fast(*args, count_closing_tokens=count_closing_tokens)
    forward = lambda t, m: plain_logprobs(t, m)
    for how in VARIANT_REDUCTIONS:
        want = np.asarray(step_likelihoods_naive(
            merge(graphdef, params), *args, variant_reduce=how,
            count_closing_tokens=count_closing_tokens, forward=forward))
        assert got[how].shape == want.shape == (N, K1)
        np.testing.assert_allclose(got[how], want, atol=1e-5, rtol=0, err_msg=how)


def fixed_layout():
    """One hand-made layout: left padding of 0, 2 and 4 prompt tokens, completions of 9, 5 and 7
    tokens, repeated cuts, and an absent answer variant in row 1."""
    rng = np.random.RandomState(7)
    return dict(
        prompt_NxP=rng.randint(0, CFG.vocab_size, (N, P)).astype(np.int32),
        prompt_mask_NxP=np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool),
        tokens_NxC=rng.randint(0, CFG.vocab_size, (N, C)).astype(np.int32),
        mask_NxC=np.arange(C)[None] < np.array([[9], [5], [7]]),
        cuts_NxK1=np.array([[0, 3, 6, 9], [1, 1, 4, 4], [2, 5, 7, 7]], np.int32),
        probe_Q=np.array([5, 6], np.int32),
        answer_NxVxA=rng.randint(0, CFG.vocab_size, (N, NV, A)).astype(np.int32),
        answer_mask_NxVxA=np.array([[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [0, 0, 0]],
                                    [[1, 1, 1], [1, 1, 0]]], bool),
    )


def test_fast_path_on_a_fixed_layout_is_not_trivial(parts, fast, plain_logprobs):
    """Every l_k is a mean of real log-probs (far from 0), l varies with k, and it equals the
    naive path; an absent variant is ignored by every reduction."""
    graphdef, params = parts
    args = [jnp.asarray(fixed_layout()[k]) for k in ARG_ORDER]
    got = fast(*args, count_closing_tokens=False)
    naive = lambda how: np.asarray(step_likelihoods_naive(
        merge(graphdef, params), *args, variant_reduce=how, forward=plain_logprobs))
    np.testing.assert_allclose(got["max"], naive("max"), atol=1e-5, rtol=0)
    assert (got["max"] < -0.5).all()
    assert np.ptp(got["max"][0]) > 1e-2  # the prefix matters
    # row 1 has one variant: all reductions agree there
    np.testing.assert_allclose(got["mean"][1], got["max"][1], atol=1e-6)
    np.testing.assert_allclose(got["logsumexp"][1], got["max"][1], atol=1e-6)
    # with two variants logsumexp >= max >= mean
    assert (got["logsumexp"][[0, 2]] >= got["max"][[0, 2]] - 1e-6).all()
    assert (got["max"][[0, 2]] >= got["mean"][[0, 2]] - 1e-6).all()


def test_the_completion_is_one_causal_pass_and_the_probes_read_it(parts, plain_logprobs,
                                                                   monkeypatch):
    """Two attention calls per layer: the prompt + completion (S0 = P + C tokens) causally over
    itself, through jax.nn.dot_product_attention when `attention_kernel` picks it (here its
    "xla" implementation, as cuDNN needs a GPU), and the K1*V*W probe tokens over [N, M, S0 + M]
    keys with the einsum; no mask covers sequence and probes together. l equals the naive path."""
    graphdef, params = parts
    calls, real = [], tr.attention

    def spy(q, k, v, mask, scale=None, *, causal=False, implementation=None):
        calls.append((mask.shape, causal, implementation))
        return real(q, k, v, mask, scale, causal=causal, implementation=implementation)

    monkeypatch.setattr(tr, "attention", spy)
    monkeypatch.setattr(tr, "attention_kernel", lambda cfg, t, s: "xla")
    args = [jnp.asarray(fixed_layout()[k]) for k in ARG_ORDER]
    got = jax.jit(lambda p, *a: step_likelihoods(merge(graphdef, p), *a))(params, *args)
    s0, m = P + C, K1 * NV * (Q + A)
    assert calls == [((N, s0, s0), True, "xla"), ((N, m, s0 + m), False, None)]
    want = step_likelihoods_naive(merge(graphdef, params), *args, forward=plain_logprobs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_fast_path_without_steps(parts, plain_logprobs):
    """K = 0 (only l_0, every cut 0), one completion empty: the probes read the prompt alone."""
    graphdef, params = parts
    lay = fixed_layout()
    lay["cuts_NxK1"] = np.zeros((N, 1), np.int32)
    lay["mask_NxC"][1] = False
    args = [jnp.asarray(lay[k]) for k in ARG_ORDER]
    got = jax.jit(lambda p, *a: step_likelihoods(merge(graphdef, p), *a))(params, *args)
    want = step_likelihoods_naive(merge(graphdef, params), *args, forward=plain_logprobs)
    assert got.shape == (N, 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", VARIANT_REDUCTIONS)
def test_reduce_variants_by_hand(how):
    l = np.array([[[-1.0, -3.0, -2.0], [-0.5, 0.0, -4.0]]], np.float32)  # [1, K1=2, V=3]
    valid = np.array([[True, False, True]])
    want = {"max": [-1.0, -0.5], "mean": [-1.5, -2.25],
            "logsumexp": [np.logaddexp(-1.0, -2.0), np.logaddexp(-0.5, -4.0)]}[how]
    got = np.asarray(reduce_variants(jnp.asarray(l), jnp.asarray(valid), how))
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(got, np_reduce(l, valid, how), rtol=1e-6)
    with pytest.raises(ValueError, match="variant_reduce"):
        reduce_variants(jnp.asarray(l), jnp.asarray(valid), "median")


# ------------------------------------------------------------------- real text end to end
@pytest.fixture(scope="module")
def arith_case(tmp_path_factory):
    tok = build_arith_tokenizer(str(tmp_path_factory.mktemp("tok")))
    items = [ArithTask(arith_spec("train"))[i] for i in range(3)]
    return tok, items


def test_fast_path_equals_plain_forwards_over_text_prefixes(arith_case, fast, plain_logprobs):
    """Demonstrations tokenised once, segmented in token space, scored by the fast path; the
    reference tokenises `prompt + completion_text[:end of step k] + probe + answer` from text and
    scores it with a plain forward. Equal values mean the token cuts reproduce the text prefixes."""
    tok, items = arith_case
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    max_steps = 5  # more than any item has: cuts past K repeat cut_K
    prompts = [format_prompt(it.question) for it in items]
    p_ids, c_ids = [enc(p) for p in prompts], [enc(it.solution) for it in items]
    variants = [(it.answer, it.answer + ".0") for it in items]
    a_ids = [[enc(v) for v in vs] for vs in variants]
    probe_ids = enc(PROBE)
    pad = tok.pad_token_id
    p_len, c_len = max(map(len, p_ids)), max(map(len, c_ids))
    a_len = max(len(a) for vs in a_ids for a in vs)
    prompt = np.full((len(items), p_len), pad, np.int32)
    tokens = np.full((len(items), c_len), pad, np.int32)
    answer = np.full((len(items), 2, a_len), pad, np.int32)
    answer_mask = np.zeros(answer.shape, bool)
    for i in range(len(items)):
        prompt[i, p_len - len(p_ids[i]):] = p_ids[i]
        tokens[i, :len(c_ids[i])] = c_ids[i]
        for v, a in enumerate(a_ids[i]):
            answer[i, v, :len(a)], answer_mask[i, v, :len(a)] = a, True
    prompt_mask = prompt != pad
    mask = np.arange(c_len)[None] < np.array([len(c) for c in c_ids])[:, None]
    seg = segment_completions(tokens, mask, token_strings(tok), max_steps=max_steps)
    np.testing.assert_array_equal(seg.num_steps_N, [len(it.steps) for it in items])
    got = fast(jnp.asarray(prompt), jnp.asarray(prompt_mask), jnp.asarray(tokens),
               jnp.asarray(mask), jnp.asarray(seg.cuts_NxK1), jnp.asarray(probe_ids),
               jnp.asarray(answer), jnp.asarray(answer_mask), count_closing_tokens=False)

    # Reference: text prefixes, tokenised from text, one left-padded batch of plain forwards.
    rows, n_ans = [], []
    for i, it in enumerate(items):
        ends = [it.solution.index("<think>") + len("<think>")]
        ends += [it.solution.index(s) + len(s) for s in it.steps]
        ends += [ends[-1]] * (max_steps + 1 - len(ends))
        for k, end in enumerate(ends):
            prefix = prompts[i] + it.solution[:end]
            # the token-space cut is the text prefix, token for token
            assert enc(prefix) == p_ids[i] + c_ids[i][:seg.cuts_NxK1[i, k]], (i, k)
            for v, text in enumerate(variants[i]):
                ids = enc(prefix + PROBE + text)
                assert ids[len(ids) - len(a_ids[i][v]):] == a_ids[i][v]
                rows.append(ids)
                n_ans.append(len(a_ids[i][v]))
    width = max(map(len, rows))
    batch = np.zeros((len(rows), width), np.int32)
    bmask = np.zeros((len(rows), width), bool)
    for r, ids in enumerate(rows):
        batch[r, width - len(ids):], bmask[r, width - len(ids):] = ids, True
    lp = np.asarray(plain_logprobs(jnp.asarray(batch), jnp.asarray(bmask)))
    l_flat = np.array([lp[r, width - n:].mean() for r, n in enumerate(n_ans)])
    l_NxK1xV = l_flat.reshape(len(items), max_steps + 1, 2)
    for how in VARIANT_REDUCTIONS:
        want = np_reduce(l_NxK1xV, np.ones((len(items), 2), bool), how)
        np.testing.assert_allclose(got[how], want, atol=1e-5, rtol=0, err_msg=how)
