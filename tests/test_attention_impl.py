"""`model.attn_impl`: the `jax.nn.dot_product_attention` route of causal attention gives the
einsum's logits, gradients and prefill to float32 rounding (left padding, GQA, Gemma 3 sliding
windows), which calls take it, and "cudnn" off a GPU fails with one line instead of falling back.
The route is run with implementation="xla" here; cuDNN itself needs a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from migjax.configs.base import get_config
from migjax.experiment import scratch_config
from migjax.models import KVCache, ModelConfig, merge
from migjax.models import transformer as tr
from migjax.models.scoring import token_logprobs
from migjax.models.transformer import cache_mask, positions_from_mask

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
             head_dim=8)
CONFIGS = {
    "qwen2-gqa2": ModelConfig(model_type="qwen2", num_layers=2, **SHAPE),
    # windows of 3 positions, shorter than the sequences, between a global layer
    "gemma3-sliding": ModelConfig(
        model_type="gemma3_text", num_layers=3, qk_norm=True, attention_bias=False,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        sliding_window=3, rope_local_theta=1000.0, query_pre_attn_scalar=12.0, **SHAPE),
}
# Left padding of 0, 3 and 6 tokens; the second row also ends in right padding.
MASK = np.array([[1] * 10, [0] * 3 + [1] * 5 + [0] * 2, [0] * 6 + [1] * 4], bool)
TOKENS = np.random.RandomState(0).randint(3, 64, MASK.shape).astype(np.int32)


def route_through_dpa(m):
    """Sends every causal attention through jax.nn.dot_product_attention(implementation="xla")
    (on the monkeypatch `m`); returns the list of the implementations it is then called with."""
    calls, real = [], jax.nn.dot_product_attention

    def spy(*args, **kw):
        calls.append(kw["implementation"])
        return real(*args, **kw)

    m.setattr(jax.nn, "dot_product_attention", spy)
    m.setattr(tr, "attention_kernel", lambda cfg, t, s: "xla")
    return calls


def both_routes(fn, monkeypatch):
    """(fn() with the einsum, fn() through dot_product_attention, the calls made to it)."""
    ref = fn()
    with monkeypatch.context() as m:
        calls = route_through_dpa(m)
        out = fn()
    return ref, out, calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_the_einsum(name, monkeypatch):
    graphdef, params = random_params(CONFIGS[name])
    model = merge(graphdef, params)
    ref, out, calls = both_routes(lambda: np.asarray(model(TOKENS, MASK)), monkeypatch)
    assert calls and set(calls) == {"xla"}
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_match_the_einsum(name, monkeypatch):
    """The training forward and backward: the gradient of the masked mean log-prob."""
    graphdef, params = random_params(CONFIGS[name])

    def grads():
        def loss(p):
            lp, _ = token_logprobs(merge(graphdef, p), TOKENS, MASK)
            return jnp.sum(lp * MASK) / MASK.sum()
        return jax.tree.map(np.asarray, jax.grad(loss)(params))

    ref, out, calls = both_routes(grads, monkeypatch)
    assert calls
    for k in ref:
        scale = np.abs(ref[k]).max()  # float32 rounding, relative to the gradient's size
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_into_the_cache_matches_the_einsum(name, monkeypatch):
    """The sampler's prefill (a causal mask over the whole cache, S > T), then a decoding step,
    which keeps the einsum."""
    cfg = CONFIGS[name]
    model = merge(*random_params(cfg))
    n, t = MASK.shape

    def prefill_then_step():
        cache, attn = cache_mask(KVCache.empty(cfg, n, t + 2), MASK)
        h, cache = model.hidden(TOKENS, positions_from_mask(MASK), attn, cache, causal=True)
        cache, attn = cache_mask(cache, np.ones((n, 1), bool))
        pos = MASK.sum(1, keepdims=True).astype(np.int32)
        h1, _ = model.hidden(TOKENS[:, -1:], pos, attn, cache)
        return np.asarray(h), np.asarray(h1)

    (h, h1), (h_dpa, h1_dpa), calls = both_routes(prefill_then_step, monkeypatch)
    assert calls
    np.testing.assert_allclose(h_dpa, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1_dpa, h1, rtol=1e-5, atol=1e-5)


def test_custom_masks_keep_the_einsum(monkeypatch):
    """A packed-probe style mask (`attn_mask`) never goes through dot_product_attention."""
    dpa_calls = route_through_dpa(monkeypatch)
    model = merge(*random_params(CONFIGS["qwen2-gqa2"]))
    t = TOKENS.shape[1]
    probe = np.broadcast_to(np.tril(np.ones((t, t), bool)) & ~np.eye(t, k=-2, dtype=bool),
                            (len(TOKENS), t, t))
    model(TOKENS, MASK, attn_mask=probe)
    assert dpa_calls == []
    model(TOKENS, MASK)
    assert dpa_calls


def test_which_calls_take_cudnn(monkeypatch):
    qwen = CONFIGS["qwen2-gqa2"]
    bf16 = qwen.replace(dtype="bfloat16")
    assert tr.attention_kernel(qwen, 8, 8) is None  # "xla", the default
    assert tr.attention_kernel(bf16.replace(attn_impl="auto"), 8, 8) is None  # CPU
    assert tr.attention_kernel(bf16.replace(attn_impl="cudnn"), 1, 8) is None  # decoding
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    auto = bf16.replace(attn_impl="auto")
    assert tr.attention_kernel(auto, 8, 8) == "cudnn"
    assert tr.attention_kernel(auto, 8, 16) == "cudnn"  # a prefill into a longer cache
    assert tr.attention_kernel(auto, 7, 7) is None  # odd lengths: no cuDNN backward with a mask
    assert tr.attention_kernel(auto.replace(dtype="float32"), 8, 8) is None
    assert tr.attention_kernel(auto.replace(head_dim=256), 8, 8) is None
    assert tr.attention_kernel(bf16.replace(attn_impl="cudnn"), 8, 8) == "cudnn"


def test_cudnn_off_a_gpu_fails_in_one_line():
    """No silent fallback: explicit "cudnn" on the CPU raises before computing anything; float32
    is refused on any backend (cuDNN has no float32 kernel)."""
    for dtype, match in (("bfloat16", "needs a CUDA GPU but JAX's backend is 'cpu'"),
                         ("float32", "needs dtype bfloat16 or float16")):
        cfg = CONFIGS["qwen2-gqa2"].replace(attn_impl="cudnn", dtype=dtype, param_dtype=dtype)
        model = merge(*random_params(cfg))
        with pytest.raises(ValueError, match=match) as e:
            model(TOKENS, MASK)
        assert "\n" not in str(e.value)


def test_attn_impl_stays_out_of_config_json():
    cfg = CONFIGS["gemma3-sliding"].replace(attn_impl="auto")
    hf = cfg.to_hf()
    assert not any("attn" in k and "impl" in k for k in hf)
    assert ModelConfig.from_hf(hf).attn_impl == "xla"
    assert ModelConfig.from_hf(hf, attn_impl="auto") == cfg
    with pytest.raises(ValueError, match="attn_impl='flash'; expected one of"):
        cfg.replace(attn_impl="flash")


def test_the_run_config_sets_it():
    class Tokenizer:  # what scratch_config reads of a tokenizer
        eos_token_id, pad_token_id, bos_token_id = 1, 0, None

        def __len__(self):
            return 64

    c = get_config()
    c.model.attn_impl = "auto"
    assert scratch_config(c, Tokenizer()).attn_impl == "auto"
