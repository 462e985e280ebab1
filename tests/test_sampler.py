"""The sampler: KV-cache decoding against a plain forward, sampler log-probs against teacher-forced
scoring, greedy parity with transformers' `generate`, padding and batch invariance, determinism,
stop tokens and sequences, truncation, and top-k / top-p filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import random_params

from migjax.models import PRESETS, KVCache, load_pretrained, merge, split
from migjax.models.scoring import token_logprobs
from migjax.models.transformer import cache_mask, positions_from_mask
from migjax.rollout import SamplingRules, filter_logits, sample
from migjax.rollout.sampler import _stopped

CFG = PRESETS["tiny"]
P, C = 10, 12
LENGTHS = (10, 6, 3, 10, 6, 8, 1, 6)  # real prompt tokens of the 8 prompts (left-padded to P)
GREEDY = SamplingRules(max_new_tokens=C, greedy=True)
SAMPLE_T1 = SamplingRules(max_new_tokens=C, temperature=1.0)
SAMPLE_T07 = SamplingRules(max_new_tokens=C, temperature=0.7)



def left_pad(rows, width, pad_id=0):
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def parts():
    return random_params(CFG)


@pytest.fixture(scope="module")
def prompts():
    """The 8 prompts' real tokens and their left-padded [8, P] batch."""
    rng = np.random.RandomState(0)
    rows = [rng.randint(1, CFG.vocab_size, n).astype(np.int32) for n in LENGTHS]
    return rows, *left_pad(rows, P)


@pytest.fixture(scope="module")
def scorer(parts):
    """Jitted teacher-forced log-probs of prompt + completion (temperature traced)."""
    graphdef, _ = parts

    @jax.jit
    def score(params, r, temperature):
        tokens = jnp.concatenate([r.prompt_NxP, r.tokens_NxC], axis=1)
        mask = jnp.concatenate([r.prompt_mask_NxP, r.mask_NxC], axis=1)
        lp, _ = token_logprobs(merge(graphdef, params), tokens, mask, temperature=temperature)
        return lp[:, r.prompt_NxP.shape[1]:]

    return score


@pytest.fixture(scope="module")
def greedy8(parts, prompts):
    graphdef, params = parts
    _, tokens, mask = prompts
    return sample(graphdef, params, tokens, mask, jax.random.key(0), rules=GREEDY)


def stops_at(row, j, stop_ids, stop_seqs):
    """Reference: whether the token at column j of `row` ends a stop token or stop sequence."""
    return row[j] in stop_ids or any(
        j + 1 >= len(seq) and tuple(row[j + 1 - len(seq):j + 1]) == tuple(seq)
        for seq in stop_seqs)


def first_stop(row, stop_ids, stop_seqs):
    """Reference: index of the token that ends `row` (len(row) when none does)."""
    return next((j for j in range(len(row)) if stops_at(row, j, stop_ids, stop_seqs)), len(row))


# ------------------------------------------------------------------------------ KV cache
def test_kv_cache_decode_equals_the_teacher_forced_forward(parts, prompts):
    """Prefill left-padded prompts into the cache, then feed 6 known tokens one at a time: every
    prefill and decode logit equals the plain forward's logit at that position."""
    graphdef, params = parts
    _, ptok, pmask = prompts
    n, d = ptok.shape[0], 6
    fed = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (n, d)), jnp.int32)

    @jax.jit
    def prefill(params, tokens, mask):
        model = merge(graphdef, params)
        cache, attn = cache_mask(KVCache.empty(CFG, n, P + d), mask)
        h, cache = model.hidden(tokens, positions_from_mask(mask), attn, cache)
        return model.logits(h), cache

    @jax.jit
    def decode(params, cache, tok_Nx1):
        model = merge(graphdef, params)
        pos_Nx1 = jnp.sum(cache.mask_NxS, axis=1, keepdims=True).astype(jnp.int32)
        cache, attn = cache_mask(cache, jnp.ones((n, 1), bool))
        h, cache = model.hidden(tok_Nx1, pos_Nx1, attn, cache)
        return model.logits(h), cache

    logits, cache = prefill(params, ptok, pmask)
    got = [logits]
    for t in range(d):
        logits, cache = decode(params, cache, fed[:, t:t + 1])
        got.append(logits)
    # prefill rows, then one row per fed token but the last (its logits are checked below)
    got = np.concatenate([np.asarray(g) for g in got[:-1]], axis=1)
    tokens = jnp.concatenate([ptok, fed], axis=1)
    mask = jnp.concatenate([pmask, jnp.ones((n, d), bool)], axis=1)
    want = np.asarray(jax.jit(lambda p, t, m: merge(graphdef, p)(t, m))(params, tokens, mask))
    real = np.asarray(mask)[:, :P + d - 1]
    assert int(cache.index) == P + d
    assert np.abs(got - want[:, :P + d - 1])[real].max() < 1e-5
    np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, -1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("rules", [SAMPLE_T1, SAMPLE_T07], ids=["t1", "t0.7"])
