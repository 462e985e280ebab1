"""The decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3, SmolLM2, Gemma 3) as a Flax NNX
module whose layers are stacked along a leading axis and applied with `lax.scan`, plus its KV
cache. Gemma 3's local layers attend to the last `sliding_window` positions (the distance of
position ids without a cache, of cache slots with one: a left-padded cache holds each sequence's
tokens in consecutive slots), with their own rope base. Causal attention runs as an einsum over
the boolean mask or, by `cfg.attn_impl`, through `jax.nn.dot_product_attention` (cuDNN).

Every parameter has logical axis names in `PARAM_AXES`; `migjax.models.sharding` maps them
onto a `(data, fsdp, tensor)` mesh.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from migjax.models.config import REMAT_POLICIES, ModelConfig

# Logical axes of every parameter, by name. Layer parameters carry a leading "layers" axis.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "bq": ("layers", "heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "post_attn_norm": ("layers", "embed"),  # Gemma: on the attention output
    "post_mlp_norm": ("layers", "embed"),  # Gemma: on the MLP output
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of sequences written left to right.

    k, v: [L, N, KVH, S, Dh] (compute dtype; heads before slots, the layout `attention` reads
    without a transpose); mask_NxS: which slots hold a real token;
    index: the next slot to write (int32 scalar, the same for the whole batch).
    """

    k: jax.Array
    v: jax.Array
    mask_NxS: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
        z = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(z, z, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))

    def repeat(self, g: int) -> KVCache:
        """Each sequence's cache repeated `g` times along the batch (a GRPO group)."""
        return KVCache(jnp.repeat(self.k, g, axis=1), jnp.repeat(self.v, g, axis=1),
                       jnp.repeat(self.mask_NxS, g, axis=0), self.index)


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> jax.Array:
    """Inverse frequencies, with Llama 3 or linear scaling when the config asks for it (`theta`
    given: a plain rope of that base, for Gemma's local layers)."""
    d = cfg.head_dim
    inv = 1.0 / ((theta or cfg.rope_theta) ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    sc = None if theta else cfg.rope_scaling_dict
    if sc and sc.get("rope_type") == "linear":
        return inv / sc["factor"]
    if sc:
        factor = sc["factor"]
        lo, hi = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x_NxTxHxD: jax.Array, pos_NxT: jax.Array, inv_freq: jax.Array,
               mrope_section: tuple[int, ...] | None = None) -> jax.Array:
    """Rotary embedding. pos: [N, T], or [3, N, T] (time, height, width) with `mrope_section`:
    frequency section i takes its angles from position row i % 3 (Qwen2.5-VL's M-RoPE)."""
    if pos_NxT.ndim == 3:
        if mrope_section is None:
            raise ValueError(f"positions {tuple(pos_NxT.shape)}: [3, N, T] positions need a "
                             "config with mrope_section")
        rows_K = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
        pos_NxTxK = jnp.moveaxis(pos_NxT, 0, -1)[..., rows_K]
        ang = pos_NxTxK.astype(jnp.float32) * inv_freq  # [N, T, D/2]
    else:
        ang = pos_NxT[..., None].astype(jnp.float32) * inv_freq  # [N, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x = x_NxTxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_NxTxHxD.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x / rms(x) * (offset + w), in float32 (Gemma stores w with offset 1)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def window_mask(q_at_NxT: jax.Array, k_at_NxS: jax.Array, window: int) -> jax.Array:
    """[N, T, S]: key within the last `window` positions of the query (q - k < window)."""
    return (q_at_NxT[:, :, None] - k_at_NxS[:, None, :]) < window


