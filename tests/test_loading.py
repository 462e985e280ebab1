"""Hugging Face checkpoint I/O: the name map, export and re-import through transformers, bf16
files, both config.json layouts, error messages, and sharded loading on 8 fake CPU devices."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from migjax.models import ModelConfig, load_pretrained, save_pretrained, split
from migjax.models.loading import (
    hf_tensor_names,
    name_map,
    read_block,
    save_params,
    to_hf_layout,
)

V = 128
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
HF_CLASSES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_model(model_type: str, seed: int = 0, **fields):
    """A tiny float32 transformers model whose every weight (norms and biases too) is random."""
    cfg_cls, model_cls = HF_CLASSES[model_type]
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
    cfg = cfg_cls(**{**kw, **fields})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_logits(model, ids_NxT):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids_NxT)).logits.float().numpy()


@nnx.jit
def forward(model, ids_NxT):
    return model(ids_NxT)


def saved(model, path, **kw):
    model.save_pretrained(path, **kw)
    return str(path)


def file_tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


IDS_NxT = np.random.RandomState(0).randint(0, V, (2, 12))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tied qwen2 checkpoint (q/k/v biases) saved by transformers, and its torch model."""
    ref = torch_model("qwen2", tie_word_embeddings=True)
    return ref, saved(ref, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """An untied llama checkpoint with llama3 rope scaling and 4:1 GQA."""
    ref = torch_model("llama", num_key_value_heads=1, tie_word_embeddings=False,
                      rope_parameters=LLAMA3_ROPE)
    return ref, saved(ref, tmp_path_factory.mktemp("llama"))


# ---------------------------------------------------------------------------- the name map
@pytest.mark.parametrize("model_type,tied", [("qwen2", True), ("qwen2", False),
                                             ("qwen3", False), ("llama", True)])
def test_name_map_covers_exactly_the_saved_tensors(tmp_path, model_type, tied):
    path = saved(torch_model(model_type, tie_word_embeddings=tied), tmp_path)
    cfg = ModelConfig.from_dir(path)
    assert set(hf_tensor_names(cfg)) == set(file_tensors(path))
    assert ("lm_head.weight" in hf_tensor_names(cfg)) == (not tied)


def test_name_map_layouts_by_hand(qwen2_dir):
    _, path = qwen2_dir
    ours, cfg = load_pretrained(path)
    hf = file_tensors(path)
    dh = cfg.head_dim
    l, d, h, k, f, v = 1, 5, 3, 7, 11, 17
    a = "model.layers.1.self_attn."
    assert ours.wq[...][l, d, h, k] == hf[a + "q_proj.weight"][h * dh + k, d]
    assert ours.wk[...][l, d, 1, k] == hf[a + "k_proj.weight"][1 * dh + k, d]
    assert ours.bq[...][l, h, k] == hf[a + "q_proj.bias"][h * dh + k]
    assert ours.bv[...][l, 1, k] == hf[a + "v_proj.bias"][1 * dh + k]
    assert ours.wo[...][l, h, k, d] == hf[a + "o_proj.weight"][d, h * dh + k]
    assert ours.w_gate[...][l, d, f] == hf["model.layers.1.mlp.gate_proj.weight"][f, d]
    assert ours.w_down[...][l, f, d] == hf["model.layers.1.mlp.down_proj.weight"][d, f]
    assert ours.mlp_norm[...][l, d] == hf["model.layers.1.post_attention_layernorm.weight"][d]
    assert ours.embed[...][v, d] == hf["model.embed_tokens.weight"][v, d]
    assert np.array_equal(np.asarray(ours.head()), hf["model.embed_tokens.weight"].T)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), which=st.sampled_from(["wq", "wo", "bk", "w_down", "q_norm"]))
def test_read_block_equals_slicing_the_full_tensor(data, which):
    """Reading a block straight from the packed HF tensor equals converting the whole tensor
    and slicing; and `to_hf_layout` inverts the conversion."""
    cfg = ModelConfig(model_type="qwen3", hidden_size=6, num_heads=4, num_kv_heads=2, head_dim=4,
                      intermediate_size=5, attention_bias=True, qk_norm=True)
    sizes = dict(V=7, D=6, F=5, H=4, KV=2, Dh=4)
    tm = {t.ours: t for t in name_map(cfg)}[which]
    full_shape = [int(np.prod([sizes[s] for s in g])) for g in tm.hf_dims]
    hf = np.arange(np.prod(full_shape), dtype=np.float32).reshape(full_shape)
    everything = {s: (0, sizes[s]) for s in sizes}
    whole = read_block(lambda ix: hf[ix], tm, sizes, everything)
    assert whole.shape == tuple(sizes[s] for s in tm.dims)
    assert np.array_equal(to_hf_layout(whole, tm, sizes), hf)
    ranges = {}
    for s in tm.dims:
        lo = data.draw(st.integers(0, sizes[s] - 1))
        ranges[s] = (lo, data.draw(st.integers(lo + 1, sizes[s])))
    reads = []
    block = read_block(lambda ix: reads.append(ix) or hf[ix], tm, sizes, ranges)
    assert np.array_equal(block, whole[tuple(slice(*ranges[s]) for s in tm.dims)])
    for ix, g in zip(reads[0], tm.hf_dims, strict=True):
        inner = int(np.prod([sizes[s] for s in g[1:]]))
        # a packed dimension is cut on disk by its leading symbol's range
        assert (ix.start, ix.stop) == (ranges[g[0]][0] * inner, ranges[g[0]][1] * inner)


