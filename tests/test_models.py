"""Parity of the NNX decoder with transformers' PyTorch models on tiny random checkpoints
(full-sequence logits with left padding, KV-cache decoding), and the sharding rules."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from migjax.models import KVCache, load_pretrained
from migjax.models.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
)
from migjax.models.transformer import PARAM_AXES, cache_mask

TOL = 1e-4
V = 128
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
HF_CLASSES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}
# name: (model_type, config fields); GQA ratios 2, 1, 4, 2; tied and untied heads.
CASES = {
    "qwen2-tied-gqa2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-untied-gqa1": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3rope-untied-gqa4": (
        "llama",
        dict(num_key_value_heads=1, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    ),
    "llama-tied-gqa2": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def torch_model(model_type: str, seed: int = 0, **fields):
    """A tiny float32 transformers model whose every weight (norms and biases too) is random."""
    cfg_cls, model_cls = HF_CLASSES[model_type]
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        rms_norm_eps=1e-6,
    )
    cfg = cfg_cls(**{**kw, **fields})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_logits(model, ids_NxT, mask_NxT):
    pos_NxT = np.maximum(np.cumsum(mask_NxT, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids_NxT),
            attention_mask=torch.tensor(mask_NxT),
            position_ids=torch.tensor(pos_NxT),
        )
    return out.logits.float().numpy()


@nnx.jit
def forward(model, ids_NxT, mask_NxT):
    return model(ids_NxT, mask_NxT)


@nnx.jit
def cached_forward(model, ids_NxT, pos_NxT, attn_NxTxS, cache):
    h, cache = model.hidden(ids_NxT, pos_NxT, attn_NxTxS, cache)
    return model.logits(h), cache


mark_cache = jax.jit(cache_mask)


def left_padded_batch(seed=0, t=20, pads=(0, 5, 11)):
    rng = np.random.RandomState(seed)
    ids_NxT = rng.randint(0, V, (len(pads), t))
    mask_NxT = np.ones((len(pads), t), np.int64)
    for i, p in enumerate(pads):
        mask_NxT[i, :p] = 0
    return ids_NxT, mask_NxT


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    model_type, fields = CASES[request.param]
    ref = torch_model(model_type, **fields)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours, cfg = load_pretrained(path)
    return ref, ours, cfg


def test_logits_match_transformers_with_left_padding(pair):
    """Row 0 is unpadded, rows 1-2 are left-padded: logits agree at every real position."""
    ref, ours, _ = pair
    ids_NxT, mask_NxT = left_padded_batch()
    want = torch_logits(ref, ids_NxT, mask_NxT)
    got = np.asarray(forward(ours, jnp.asarray(ids_NxT), jnp.asarray(mask_NxT)))
    assert got.shape == want.shape == (3, 20, V)
    assert np.abs(got[0] - want[0]).max() < TOL
    real = mask_NxT.astype(bool)
    assert np.abs(got - want)[real].max() < TOL


@pytest.mark.parametrize("pair", ["qwen2-tied-gqa2", "llama3rope-untied-gqa4"], indirect=True)
def test_kv_cache_decoding_matches_transformers(pair):
    """Prefill a left-padded prompt into the cache, then feed 4 tokens one at a time: each
    step's logits equal transformers' full-sequence logits at that position (GQA 2 and 4;
    the cache code does not depend on the architecture)."""
    ref, ours, cfg = pair
    ids_NxT, mask_NxT = left_padded_batch(seed=1, t=16, pads=(0, 6))
    want = torch_logits(ref, ids_NxT, mask_NxT)
    p = 12
    cache = KVCache.empty(cfg, batch=2, size=16)
    cache, attn = mark_cache(cache, jnp.asarray(mask_NxT[:, :p]))
    pos_NxP = jnp.asarray(np.maximum(np.cumsum(mask_NxT[:, :p], 1) - 1, 0))
    logits, cache = cached_forward(ours, jnp.asarray(ids_NxT[:, :p]), pos_NxP, attn, cache)
    got = [np.asarray(logits)]
    for t in range(p, 16):
        pos_Nx1 = jnp.sum(cache.mask_NxS, axis=1, keepdims=True).astype(jnp.int32)
        cache, attn = mark_cache(cache, jnp.ones((2, 1), bool))
        h, cache = ours.hidden(jnp.asarray(ids_NxT[:, t : t + 1]), pos_Nx1, attn, cache)
        got.append(np.asarray(ours.logits(h)))
    got = np.concatenate(got, axis=1)
    real = mask_NxT.astype(bool)
    assert int(cache.index) == 16
    assert np.abs(got - want)[real].max() < TOL


# ---------------------------------------------------------------------------- sharding rules
MESH_222 = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})


def test_param_specs_on_a_2x2x2_mesh():
    rules = DEFAULT_RULES
    spec = lambda name, shape: logical_to_spec(PARAM_AXES[name], rules, MESH_222, shape)
    assert spec("wq", (2, 64, 4, 16)) == P(None, "fsdp", "tensor")
    assert spec("wk", (2, 64, 1, 16)) == P(None, "fsdp")  # 1 kv head: not divisible by 2
    assert spec("embed", (128, 64)) == P("tensor", "fsdp")
    assert spec("lm_head", (64, 127)) == P("fsdp")  # odd vocab stays replicated
    assert spec("w_down", (2, 96, 64)) == P(None, "tensor", "fsdp")
    assert spec("final_norm", (63,)) == P()
    assert logical_to_spec(("batch", None), rules, MESH_222, (8, 3)) == P(("data", "fsdp"))
    assert logical_to_spec(("batch",), rules, MESH_222, (6,)) == P("data")


def test_rule_collisions_drop_the_later_use():
    rules = (("embed", "tensor"), ("mlp", "tensor"), ("vocab", ("tensor", "fsdp")))
    assert logical_to_spec(("embed", "mlp"), rules, MESH_222, (64, 96)) == P("tensor")
    assert logical_to_spec(("mlp", "vocab"), rules, MESH_222, (96, 128)) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), rules, MESH_222) == P(("tensor", "fsdp"))


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(
        st.tuples(
            st.sampled_from(["batch", "embed", "mlp", "heads", "vocab", "layers", None]),
            st.integers(1, 12),
        ),
        min_size=1,
        max_size=4,
    ),
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)
def test_specs_never_reuse_an_axis_and_always_divide(dims, sizes):
    mesh = types.SimpleNamespace(shape=dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)))
    axes, shape = [a for a, _ in dims], [n for _, n in dims]
    spec = logical_to_spec(axes, DEFAULT_RULES, mesh, shape)
    used = []
    for n, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        assert n % int(np.prod([mesh.shape[m] for m in names])) == 0
        used += names
    assert len(used) == len(set(used))
    for axis, entry in zip(axes, spec, strict=False):  # only ruled axes are sharded
        assert entry is None or axis in dict(DEFAULT_RULES)


def test_make_mesh_and_shardings_on_one_device():
    with pytest.raises(ValueError, match=r"needs 8 devices, but 1 devices"):
        make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:1])
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    sh = param_shardings({"wq": (2, 64, 4, 16), "final_norm": (64,)}, mesh)
    assert sh["wq"].spec == P(None, "fsdp", "tensor") and sh["final_norm"].spec == P("fsdp")
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp"))
    with pytest.raises(KeyError, match="nope"):
        param_shardings({"nope": (3,)}, mesh)
