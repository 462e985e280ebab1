"""Hugging Face checkpoint I/O: the name map between transformers' safetensors tensors and the
decoder's stacked parameters, loading (optionally sharded, slice by slice) and saving."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from migjax.models.config import ModelConfig
from migjax.models.sharding import DEFAULT_RULES, param_shardings
from migjax.models.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_SHARD_BYTES = 2 * 1024**3  # shard size above which save writes several files
# Buffers some exporters store that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
LM_PREFIX = "model.language_model."


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one of our parameters is stored by transformers.

    `hf` is the tensor name (`{i}` is the layer for stacked parameters). `hf_dims` lists, for
    each dimension of the HF tensor, the symbolic dimensions it packs (row-major), e.g.
    q_proj.weight [H*Dh, D] is (("H", "Dh"), ("D",)); `dims` is the order of those symbols in our
    per-layer array (wq[l] is [D, H, Dh]). Symbols: V, D, F, H, KV, Dh.
    """

    ours: str
    hf: str
    hf_dims: tuple[tuple[str, ...], ...]
    dims: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_name(self, layer: int | None) -> str:
        return self.hf.format(i=layer) if self.stacked else self.hf


def name_map(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of the decoder described by `cfg`, with its HF tensor and layout."""
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out = [TensorMap("embed", "model.embed_tokens.weight", (("V",), ("D",)), ("V", "D"))]
    out += [
        TensorMap("attn_norm", "model.layers.{i}.input_layernorm.weight", (("D",),), ("D",)),
        TensorMap("wq", a + "q_proj.weight", (("H", "Dh"), ("D",)), ("D", "H", "Dh")),
        TensorMap("wk", a + "k_proj.weight", (("KV", "Dh"), ("D",)), ("D", "KV", "Dh")),
        TensorMap("wv", a + "v_proj.weight", (("KV", "Dh"), ("D",)), ("D", "KV", "Dh")),
    ]
    if cfg.attention_bias:
        out += [
            TensorMap("bq", a + "q_proj.bias", (("H", "Dh"),), ("H", "Dh")),
            TensorMap("bk", a + "k_proj.bias", (("KV", "Dh"),), ("KV", "Dh")),
            TensorMap("bv", a + "v_proj.bias", (("KV", "Dh"),), ("KV", "Dh")),
        ]
    if cfg.qk_norm:
        out += [
            TensorMap("q_norm", a + "q_norm.weight", (("Dh",),), ("Dh",)),
            TensorMap("k_norm", a + "k_norm.weight", (("Dh",),), ("Dh",)),
        ]
    norm = lambda ours, hf: TensorMap(ours, f"model.layers.{{i}}.{hf}.weight", (("D",),), ("D",))
    out.append(TensorMap("wo", a + "o_proj.weight", (("D",), ("H", "Dh")), ("H", "Dh", "D")))
    if cfg.is_gemma:  # norms before and after both attention and the MLP
        out += [norm("post_attn_norm", "post_attention_layernorm"),
                norm("mlp_norm", "pre_feedforward_layernorm"),
                norm("post_mlp_norm", "post_feedforward_layernorm")]
    else:
        out.append(norm("mlp_norm", "post_attention_layernorm"))
    out += [
        TensorMap("w_gate", m + "gate_proj.weight", (("F",), ("D",)), ("D", "F")),
        TensorMap("w_up", m + "up_proj.weight", (("F",), ("D",)), ("D", "F")),
        TensorMap("w_down", m + "down_proj.weight", (("D",), ("F",)), ("F", "D")),
        TensorMap("final_norm", "model.norm.weight", (("D",),), ("D",)),
    ]
    if not cfg.tie_word_embeddings:
        out.append(TensorMap("lm_head", "lm_head.weight", (("V",), ("D",)), ("D", "V")))
    return out


def hf_tensor_names(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """{HF tensor name: (our parameter, layer index or None)} for every tensor of `cfg`."""
    out = {}
    for tm in name_map(cfg):
        for layer in range(cfg.num_layers) if tm.stacked else (None,):
            out[tm.hf_name(layer)] = (tm.ours, layer)
    return out


def _sizes(cfg: ModelConfig) -> dict[str, int]:
    return dict(V=cfg.vocab_size, D=cfg.hidden_size, F=cfg.intermediate_size,
                H=cfg.num_heads, KV=cfg.num_kv_heads, Dh=cfg.head_dim)


def hf_shape(tm: TensorMap, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[s] for s in group) for group in tm.hf_dims)


def to_hf_layout(x: np.ndarray, tm: TensorMap, sizes: dict[str, int]) -> np.ndarray:
    """Our per-layer array -> the HF tensor (transposed and flattened)."""
    flat = [s for group in tm.hf_dims for s in group]
    y = np.transpose(x, [tm.dims.index(s) for s in flat])
    return np.ascontiguousarray(y.reshape(hf_shape(tm, sizes)))


def read_block(read, tm: TensorMap, sizes: dict[str, int], ranges: dict[str, tuple[int, int]]):
    """The block of our per-layer array with symbolic dimension `s` restricted to `ranges[s]`,
    reading only the rows/columns of the HF tensor it needs.

    `read(index)` returns the HF tensor indexed by a tuple of slices. A packed HF dimension
    (e.g. H*Dh) is read over the range of its leading symbol, in full for the others, which
    are then cut after the reshape.
    """
    hf_index, block_shape, post = [], [], []
    for group in tm.hf_dims:
        inner = math.prod(sizes[s] for s in group[1:])
        lo, hi = ranges[group[0]]
        hf_index.append(slice(lo * inner, hi * inner))
        block_shape += [hi - lo] + [sizes[s] for s in group[1:]]
        post += [slice(None)] + [slice(*ranges[s]) for s in group[1:]]
    x = np.asarray(read(tuple(hf_index))).reshape(block_shape)[tuple(post)]
    flat = [s for group in tm.hf_dims for s in group]
    return np.transpose(x, [flat.index(s) for s in tm.dims])


class _Checkpoint:
    """The safetensors files of a model directory, opened lazily, read tensor slice by slice."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        self.path, self._stack, self._handles = path, stack, {}
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from e
            self.files = sorted(set(weight_map.values()))
            for f in self.files:
                if not os.path.isfile(os.path.join(path, f)):
                    raise FileNotFoundError(f"{os.path.join(path, f)}: listed in {index}, missing")
            self.where = dict(weight_map)
        elif os.path.isfile(single):
            self.files = [SINGLE_FILE]
            self.where = dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            self._no_weights(path)
        # Qwen2.5-VL's language model as transformers 5 names it in memory
        # (model.language_model.layers.*): read under the decoder's names (model.layers.*)
        self.names = {k: k for k in self.where}
        for k in list(self.where):
            if k.startswith(LM_PREFIX):
                self.names["model." + k[len(LM_PREFIX):]] = k
                self.where["model." + k[len(LM_PREFIX):]] = self.where.pop(k)

    @staticmethod
    def _no_weights(path: str):
        pickles = [f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))]
        if pickles:
            raise FileNotFoundError(
                f"{path}: only pickle weights ({', '.join(pickles)}) found; migjax loads "
                f"safetensors only ({SINGLE_FILE} or {INDEX_FILE}), never pickle files. "
                f"Convert the checkpoint to safetensors first."
            )
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _handle(self, file: str, framework: str = "numpy"):
        key = (file, framework)
        if key not in self._handles:
            full = os.path.join(self.path, file)
            self._handles[key] = self._stack.enter_context(safe_open(full, framework=framework))
        return self._handles[key]

    def searched(self) -> str:
        return ", ".join(os.path.join(self.path, f) for f in self.files)

    def file_of(self, name: str) -> str:
        if name not in self.where:
            raise KeyError(f"tensor {name!r} not found in {self.searched()}")
        return os.path.join(self.path, self.where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        self.file_of(name)
        return tuple(self._handle(self.where[name]).get_slice(self.names[name]).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        file = self.where[name]
        sl = self._handle(file).get_slice(self.names[name])
        try:
            return sl[index]
        except Exception:
            if sl.get_dtype() != "BF16":
                raise
            # safetensors versions whose numpy reader has no bfloat16: read through jax.
            return np.asarray(self._handle(file, "flax").get_slice(self.names[name])[index])


def _check_tensors(ckpt: _Checkpoint, cfg: ModelConfig, maps: list[TensorMap],
                   others: tuple[str, ...] = ()) -> None:
    """Every expected tensor exists with the expected shape, and nothing unexpected is left
    (tensors whose names start with one of `others` belong to another part of the model)."""
    sizes, expected = _sizes(cfg), hf_tensor_names(cfg)
    by_name = {tm.ours: tm for tm in maps}
    for name, (ours, _) in expected.items():
        want, found = hf_shape(by_name[ours], sizes), ckpt.shape(name)
        if want != found:
            raise ValueError(f"tensor {name!r} in {ckpt.file_of(name)}: expected shape {want} "
                             f"from config.json, found {found}")
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(n for n in ckpt.where if n not in expected and n not in ignored
                   and not n.endswith(IGNORED_SUFFIXES) and not n.startswith(others or ("\0",)))
    if extra:
        raise ValueError(
            f"{ckpt.searched()}: tensors the {cfg.model_type} decoder has no place for "
            f"(unsupported architecture variant?): {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )


def _fill(ckpt: _Checkpoint, tm: TensorMap, sizes, shape, sharding, dtype) -> jax.Array:
    """One parameter as a jax.Array; each device's shard is read from disk on its own."""

    def callback(index):
        index = () if index is None else tuple(index)
        index += (slice(None),) * (len(shape) - len(index))
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
        layers = range(*bounds[0]) if tm.stacked else [None]
        ranges = dict(zip(tm.dims, bounds[1:] if tm.stacked else bounds, strict=True))
        blocks = []
        for layer in layers:
            name = tm.hf_name(layer)
            read = lambda ix, name=name: ckpt.read(name, ix)
            blocks.append(read_block(read, tm, sizes, ranges).astype(dtype))
        return np.stack(blocks) if tm.stacked else blocks[0]

    return jax.make_array_from_callback(shape, sharding, callback)


def load_pretrained(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules=None) -> tuple[Transformer, ModelConfig]:
    """(model, config) from a Hugging Face model directory (config.json + safetensors).

    `dtype` sets both the parameter and the compute dtype (default float32). With `mesh`, every
    parameter is created sharded by `rules` (default `DEFAULT_RULES`) and each device's shard is
    read straight from the files, so no full host copy of the model is made.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory does not exist")
    if _model_type(path) == "qwen2_5_vl":
        from migjax.models import qwen25vl
        return qwen25vl.load(path, dtype=dtype, mesh=mesh, rules=rules)
    overrides = {} if dtype is None else dict(param_dtype=str(jnp.dtype(dtype)),
                                               dtype=str(jnp.dtype(dtype)))
    return load_decoder(path, ModelConfig.from_dir(path, **overrides), mesh=mesh, rules=rules)


def _model_type(path: str) -> str | None:
    try:
        with open(os.path.join(path, "config.json")) as fh:
            hf = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_dir names the problem
    return hf.get("model_type") if isinstance(hf, dict) else None


def load_decoder(path: str, cfg: ModelConfig, *, mesh=None, rules=None,
                 others: tuple[str, ...] = ()) -> tuple[Transformer, ModelConfig]:
    """The decoder of `cfg` from the safetensors files of `path` (see `load_pretrained`);
    tensors whose names start with one of `others` are left alone."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    maps = {tm.ours: tm for tm in name_map(cfg)}
    if set(maps) != set(shapes):
        raise AssertionError(f"name map {sorted(maps)} != parameters {sorted(shapes)}")
    if mesh is None:
        shardings = dict.fromkeys(shapes, SingleDeviceSharding(jax.devices()[0]))
    else:
        shardings = param_shardings({k: v.shape for k, v in shapes.items()}, mesh,
                                    DEFAULT_RULES if rules is None else rules)
    sizes = _sizes(cfg)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack)
        _check_tensors(ckpt, cfg, list(maps.values()), others)
        arrays = {k: _fill(ckpt, maps[k], sizes, v.shape, shardings[k], v.dtype)
                  for k, v in shapes.items()}
    nnx.replace_by_pure_dict(state, arrays)
    return nnx.merge(graphdef, state), cfg


def _plan_shards(entries: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_params(params: dict, config: ModelConfig, path: str, *, tokenizer=None,
                max_shard_bytes: int = MAX_SHARD_BYTES, extra: dict | None = None,
                hf_config: dict | None = None) -> str:
    """Writes a flat {name: array} parameter dict as a transformers model directory:
    config.json, safetensors in `config.param_dtype` (several files plus an index above
    `max_shard_bytes`), and the tokenizer's files when given. `extra`: more tensors, already
    in HF names and layout (e.g. a vision tower's); `hf_config`: the config.json to write instead
    of `config.to_hf()`. Returns `path`."""
    path = os.fspath(path)
    maps = name_map(config)
    if {tm.ours for tm in maps} != set(params):
        raise ValueError(f"parameters {sorted(params)} do not match the {config.model_type} "
                         f"decoder of this config ({sorted(tm.ours for tm in maps)})")
    sizes, dtype = _sizes(config), jnp.dtype(config.param_dtype)
    by_name = {tm.ours: tm for tm in maps}
    names = hf_tensor_names(config)
    entries = []
    for tm in maps:
        want = tuple(sizes[s] for s in tm.dims)
        want = (config.num_layers, *want) if tm.stacked else want
        if tuple(params[tm.ours].shape) != want:
            raise ValueError(f"parameter {tm.ours!r} has shape {tuple(params[tm.ours].shape)}, "
                             f"the config needs {want}")
    entries = [(name, math.prod(hf_shape(by_name[ours], sizes)) * dtype.itemsize)
               for name, (ours, _) in names.items()]
    extra = extra or {}
    entries += [(name, x.nbytes) for name, x in extra.items()]
    shards = _plan_shards(entries, max_shard_bytes)
    os.makedirs(path, exist_ok=True)
    stale = glob.glob(os.path.join(path, "model-*-of-*.safetensors"))
    for f in stale + [os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)]:
        if os.path.isfile(f):
            os.remove(f)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else \
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            if name in extra:
                tensors[name] = extra[name]
                weight_map[name] = file
                continue
            ours, layer = names[name]
            x = params[ours] if layer is None else params[ours][layer]
            x = np.asarray(jax.device_get(x)).astype(dtype)
            tensors[name] = to_hf_layout(x, by_name[ours], sizes)
            weight_map[name] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in entries)}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config.to_hf() if hf_config is None else hf_config, fh, indent=2,
                  sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_pretrained(model: Transformer, config: ModelConfig, path: str, *, tokenizer=None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """`save_params` for an NNX decoder module (or a `qwen25vl.Qwen25VL` and its config)."""
    if not isinstance(model, Transformer):
        from migjax.models import qwen25vl
        return qwen25vl.save(model, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    _, state = nnx.split(model, nnx.Param)
    return save_params(nnx.to_pure_dict(state), config, path, tokenizer=tokenizer,
                       max_shard_bytes=max_shard_bytes)