def test_sampler_logprobs_equal_teacher_forced_logprobs(parts, prompts, scorer, rules):
    graphdef, params = parts
    _, ptok, pmask = prompts
    r = sample(graphdef, params, ptok[:4], pmask[:4], jax.random.key(3), rules=rules,
               group_size=2)
    assert r.tokens_NxC.shape == r.sampler_logp_NxC.shape == (8, C)
    np.testing.assert_array_equal(r.prompt_NxP, np.repeat(np.asarray(ptok[:4]), 2, axis=0))
    want = np.asarray(scorer(params, r, rules.temperature))
    m = np.asarray(r.mask_NxC)
    assert m.all()  # no stop rules: every column is a real token
    np.testing.assert_allclose(np.asarray(r.sampler_logp_NxC)[m], want[m], atol=1e-5, rtol=0)
    # the two samples of a group differ (they are sampled, not copied)
    tok = np.asarray(r.tokens_NxC)
    assert all((tok[2 * i] != tok[2 * i + 1]).any() for i in range(4))


def test_greedy_logprobs_equal_teacher_forced_logprobs(parts, greedy8, scorer):
    _, params = parts
    want = np.asarray(scorer(params, greedy8, 1.0))
    np.testing.assert_allclose(greedy8.sampler_logp_NxC, want, atol=1e-5, rtol=0)
    assert np.asarray(greedy8.truncated_N).all()


def test_sampling_is_deterministic_for_a_key(parts, prompts):
    graphdef, params = parts
    _, ptok, pmask = prompts
    run = lambda k: sample(graphdef, params, ptok[:4], pmask[:4], jax.random.key(k),
                           rules=SAMPLE_T1, group_size=2)
    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (np.asarray(a.tokens_NxC) != np.asarray(c.tokens_NxC)).any()


# ----------------------------------------------------------------- padding and batching
def test_a_prompt_alone_unpadded_equals_its_padded_row_in_a_batch_of_eight(parts, prompts,
                                                                           greedy8):
    """Batch of 1 against batch of 8, and no padding against left padding: each prompt of 6 real
    tokens, sampled alone as a [1, 6] batch, gives the same greedy tokens and log-probs as its
    row of the [8, 10] batch (4 padding tokens)."""
    graphdef, params = parts
    rows, _, _ = prompts
    idx = [i for i, n in enumerate(LENGTHS) if n == 6]
    assert len(idx) == 3
    for i in idx:
        tok, mask = left_pad([rows[i]], 6)
        r = sample(graphdef, params, tok, mask, jax.random.key(0), rules=GREEDY)
        assert r.tokens_NxC.shape == (1, C)
        np.testing.assert_array_equal(r.tokens_NxC[0], greedy8.tokens_NxC[i])
        np.testing.assert_allclose(r.sampler_logp_NxC[0], greedy8.sampler_logp_NxC[i],
                                   atol=1e-5, rtol=0)


# -------------------------------------------------------------------- stops and filters
def test_stop_tokens_and_sequences_end_samples(parts, prompts, greedy8):
    """A stop token and a two-token stop sequence taken from the greedy completions: each sample
    ends at the first hit, its mask includes the stop token, everything after is padding, and a
    sample that never hits a stop is truncated."""
    graphdef, params = parts
    _, ptok, pmask = prompts
    full = np.asarray(greedy8.tokens_NxC)
    stop_id = int(full[0, 5])
    seq = (int(full[1, 3]), int(full[1, 4]))
    rules = SamplingRules(max_new_tokens=C, greedy=True, stop_ids=(stop_id,), stop_seqs=(seq,),
                          pad_id=CFG.vocab_size - 1)
    r = sample(graphdef, params, ptok, pmask, jax.random.key(0), rules=rules)
    tok, mask = np.asarray(r.tokens_NxC), np.asarray(r.mask_NxC)
    ends = [first_stop(row.tolist(), (stop_id,), (seq,)) for row in full]
    assert ends[0] <= 5 and ends[1] <= 4
    assert min(ends) < C and C in ends  # some samples stop, some run out of budget
    for i, e in enumerate(ends):
        np.testing.assert_array_equal(mask[i], np.arange(C) <= e)
        np.testing.assert_array_equal(tok[i, :e + 1], full[i, :e + 1])
        assert (tok[i, e + 1:] == rules.pad_id).all()
        assert (np.asarray(r.sampler_logp_NxC)[i, e + 1:] == 0).all()
        np.testing.assert_allclose(r.sampler_logp_NxC[i, :e + 1],
                                   greedy8.sampler_logp_NxC[i, :e + 1], atol=1e-5, rtol=0)
        assert bool(r.truncated_N[i]) == (e == C)