def test_tied_checkpoint_with_a_stray_lm_head_ignores_it(qwen2_dir, tmp_path):
    """Some exporters write lm_head.weight for tied models; the tied head is the embedding."""
    d = tmp_path / "stray"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(qwen2_dir[1], "config.json")).read())
    tensors = file_tensors(qwen2_dir[1])
    tensors["lm_head.weight"] = np.full((V, 64), 7.0, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours, cfg = load_pretrained(d)
    assert cfg.tie_word_embeddings and "lm_head" not in split(ours)[1]
    assert np.array_equal(np.asarray(ours.head()), tensors["model.embed_tokens.weight"].T)


# ---------------------------------------------------------------------------- round trips
def test_export_reloads_in_transformers_with_the_same_logits(llama_dir, tmp_path):
    ref, path = llama_dir
    ours, cfg = load_pretrained(path)
    out = save_pretrained(ours, cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back) is transformers.LlamaForCausalLM
    assert back.config.rope_parameters["rope_type"] == "llama3"
    want = ref.state_dict()
    for name, x in back.state_dict().items():
        assert torch.equal(x, want[name]), name
    assert np.abs(torch_logits(back.eval(), IDS_NxT) - torch_logits(ref, IDS_NxT)).max() < 1e-6
    got = np.asarray(forward(ours, jnp.asarray(IDS_NxT)))
    assert np.abs(got - torch_logits(ref, IDS_NxT)).max() < 1e-4


def test_sharded_save_of_a_params_dict_loads_in_both(qwen2_dir, tmp_path):
    ref, path = qwen2_dir
    ours, cfg = load_pretrained(path)
    _, params = split(ours)
    out = save_params(params, cfg, tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(files) > 2 and "model.safetensors" not in files
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(hf_tensor_names(cfg))
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    want = ref.state_dict()
    for name, x in back.state_dict().items():
        assert torch.equal(x, want[name]), name
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg
    for name, x in split(again)[1].items():
        assert np.array_equal(np.asarray(x), np.asarray(params[name])), name
    # Saving unsharded into the same folder removes the stale shards and index.
    save_params(params, cfg, out)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


def test_tokenizer_files_are_saved(qwen2_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "two", "plus", "is", "four"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                               eos_token="<eos>")
    ours, cfg = load_pretrained(qwen2_dir[1])
    out = save_pretrained(ours, cfg, tmp_path / "with_tok", tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    back = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert back("two plus two is four")["input_ids"] == [2, 3, 2, 4, 5]
    assert back.eos_token == "<eos>"


def test_bf16_checkpoints_load_and_save(qwen2_dir, tmp_path):
    ref, _ = qwen2_dir
    path = saved(ref.to(torch.bfloat16), tmp_path / "bf16")
    ref.float()
    hf = file_tensors(path)
    emb = hf["model.embed_tokens.weight"]
    assert emb.dtype == ml_dtypes.bfloat16
    ours32, cfg32 = load_pretrained(path)
    assert ours32.embed[...].dtype == jnp.float32 and cfg32.param_dtype == "float32"
    assert np.array_equal(np.asarray(ours32.embed[...]), emb.astype(np.float32))
    ours16, cfg16 = load_pretrained(path, dtype="bfloat16")
    assert (cfg16.param_dtype, cfg16.dtype) == ("bfloat16", "bfloat16")
    assert ours16.wq[...].dtype == jnp.bfloat16
    want_q = hf["model.layers.0.self_attn.q_proj.weight"].reshape(4, 16, 64).transpose(2, 0, 1)
    assert np.array_equal(np.asarray(ours16.wq[...][0]).view(np.uint16), want_q.view(np.uint16))
    out = save_pretrained(ours16, cfg16, tmp_path / "bf16_export")
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, x in load_file(os.path.join(out, "model.safetensors")).items():
        assert x.dtype == ml_dtypes.bfloat16
        assert np.array_equal(x.view(np.uint16), hf[name].view(np.uint16)), name
    assert torch.equal(back.model.embed_tokens.weight.float(),
                       torch.tensor(emb.astype(np.float32)))


def test_transformers_4_and_5_config_layouts_load_alike(llama_dir, tmp_path):
    _, path = llama_dir
    v5 = json.load(open(os.path.join(path, "config.json")))
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    v4 = {k: x for k, x in v5.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    v4["torch_dtype"] = "float32"
    old = tmp_path / "v4"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(v4))
    os.symlink(os.path.join(path, "model.safetensors"), old / "model.safetensors")
    new_model, new_cfg = load_pretrained(path)
    old_model, old_cfg = load_pretrained(old)
    assert new_cfg == old_cfg
    assert new_cfg.rope_theta == 500000.0
    assert new_cfg.rope_scaling_dict == {k: x for k, x in LLAMA3_ROPE.items() if k != "rope_theta"}
    ids = jnp.asarray(IDS_NxT)
    assert np.array_equal(np.asarray(forward(new_model, ids)), np.asarray(forward(old_model, ids)))


def test_config_without_tie_flag_is_untied_like_transformers(tmp_path):
    path = saved(torch_model("qwen2", tie_word_embeddings=False), tmp_path / "untied")
    d = tmp_path / "no_flag"
    d.mkdir()
    hf = json.load(open(os.path.join(path, "config.json")))
    del hf["tie_word_embeddings"]
    (d / "config.json").write_text(json.dumps(hf))
    os.symlink(os.path.join(path, "model.safetensors"), d / "model.safetensors")
    assert transformers.AutoConfig.from_pretrained(d).tie_word_embeddings is False
    ours, cfg = load_pretrained(d)
    assert not cfg.tie_word_embeddings
    lm_head = file_tensors(path)["lm_head.weight"]
    assert np.array_equal(np.asarray(ours.head()), lm_head.T)


# ---------------------------------------------------------------------------- errors
def _copy_with_config(src, dst, **changes):
    dst.mkdir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(src, "model.safetensors"), dst / "model.safetensors")
    return dst


def test_missing_directory_config_and_weights(qwen2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(qwen2_dir[1], "config.json")).read())
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_pretrained(tmp_path)


def test_pickle_weights_are_refused(qwen2_dir, tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(qwen2_dir[1], "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: loading it would fail differently")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors only"):
        load_pretrained(tmp_path)


def test_unknown_model_type(qwen2_dir, tmp_path):
    d = _copy_with_config(qwen2_dir[1], tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(ValueError, match=r"config\.json.*model_type='gpt2'"):
        load_pretrained(d)


def test_missing_tensor_names_tensor_and_file(qwen2_dir, tmp_path):
    d = tmp_path / "missing"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(qwen2_dir[1], "config.json")).read())
    tensors = file_tensors(qwen2_dir[1])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing/model"):
        load_pretrained(d)


def test_shape_mismatch_names_tensor_file_and_shapes(qwen2_dir, tmp_path):
    d = _copy_with_config(qwen2_dir[1], tmp_path / "wide", intermediate_size=80)
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*model\.safetensors.*"
                                         r"expected shape \(80, 64\).*found \(96, 64\)"):
        load_pretrained(d)