def attention(q, k, v, mask_NxTxS, scale: float | None = None, *, causal: bool = False,
              implementation: str | None = None):
    """Grouped-query attention. q [N,T,H,D], k/v [N,KVH,S,D], mask [N,T,S] (True = may attend).

    implementation None: the G query heads that share a KV head and the T queries are folded
    into one axis, so each score and output product is a plain matmul batched over (N, KVH)
    with no transpose of k or v: on CPU this is about twice as fast as the 5-D einsum, decoding
    (T = 1) more. "xla" or "cudnn": `jax.nn.dot_product_attention` with that implementation and
    the same boolean mask (the cuDNN kernel takes it as an additive [N, 1, T, S] bias);
    `causal` (T == S and the mask lies on or below the diagonal) lets cuDNN skip the blocks
    above it.
    """
    if implementation is not None:
        return jax.nn.dot_product_attention(
            q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask_NxTxS[:, None], scale=scale,
            is_causal=causal, implementation=implementation)
    n, t, h, d = q.shape
    kvh, s_len = k.shape[1], k.shape[2]
    g = h // kvh
    q = q.reshape(n, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(n, kvh, g * t, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = jnp.einsum("nkqd,nksd->nkqs", q, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(n, kvh, g, t, s_len)
    s = jnp.where(mask_NxTxS[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(n, kvh, g * t, s_len)
    o = jnp.einsum("nkqs,nksd->nkqd", p, v)
    return o.reshape(n, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(n, t, h, d)


CUDNN_DTYPES = ("bfloat16", "float16")  # cuDNN's fused attention has no float32 kernel


def attention_kernel(cfg: ModelConfig, t: int, s: int) -> str | None:
    """The `jax.nn.dot_product_attention` implementation for a causal-and-padding attention of
    t queries over s keys under `cfg.attn_impl`, or None for `attention`'s einsum.

    Decoding (t == 1) always takes the einsum. "auto" takes cuDNN on a GPU backend when the
    kernel supports the call on any GPU (bfloat16/float16, head_dim a multiple of 8 and <= 128,
    even t and s, which its backward pass with a mask needs), else the einsum. "cudnn" raises
    a one-line error off a GPU or in float32 instead of falling back.
    """
    if cfg.attn_impl == "xla" or t == 1:
        return None
    backend = jax.default_backend()
    if cfg.attn_impl == "auto":
        fits = (cfg.dtype in CUDNN_DTYPES and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
                and t % 2 == 0 and s % 2 == 0)
        return "cudnn" if backend == "gpu" and fits else None
    if cfg.dtype not in CUDNN_DTYPES:
        raise ValueError(f"attn_impl='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused "
                         f"attention has no {cfg.dtype} kernel); use attn_impl='auto' or 'xla'")
    if backend != "gpu":
        raise ValueError(f"attn_impl='cudnn' needs a CUDA GPU but JAX's backend is {backend!r}; "
                         "use attn_impl='auto' (cuDNN where it applies, else XLA) or 'xla'")
    return "cudnn"


def remat_policy(name: str):
    """The `jax.checkpoint` policy of `ModelConfig.remat_policy` (one of REMAT_POLICIES)."""
    policies = {"nothing": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    assert set(policies) == set(REMAT_POLICIES)
    return policies[name]


def _init(rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype)


class Transformer(nnx.Module):
    """Embedding -> L scanned pre-norm blocks (GQA attention + SwiGLU MLP) -> norm -> logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        H, KV, Dh, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
        pd = jnp.dtype(cfg.param_dtype)
        P = nnx.Param
        norm = (jnp.zeros if cfg.is_gemma else jnp.ones)  # Gemma norms scale by 1 + w
        self.embed = P(_init(rngs, (V, D), pd))
        self.attn_norm = P(norm((L, D), pd))
        self.wq = P(_init(rngs, (L, D, H, Dh), pd))
        self.wk = P(_init(rngs, (L, D, KV, Dh), pd))
        self.wv = P(_init(rngs, (L, D, KV, Dh), pd))
        if cfg.attention_bias:
            self.bq = P(jnp.zeros((L, H, Dh), pd))
            self.bk = P(jnp.zeros((L, KV, Dh), pd))
            self.bv = P(jnp.zeros((L, KV, Dh), pd))
        if cfg.qk_norm:
            self.q_norm = P(norm((L, Dh), pd))
            self.k_norm = P(norm((L, Dh), pd))
        self.wo = P(_init(rngs, (L, H, Dh, D), pd))
        self.mlp_norm = P(norm((L, D), pd))
        if cfg.is_gemma:
            self.post_attn_norm = P(norm((L, D), pd))
            self.post_mlp_norm = P(norm((L, D), pd))
        self.w_gate = P(_init(rngs, (L, D, F), pd))
        self.w_up = P(_init(rngs, (L, D, F), pd))
        self.w_down = P(_init(rngs, (L, F, D), pd))
        self.final_norm = P(norm((D,), pd))
        if not cfg.tie_word_embeddings:
            self.lm_head = P(_init(rngs, (D, V), pd))

    # ------------------------------------------------------------------ pieces
    def _layer_params(self) -> dict:
        names = [n for n in PARAM_AXES if PARAM_AXES[n][0] == "layers" and hasattr(self, n)]
        return {n: getattr(self, n)[...] for n in names}

    def _norm(self, x, w):
        return rms_norm(x, w, self.cfg.rms_norm_eps, 1.0 if self.cfg.is_gemma else 0.0)

    def _block(self, x, p, pos_NxT, mask_NxTxS, inv_freq, cache=None, kernel=None, prefix=None):
        """One layer: (x, kv). mask_NxTxS and inv_freq are this layer's (see `_layer_inputs`).
        cache: None, or (k, v, layer, index) with every layer's cache [L, ...]; the new keys and
        values are written at (layer, slot index) and kv is the updated (k, v); without a cache
        kv is this layer's own keys and values [N, KVH, T, Dh]. prefix (without a cache): keys
        and values [N, KVH, S0, Dh] placed before the T new ones (S = S0 + T). kernel: `attention`'s
        implementation (see `attention_kernel`)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        c = lambda a: a.astype(dt)
        h = self._norm(x, p["attn_norm"])
        q = jnp.einsum("ntd,dhk->nthk", h, c(p["wq"]))
        k = jnp.einsum("ntd,dhk->nthk", h, c(p["wk"]))
        v = jnp.einsum("ntd,dhk->nthk", h, c(p["wv"]))
        if cfg.attention_bias:
            q, k, v = q + c(p["bq"]), k + c(p["bk"]), v + c(p["bv"])
        if cfg.qk_norm:
            q = self._norm(q, p["q_norm"])
            k = self._norm(k, p["k_norm"])
        sec = cfg.mrope_section
        q, k = apply_rope(q, pos_NxT, inv_freq, sec), apply_rope(k, pos_NxT, inv_freq, sec)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [N, KVH, T, Dh]
        new_kv = (k, v)
        if prefix is not None:
            k, v = (jnp.concatenate([a, b], axis=2) for a, b in zip(prefix, new_kv, strict=True))
        if cache is not None:
            ck, cv, layer, index = cache
            at = (layer, 0, 0, index, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
            k, v, new_kv = ck[layer], cv[layer], (ck, cv)
        o = attention(q, k, v, mask_NxTxS, cfg.attn_scale,
                      causal=cache is None and prefix is None, implementation=kernel)
        o = jnp.einsum("nthk,hkd->ntd", o, c(p["wo"]))
        x = x + (self._norm(o, p["post_attn_norm"]) if cfg.is_gemma else o)
        h = self._norm(x, p["mlp_norm"])
        g = jnp.einsum("ntd,df->ntf", h, c(p["w_gate"]))
        u = jnp.einsum("ntd,df->ntf", h, c(p["w_up"]))
        act = jax.nn.gelu(g, approximate=True) if cfg.is_gemma else jax.nn.silu(g)
        m = jnp.einsum("ntf,fd->ntd", act * u, c(p["w_down"]))
        x = x + (self._norm(m, p["post_mlp_norm"]) if cfg.is_gemma else m)
        return x, new_kv

    def _embed(self, tokens_NxT, embeds_NxTxD=None):
        dt = jnp.dtype(self.cfg.dtype)
        x = self.embed[...].astype(dt)[tokens_NxT] if embeds_NxTxD is None else \
            embeds_NxTxD.astype(dt)
        if self.cfg.is_gemma:
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), dt)
        return x

    def _layer_inputs(self, mask_NxTxS, q_at_NxT, k_at_NxS):
        """(per-layer xs, fn) where fn(xs) gives a layer's (mask, inv_freq): every layer the same,
        or for a model with sliding-window layers the windowed mask and local rope base where
        the layer is local. `q_at`/`k_at` are the query and key coordinates the window counts in.
        """
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg)
        if not any(cfg.sliding_layers):
            return None, lambda _: (mask_NxTxS, inv_freq)
        local_mask = mask_NxTxS & window_mask(q_at_NxT, k_at_NxS, cfg.sliding_window)
        local_freq = rope_inv_freq(cfg, theta=cfg.rope_local_theta)

        def pick(sliding):
            return (jnp.where(sliding, local_mask, mask_NxTxS),
                    jnp.where(sliding, local_freq, inv_freq))
        return jnp.asarray(cfg.sliding_layers), pick

    # ------------------------------------------------------------------ API
    def hidden(self, tokens_NxT, pos_NxT, mask_NxTxS, cache: KVCache | None = None, *,
               embeds_NxTxD=None, causal: bool = False):
        """Final-norm hidden states [N, T, D] and the updated cache (None without a cache).

        pos_NxT: [N, T] positions, or [3, N, T] M-RoPE positions for a config with
        `mrope_section`. embeds_NxTxD: input embeddings to use instead of the token embeddings
        (e.g. with image features in place; Gemma's sqrt(D) scale still applies).

        Without a cache, `mask_NxTxS` is the full query-key mask over the T tokens. With a cache,
        the T tokens are written at slots `cache.index ..` and `mask_NxTxS` (T x S) must cover
        every cache slot; see `cache_mask`. The cache travels through the layer scan as carry,
        not as per-layer inputs and outputs, so a decoding step writes only its new slots
        instead of copying the whole cache (about 1.7x faster decoding on CPU).

        causal: `mask_NxTxS` is the causal mask over padded tokens that `causal_inputs` builds
        without a custom `attn_mask`, or that `cache_mask` builds; only such calls may go through
        `jax.nn.dot_product_attention` (`cfg.attn_impl`, see `attention_kernel`), with the same
        mask (sliding windows included). Custom masks and decoding steps always take the einsum.
        """
        cfg = self.cfg
        x = self._embed(tokens_NxT, embeds_NxTxD)
        if cache is None:
            q_at, k_at = pos_NxT, pos_NxT
        else:
            slots = cache.index + jnp.arange(tokens_NxT.shape[1])
            q_at = jnp.broadcast_to(slots, tokens_NxT.shape)
            k_at = jnp.broadcast_to(jnp.arange(cache.mask_NxS.shape[1]), cache.mask_NxS.shape)
        sliding_L, layer_inputs = self._layer_inputs(mask_NxTxS, q_at, k_at)
        layer_p = self._layer_params()
        kernel = attention_kernel(cfg, *mask_NxTxS.shape[1:]) if causal else None
        if cache is None:
            def body(x, xs):
                p, sliding = xs
                return self._block(x, p, pos_NxT, *layer_inputs(sliding), None, kernel)[0], None
            xs = (layer_p, sliding_L)
        else:
            def body(carry, xs):
                x, ck, cv = carry
                p, sliding, layer = xs
                x, (ck, cv) = self._block(x, p, pos_NxT, *layer_inputs(sliding),
                                          (ck, cv, layer, cache.index), kernel)
                return (x, ck, cv), None
            xs = (layer_p, sliding_L, jnp.arange(cfg.num_layers))
        if cfg.remat:
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat_policy))
        if cache is None:
            x, _ = jax.lax.scan(body, x, xs)
        else:
            (x, ck, cv), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
            cache = KVCache(ck, cv, cache.mask_NxS, cache.index + tokens_NxT.shape[1])
        return self._norm(x, self.final_norm[...]), cache

    def hidden_with_probes(self, tokens_NxT, pos_NxT, mask_NxTxT, probe_NxM, probe_pos_NxM,
                           probe_mask_NxMxU, *, embeds_NxTxD=None):
        """Final-norm hidden states of a sequence [N, T, D] and of M probe tokens [N, M, D] that
        read it, in one pass over the layers (for scoring: no rematerialisation).

        The sequence attends by the causal `mask_NxTxT` of `causal_inputs`, as `hidden` with
        causal=True (so through `jax.nn.dot_product_attention` where `cfg.attn_impl` says), and
        never sees the probes. The probes attend by `probe_mask_NxMxU` over U = T + M keys: the
        sequence's, then their own. Each layer's sequence keys and values are read as they are
        made, so no cache of every layer is kept. Text probes (token embeddings); their positions
        `probe_pos_NxM` are [N, M] or [3, N, M] like `pos_NxT`, and windows count in positions.
        """
        x, xp = self._embed(tokens_NxT, embeds_NxTxD), self._embed(probe_NxM)
        key_at = jnp.concatenate([pos_NxT, probe_pos_NxM], axis=-1)
        sliding_L, seq_in = self._layer_inputs(mask_NxTxT, pos_NxT, pos_NxT)
        _, probe_in = self._layer_inputs(probe_mask_NxMxU, probe_pos_NxM, key_at)
        kernel = attention_kernel(self.cfg, *mask_NxTxT.shape[1:])

        def body(carry, xs):
            (x, xp), (p, sliding) = carry, xs
            x, kv = self._block(x, p, pos_NxT, *seq_in(sliding), kernel=kernel)
            xp, _ = self._block(xp, p, probe_pos_NxM, *probe_in(sliding), prefix=kv)
            return (x, xp), None

        (x, xp), _ = jax.lax.scan(body, (x, xp), (self._layer_params(), sliding_L))
        return self._norm(x, self.final_norm[...]), self._norm(xp, self.final_norm[...])

    def probes_on_cache(self, cache: KVCache, key_pos_NxS, probe_NxM, probe_pos_NxM,
                        probe_mask_NxMxU):
        """Final-norm hidden states [N, M, D] of M text probe tokens that read the keys and
        values already in `cache` (every layer's, e.g. the sampler's after decoding) and their
        own: `probe_mask_NxMxU` over U = S + M keys, the cache's S slots then the probes'.
        `key_pos_NxS` are the slots' positions (sliding windows count in them); nothing is
        written to the cache."""
        xp = self._embed(probe_NxM)
        key_at = jnp.concatenate([key_pos_NxS, probe_pos_NxM], axis=-1)
        sliding_L, probe_in = self._layer_inputs(probe_mask_NxMxU, probe_pos_NxM, key_at)
        if sliding_L is None:
            sliding_L = jnp.zeros(self.cfg.num_layers, bool)

        def body(xp, xs):
            p, sliding, ck, cv = xs
            xp, _ = self._block(xp, p, probe_pos_NxM, *probe_in(sliding), prefix=(ck, cv))
            return xp, None

        xp, _ = jax.lax.scan(body, xp, (self._layer_params(), sliding_L, cache.k, cache.v))
        return self._norm(xp, self.final_norm[...])

    def head(self) -> jax.Array:
        """The [D, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def logits(self, h_NxTxD: jax.Array) -> jax.Array:
        return jnp.einsum("ntd,dv->ntv", h_NxTxD, self.head().astype(h_NxTxD.dtype))

    def __call__(self, tokens_NxT, attention_mask=None, *, positions=None, attn_mask=None):
        """Logits [N, T, V] of a plain forward.

        attention_mask [N, T]: 1 for real tokens (left or right padding); positions default to
        the count of real tokens before each one. attn_mask [N, T, T]: a custom query-key mask
        (e.g. packed answer probes) used instead of the causal one.
        """
        pos, mask = causal_inputs(tokens_NxT, attention_mask, positions, attn_mask)
        h, _ = self.hidden(tokens_NxT, pos, mask, causal=attn_mask is None)
        return self.logits(h)


def positions_from_mask(mask_NxT: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask_NxT.astype(jnp.int32), axis=1) - 1, 0)


def causal_inputs(tokens_NxT, attention_mask=None, positions=None, attn_mask=None):
    """(positions [N,T], mask [N,T,T]) for a forward without cache. Every token may attend to
    itself so that padded rows never produce NaNs."""
    n, t = tokens_NxT.shape
    valid = jnp.ones((n, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = positions_from_mask(valid)
    eye = jnp.eye(t, dtype=bool)[None]
    if attn_mask is None:
        attn_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    return positions, attn_mask.astype(bool) | eye


def cache_mask(cache: KVCache, new_valid_NxT: jax.Array) -> tuple[KVCache, jax.Array]:
    """Marks the T new tokens' slots in the cache and returns (cache, mask [N, T, S]) with
    which those tokens attend: every earlier real slot, earlier new tokens, and themselves."""
    n, t = new_valid_NxT.shape
    s = cache.mask_NxS.shape[1]
    slots = cache.index + jnp.arange(t)
    m = jax.lax.dynamic_update_slice_in_dim(cache.mask_NxS, new_valid_NxT.astype(bool),
                                            cache.index, axis=1)
    key = jnp.arange(s)
    causal = key[None, :] <= slots[:, None]  # [T, S]
    mask = (m[:, None, :] & causal[None]) | (key[None, :] == slots[:, None])[None]
    return cache._replace(mask_NxS=m), mask
