"""Gemma 3 (text) against transformers on tiny random checkpoints: sliding-window layers shorter
than the sequence interleaved with global ones, separate local and global rope bases (and linear
scaling on the global ones), query_pre_attn_scalar, q/k norms, the four norms per layer with
Gemma's (1 + w), the scaled embedding and GeGLU. Logits (plain, left-padded and through the KV
cache), greedy generation, the MIG probes against the naive passes, and export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from migjax.models import load_pretrained, save_pretrained, split
from migjax.models.transformer import cache_mask
from migjax.rewards.mig import step_likelihoods, step_likelihoods_naive
from migjax.rollout.sampler import SamplingRules, sample

V, WINDOW = 96, 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def gemma_torch(seed=0, **fields):
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
              max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                  "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default",
                                                     "rope_theta": 1000.0}})
    cfg = transformers.Gemma3TextConfig(**{**kw, **fields})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    ref = gemma_torch()
    path = tmp_path_factory.mktemp("gemma3")
    ref.save_pretrained(path)
    model, cfg = load_pretrained(str(path))
    return ref, model, cfg, str(path)


def torch_logits(ref, ids, mask=None, pos=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    if pos is not None:
        kw["position_ids"] = torch.tensor(pos)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


def test_config_reads_every_gemma_field(gemma):
    _, _, cfg, _ = gemma
    assert cfg.is_gemma and cfg.tie_word_embeddings and cfg.qk_norm
    assert cfg.sliding_layers == (True, False, True, True) and cfg.sliding_window == WINDOW
    assert cfg.rope_local_theta == 1000.0 and cfg.rope_theta == 100000.0
    assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert cfg.attn_scale == pytest.approx(24 ** -0.5)
    _, params = split(gemma[1])
    assert cfg.num_params() == sum(int(np.prod(v.shape)) for v in params.values())


def test_logits_match_transformers_past_the_window(gemma):
    ref, model, _, _ = gemma
    ids = np.random.RandomState(0).randint(3, V, (2, 14))  # 14 tokens, window 4
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    want = torch_logits(ref, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the window matters: a model that saw every position would differ
    full = gemma_torch(layer_types=["full_attention"] * 4)
    assert np.abs(torch_logits(full, ids) - want).max() > 1e-2


def test_left_padded_batch_matches_transformers(gemma):
    ref, model, _, _ = gemma
    rng = np.random.RandomState(1)
    ids = rng.randint(3, V, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    got = np.asarray(nnx.jit(lambda m, x, a: m(x, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    want = torch_logits(ref, ids, mask, pos)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_kv_cache_decoding_equals_the_plain_forward(gemma):
    from migjax.models import KVCache

    _, model, cfg, _ = gemma
    ids = jnp.asarray(np.random.RandomState(2).randint(3, V, (2, 11)))
    plain = nnx.jit(lambda m, x: m(x))(model, ids)

    @nnx.jit
    def decode(m, ids):
        cache = KVCache.empty(cfg, 2, 16)
        cache, mask = cache_mask(cache, jnp.ones((2, 5), bool))
        pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
        h, cache = m.hidden(ids[:, :5], pos, mask, cache)
        outs = [m.logits(h)]
        for t in range(5, ids.shape[1]):
            cache, mask = cache_mask(cache, jnp.ones((2, 1), bool))
            h, cache = m.hidden(ids[:, t:t + 1], jnp.full((2, 1), t), mask, cache)
            outs.append(m.logits(h))
        return jnp.concatenate(outs, axis=1)

    np.testing.assert_allclose(np.asarray(decode(model, ids)), np.asarray(plain), atol=1e-4,
                               rtol=0)


def test_greedy_generation_matches_transformers(gemma):
    ref, model, cfg, _ = gemma
    prompt = np.random.RandomState(3).randint(3, V, (1, 6))
    new = 12  # well past the window
    with torch.no_grad():
        hf = ref.generate(torch.tensor(prompt), max_new_tokens=new, do_sample=False,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0).numpy()
    graphdef, params = split(model)
    rules = SamplingRules(max_new_tokens=new, greedy=True, stop_ids=(), stop_seqs=(), pad_id=0)
    ro = sample(graphdef, params, jnp.asarray(prompt), jnp.ones((1, 6), bool),
                jax.random.key(0), rules=rules)
    np.testing.assert_array_equal(np.asarray(ro.tokens_NxC)[0], hf[0, 6:])


def test_mig_probes_match_the_naive_passes(gemma):
    """The probes carry their own positions: their window counts from the end of their prefix,
    exactly as a plain forward over prompt + prefix_k + probe + answer, also on the sequence's
    keys they read (probe blocks of 6 tokens, longer than the window; two answer variants, one
    absent in the second row)."""
    _, model, _, _ = gemma
    rng = np.random.RandomState(4)
    n, p, c, k1 = 2, 5, 10, 4
    prompt = jnp.asarray(rng.randint(3, V, (n, p)))
    pmask = jnp.asarray(np.array([[1] * p, [0, 0] + [1] * (p - 2)], bool))
    tokens = jnp.asarray(rng.randint(3, V, (n, c)))
    mask = jnp.asarray(np.arange(c)[None] < np.array([[c], [8]]))
    cuts = jnp.asarray(np.array([[1, 4, 7, 10], [2, 5, 8, 8]], np.int32))
    probe = jnp.asarray(rng.randint(3, V, (3,)))
    answer = jnp.asarray(rng.randint(3, V, (n, 2, 3)))
    amask = jnp.asarray(np.arange(3)[None, None] < np.array([[3, 2], [1, 0]])[..., None])
    fast = nnx.jit(lambda m, *a: step_likelihoods(m, *a, chunk_size=8))(
        model, prompt, pmask, tokens, mask, cuts, probe, answer, amask)
    naive = step_likelihoods_naive(model, prompt, pmask, tokens, mask, cuts, probe, answer,
                                   amask)
    assert fast.shape == (n, k1)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(naive), atol=2e-5, rtol=0)


def test_export_reloads_in_transformers_with_the_same_logits(gemma, tmp_path):
    ref, model, cfg, _ = gemma
    out = save_pretrained(model, cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back).__name__ == "Gemma3ForCausalLM"
    assert back.config.layer_types == LAYER_TYPES and back.config.sliding_window == WINDOW
    ids = np.random.RandomState(5).randint(3, V, (2, 13))
    np.testing.assert_allclose(torch_logits(back, ids), torch_logits(ref, ids), atol=1e-5,
                               rtol=0)