def test_unsupported_extra_tensors_are_an_error(tmp_path):
    path = saved(torch_model("llama", attention_bias=True), tmp_path)  # adds o_proj.bias
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        load_pretrained(path)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig().to_hf()))
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------- sharded loading
SHARDED_CHECK = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from migjax.models import loading, split
from migjax.models.sharding import make_mesh, param_shardings

reads = []
_read = loading._Checkpoint.read
loading._Checkpoint.read = lambda self, name, ix: reads.append((name, ix)) or _read(self, name, ix)

path = sys.argv[1]
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
single, cfg = loading.load_pretrained(path)
reads.clear()
sharded, _ = loading.load_pretrained(path, mesh=mesh)
fwd = nnx.jit(lambda m, ids: m(ids))
ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 12)))
p1, p8 = split(single)[1], split(sharded)[1]
want = param_shardings({k: x.shape for k, x in p8.items()}, mesh)
q_sizes = [np.prod([s.stop - s.start for s in ix]) for n, ix in reads if "q_proj.weight" in n]
print(json.dumps({
    "devices": len(jax.devices()),
    "max_logit_diff": float(np.abs(np.asarray(fwd(single, ids)) - np.asarray(fwd(sharded, ids))).max()),
    "equal": all(np.array_equal(np.asarray(p1[k]), np.asarray(p8[k])) for k in p1),
    "specs": {k: list(x.sharding.spec) for k, x in p8.items()},
    "specs_as_rules": all(x.sharding == want[k] for k, x in p8.items()),
    "wq_shard": list(p8["wq"].addressable_shards[0].data.shape),
    "wq_devices": len({s.device for s in p8["wq"].addressable_shards}),
    "q_read_max": int(max(q_sizes)),
}))
"""


def test_sharded_load_on_8_fake_devices(tmp_path):
    ref = torch_model("qwen2", num_key_value_heads=1, tie_word_embeddings=False)
    path = saved(ref, tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", SHARDED_CHECK, path], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["equal"] and out["specs_as_rules"]
    assert out["max_logit_diff"] < 1e-5, out["max_logit_diff"]
    assert out["specs"]["wq"] == [None, "fsdp", "tensor"]
    assert out["specs"]["wk"] == [None, "fsdp"]  # one kv head: not split
    assert out["specs"]["lm_head"] == ["fsdp", "tensor"]
    assert out["wq_shard"] == [2, 32, 2, 16] and out["wq_devices"] == 8
    assert out["q_read_max"] == 32 * 32  # each read: one layer, half the rows and columns
