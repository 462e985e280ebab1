"""MIG's step likelihoods read from the sampler's KV cache (`step_likelihoods_on_cache`) equal
the fast pass and the naive one-forward-per-prefix reference, and the trainer uses the cache only
when the policy itself scores."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params
from hypothesis import given, settings
from hypothesis import strategies as st

from migjax.models import PRESETS, merge
from migjax.models.config import ModelConfig
from migjax.models.transformer import KVCache, cache_mask, positions_from_mask
from migjax.rewards.mig import step_likelihoods, step_likelihoods_naive, step_likelihoods_on_cache
from migjax.rollout import SamplingRules, sample

CONFIGS = {
    "tiny": PRESETS["tiny"],
    # windows of 3 positions between a global layer: the probes' windows count in positions
    "gemma3-sliding": ModelConfig(
        model_type="gemma3_text", num_layers=3, qk_norm=True, attention_bias=False,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        sliding_window=3, rope_local_theta=1000.0, query_pre_attn_scalar=12.0, vocab_size=64,
        hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8),
}
N, P, C, K1, NV, A, Q = 3, 5, 9, 4, 2, 3, 2


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return merge(*random_params(CONFIGS[request.param]))


def prefilled_cache(model, prompt_NxP, prompt_mask_NxP, tokens_NxC):
    """The cache one prefill of prompt + completion leaves: slot s holds column s."""
    seq = jnp.concatenate([prompt_NxP, tokens_NxC], axis=1)
    valid = jnp.concatenate([prompt_mask_NxP, jnp.ones_like(tokens_NxC, bool)], axis=1)
    cache, attn = cache_mask(KVCache.empty(model.cfg, *seq.shape), valid)
    _, cache = model.hidden(seq, positions_from_mask(valid), attn, cache)
    return cache


@functools.partial(jax.jit, static_argnames="count_closing_tokens")
def on_prefilled_cache(model, *arrays, count_closing_tokens):
    cache = prefilled_cache(model, *arrays[:3])
    return step_likelihoods_on_cache(model, cache, *arrays, chunk_size=16,
                                     count_closing_tokens=count_closing_tokens)


@st.composite
def layouts(draw, vocab):
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    prompt_len = draw(st.lists(st.integers(1, P), min_size=N, max_size=N))
    comp_len = draw(st.lists(st.integers(0, C), min_size=N, max_size=N))
    cuts = np.zeros((N, K1), np.int32)
    for i in range(N):
        k = draw(st.integers(0, K1 - 1))
        c = sorted(draw(st.lists(st.integers(0, comp_len[i]), min_size=k + 1, max_size=k + 1)))
        cuts[i] = c + [c[-1]] * (K1 - 1 - k)
    ans_len = np.array(draw(st.lists(st.integers(0, A), min_size=N * NV, max_size=N * NV)))
    return (rng.randint(0, vocab, (N, P)).astype(np.int32),
            np.arange(P)[None] >= P - np.array(prompt_len)[:, None],
            rng.randint(0, vocab, (N, C)).astype(np.int32),
            np.arange(C)[None] < np.array(comp_len)[:, None], cuts,
            rng.randint(0, vocab, Q).astype(np.int32),
            rng.randint(0, vocab, (N, NV, A)).astype(np.int32),
            np.arange(A)[None, None] < ans_len.reshape(N, NV)[..., None])


@settings(max_examples=12, deadline=None)
@given(data=st.data(), count_closing_tokens=st.booleans())
def test_cache_path_equals_the_naive_path_on_random_layouts(model, data, count_closing_tokens):
    """Random prompt and completion lengths, cuts (0 included), absent answer variants."""
    arrays = [jnp.asarray(x) for x in data.draw(layouts(model.cfg.vocab_size))]
    got = on_prefilled_cache(model, *arrays, count_closing_tokens=count_closing_tokens)
    want = step_likelihoods_naive(model, *arrays, count_closing_tokens=count_closing_tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_the_samplers_cache_gives_the_fast_paths_likelihoods(model):
    """A real rollout: left-padded prompts, G = 2 samples sharing each prompt's prefill, a stop
    token (the last sampled token was never fed back), cuts up to each completion's end."""
    cfg = model.cfg
    graphdef, params = random_params(cfg)
    b, p, c, g = 3, 6, 12, 2
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, p)), jnp.int32)
    pmask = jnp.asarray(np.arange(p)[None] >= np.array([[0], [2], [4]]))
    rules = SamplingRules(max_new_tokens=c, stop_ids=tuple(range(1, cfg.vocab_size // 6)),
                          pad_id=0)
    ro, cache = sample(graphdef, params, prompt, pmask, jax.random.key(1), rules=rules,
                       group_size=g, return_cache=True)
    assert cache.k.shape[3] == p + c
    lens = np.asarray(ro.mask_NxC).sum(1)
    assert lens.min() < c  # some sample stopped early
    cuts = np.stack([np.sort(rng.integers(0, n_ + 1, 5)) for n_ in lens])
    cuts[:, 0], cuts[0, -1] = 0, lens[0]  # l_0, and a prefix that is the whole completion
    args = [ro.prompt_NxP, ro.prompt_mask_NxP, ro.tokens_NxC, ro.mask_NxC,
            jnp.asarray(cuts, jnp.int32), jnp.asarray([5, 6, 7], jnp.int32),
            jnp.asarray(rng.integers(3, cfg.vocab_size, (b * g, 2, 4)), jnp.int32),
            jnp.asarray(np.tile([[1, 1, 1, 0], [1, 1, 0, 0]], (b * g, 1, 1)).astype(bool))]
    model = merge(graphdef, params)
    got = np.asarray(step_likelihoods_on_cache(model, cache, *args))
    np.testing.assert_allclose(got, np.asarray(step_likelihoods(model, *args)), atol=2e-5)
    np.testing.assert_allclose(got, np.asarray(step_likelihoods_naive(model, *args)), atol=2e-5)
    assert np.ptp(got) > 1e-3  # the likelihoods differ across prefixes and samples
    with pytest.raises(ValueError, match="cache of 18 slots"):
        step_likelihoods_on_cache(model, cache, *args[:2], args[2][:, :4], args[3][:, :4],
                                  *args[4:])


@pytest.mark.parametrize("variant,reads_cache", [("mig", True), ("reference_scorer", False)])
def test_the_trainer_reads_the_cache_only_when_the_policy_scores(variant, reads_cache, tmp_path,
                                                                 sft_model, monkeypatch):
    """mig.scorer=policy: the sampler returns its cache and the stage reads it; a frozen
    reference scorer has other parameters than the sampler's, so it runs its own pass."""
    import helpers

    from migjax import trainer
    from migjax.rewards import stage as stage_mod

    asked, read = [], []
    real_sample, real_cached = trainer.sample, stage_mod.score_steps_on_cache
    monkeypatch.setattr(trainer, "sample", lambda *a, **kw: (
        asked.append(kw["return_cache"]), real_sample(*a, **kw))[1])
    monkeypatch.setattr(stage_mod, "score_steps_on_cache", lambda *a, **kw: (
        read.append(1), real_cached(*a, **kw))[1])
    c = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny", model_path=sft_model,
                                                         rl__steps=1), variant)
    summary = trainer.train(c, str(tmp_path))
    assert summary["steps"] == 1
    assert asked[0] is reads_cache and len(read) == int(reads_cache)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    step = next(r for r in rows if "mig/lK" in r)
    assert np.isfinite(step["mig/lK"]) and step["mig/lK"] <= 0