def test_in_loop_stop_detection():
    """The decode loop's check (column i about to be written, earlier columns filled, later ones
    still padding) finds exactly the columns that end a stop token or sequence, so the loop ends
    as soon as every sample has stopped."""
    rows = np.random.RandomState(0).randint(0, 4, (8, 12)).astype(np.int32)
    rules = SamplingRules(stop_ids=(3,), stop_seqs=((1, 2), (0, 0, 1), (2,)), pad_id=7)
    check = jax.jit(_stopped, static_argnames="rules")
    for i in range(12):
        written = jnp.asarray(np.where(np.arange(12) < i, rows, rules.pad_id))
        got = np.asarray(check(written, jnp.int32(i), jnp.asarray(rows[:, i]), rules=rules))
        want = [stops_at(r.tolist(), i, rules.stop_ids, rules.stop_seqs) for r in rows]
        assert got.tolist() == want, i
    assert any(stops_at(r.tolist(), i, (), ((0, 0, 1),)) for r in rows for i in range(12))


def test_top_k_one_equals_greedy(parts, prompts, greedy8):
    graphdef, params = parts
    _, ptok, pmask = prompts
    rules = SamplingRules(max_new_tokens=C, temperature=1.0, top_k=1)
    r = sample(graphdef, params, ptok, pmask, jax.random.key(11), rules=rules)
    np.testing.assert_array_equal(r.tokens_NxC, greedy8.tokens_NxC)
    np.testing.assert_allclose(r.sampler_logp_NxC, greedy8.sampler_logp_NxC, atol=1e-5, rtol=0)


def test_filter_logits_by_hand():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    kept = lambda **kw: np.asarray(filter_logits(logits, SamplingRules(**kw)))[0] > -1e30
    # top-p keeps the smallest set of most likely tokens whose mass reaches p
    assert kept(top_p=0.4).tolist() == [False, True, False, False]
    assert kept(top_p=0.75).tolist() == [False, True, False, True]
    assert kept(top_p=0.9).tolist() == [False, True, True, True]
    assert kept(top_p=0.99).tolist() == [True, True, True, True]
    assert kept(top_k=2).tolist() == [False, True, False, True]
    assert kept(top_k=3, top_p=0.75).tolist() == [False, True, False, True]
    assert kept(top_k=10).tolist() == [True, True, True, True]  # k above the vocabulary: no-op
    # the kept logits are the tempered ones, unchanged
    x = np.asarray(filter_logits(logits, SamplingRules(temperature=0.5, top_p=0.75)))[0]
    np.testing.assert_allclose(x[[1, 3]], np.log(probs[0, [1, 3]]) / 0.5, rtol=1e-6)
    # top-p is applied to the tempered distribution: at T=0.25 the top token alone has 0.87
    assert (np.asarray(filter_logits(logits, SamplingRules(temperature=0.25, top_p=0.8)))[0]
            > -1e30).tolist() == [False, True, False, False]


# ----------------------------------------------------------------- transformers parity
def test_greedy_matches_transformers_generate(tmp_path, prompts):
    """A random float32 Qwen2ForCausalLM of the tiny shape, saved with save_pretrained and loaded
    with load_pretrained: greedy completions of the 8 left-padded prompts agree token for token
    with transformers' greedy `generate`."""
    hf_cfg = transformers.Qwen2Config(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
        intermediate_size=CFG.intermediate_size, num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        head_dim=CFG.head_dim, rms_norm_eps=CFG.rms_norm_eps, rope_theta=CFG.rope_theta,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    model, cfg = load_pretrained(str(tmp_path))
    assert cfg == CFG  # same shapes: the greedy sampler compiled for the tiny model is reused
    graphdef, params = split(model)

    _, ptok, pmask = prompts
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(np.asarray(ptok), dtype=torch.long),
                           attention_mask=torch.tensor(np.asarray(pmask), dtype=torch.long),
                           do_sample=False, max_new_tokens=C, min_new_tokens=C, pad_token_id=0)
    want = out[:, P:].numpy()
    assert want.shape == (len(LENGTHS), C)
    r = sample(graphdef, params, ptok, pmask, jax.random.key(0), rules=GREEDY)
    np.testing.assert_array_equal(np.asarray(r.tokens_NxC), want)
    assert len(set(want.ravel().tolist())) > 8  # not one repeated token
