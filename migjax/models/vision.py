"""The vision tower of Qwen2.5-VL as a Flax NNX module with stacked block parameters, and its
Hugging Face checkpoint I/O.

The tower takes what transformers' image processor (`Qwen2VLImageProcessor`) produces:
`pixel_values` [P, C*T*Pp*Pp], one row per patch of `temporal_patch_size` frames x `patch_size`^2
pixels, the patches of each image (or video) already in the 2x2 (`spatial_merge_size`^2)
merge order, and `image_grid_thw` [I, 3], the (frames, rows, columns) of patches of each image.
It returns [P / merge^2, out_hidden_size]: one token per merged group of patches, in the order
of `Qwen2_5_VLModel.get_image_features` (images one after another, row-major over the merged
grid).

Inside, the patches are permuted into windows of `window_size` pixels (window_size //
spatial_merge_size // patch_size merged patches a side, each window contiguous); blocks listed
in `fullatt_block_indexes` attend within each frame of each image, the others within each
window. Both are boolean [P, P] masks built from per-patch segment ids. The permutation and the
segment ids depend only on `grid_thw`, which is therefore a host numpy array: they are computed
on the host (`vision_layout`), and a jitted caller must treat `grid_thw` as static (close over it
or pass the `VisionLayout`'s arrays as inputs: `VisionTower.apply` is traceable, compiled once
per total patch count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from migjax.models.loading import (
    SINGLE_FILE,
    TensorMap,
    _Checkpoint,
    hf_shape,
    read_block,
    to_hf_layout,
)
from migjax.models.transformer import _init, attention, remat_policy, rms_norm

# Logical axes of every parameter of the tower. Block parameters carry a leading "layers" axis.
# "patch", "qkv", "merge_in", "merge_mlp" and "out_embed" have no default sharding rule
# (replicated).
VISION_PARAM_AXES = {
    "patch_embed": ("patch", "embed"),
    "norm1": ("layers", "embed"),
    "wqkv": ("layers", "embed", "qkv", "heads", "head_dim"),
    "bqkv": ("layers", "qkv", "heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "bo": ("layers", "embed"),
    "norm2": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "b_gate": ("layers", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "b_up": ("layers", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "b_down": ("layers", "embed"),
    "merger_norm": ("embed",),
    "merger_w1": ("merge_in", "merge_mlp"),
    "merger_b1": ("merge_mlp",),
    "merger_w2": ("merge_mlp", "out_embed"),
    "merger_b2": ("out_embed",),
}

_ACTS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The fields of a Qwen2.5-VL `vision_config` (defaults: Qwen2.5-VL-7B's tower)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # fixed in transformers, not a config field
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing"  # see models.config.REMAT_POLICIES

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must "
                             f"give a head_dim divisible by 4 (2-D rotary embedding)")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: not one of {sorted(_ACTS)}")
        if self.window_merged < 1:
            raise ValueError(f"window_size {self.window_size} is smaller than one merged patch "
                             f"({self.spatial_merge_size * self.patch_size} pixels)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_merged(self) -> int:
        """Side of an attention window in merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def full_blocks(self) -> tuple[bool, ...]:
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> VisionConfig:
        """From a `vision_config` dict (transformers' or the original Qwen one, which names
        in_channels `in_chans` and has no rope_parameters), or a whole Qwen2.5-VL config.json."""
        if "vision_config" in hf:
            hf = hf["vision_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names}
        if "in_channels" not in kw and "in_chans" in hf:
            kw["in_channels"] = hf["in_chans"]
        rope = hf.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "fullatt_block_indexes" in kw:
            kw["fullatt_block_indexes"] = tuple(int(i) for i in kw["fullatt_block_indexes"])
        for k in ("patch_size", "temporal_patch_size"):
            if isinstance(kw.get(k), (list, tuple)):
                if len(set(kw[k])) != 1:
                    raise ValueError(f"{k} {kw[k]}: only square patches are supported")
                kw[k] = int(kw[k][0])
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str, **overrides) -> VisionConfig:
        with open(os.path.join(os.fspath(path), "config.json")) as fh:
            return cls.from_hf(json.load(fh), **overrides)

    def to_hf(self) -> dict:
        """The transformers `vision_config` dict."""
        return dict(
            model_type="qwen2_5_vl_vision", depth=self.depth, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_heads=self.num_heads,
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes),
            out_hidden_size=self.out_hidden_size, in_channels=self.in_channels,
            hidden_act=self.hidden_act,
            rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})


class VisionLayout(NamedTuple):
    """Host-side (numpy) index arrays of one `grid_thw`; P patches, M = P / merge^2 tokens.

    order_P: the window permutation of patches (position in the window order -> patch row of
    pixel_values); reverse_M: merged token of the window order at each output position;
    pos_Px2: (row, column) of each patch in the window order; full_seg_P / win_seg_P: the
    frame / window of each patch in the window order (attention stays within one).
    """

    order_P: np.ndarray
    reverse_M: np.ndarray
    pos_Px2: np.ndarray
    full_seg_P: np.ndarray
    win_seg_P: np.ndarray


def vision_layout(cfg: VisionConfig, grid_thw_Ix3) -> VisionLayout:
    """The permutation, positions and segments transformers computes from `grid_thw`
    (`get_vision_position_ids`, `get_vision_window_index`, `get_vision_cu_seqlens`)."""
    grid = np.asarray(grid_thw_Ix3, np.int64).reshape(-1, 3)
    m, unit, ws = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_merged
    pos, win_index, win_sizes, frame_sizes = [], [], [], []
    offset = 0
    for t, h, w in grid.tolist():
        if t < 1 or h % m or w % m or h < 1 or w < 1:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)}: h and w must be positive multiples "
                             f"of spatial_merge_size {m}")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw_Px2 = np.stack([hh, ww], axis=-1).reshape(h // m, m, w // m, m, 2)
        pos.append(np.tile(hw_Px2.transpose(0, 2, 1, 3, 4).reshape(-1, 2), (t, 1)))
        gh, gw = h // m, w // m
        index_TxHxW = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = ws - gh % ws, ws - gw % ws  # as transformers: a whole empty window if divisible
        nh, nw = (gh + ph) // ws, (gw + pw) // ws
        padded = np.pad(index_TxHxW, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        win_sizes.append((padded >= 0).sum(axis=1))
        flat = padded.reshape(-1)
        win_index.append(flat[flat >= 0] + offset)
        frame_sizes += [h * w] * t
        offset += t * gh * gw
    win_index_M = np.concatenate(win_index)
    win_sizes_W = np.concatenate(win_sizes)
    order_P = (win_index_M[:, None] * unit + np.arange(unit)).reshape(-1)
    pos_Px2 = np.concatenate(pos)[order_P]
    win_seg_P = np.repeat(np.arange(len(win_sizes_W)), win_sizes_W * unit)
    # the permutation stays within each frame, so frame segments are the same in both orders
    full_seg_P = np.repeat(np.arange(len(frame_sizes)), frame_sizes)
    i32 = lambda a: np.asarray(a, np.int32)
    return VisionLayout(i32(order_P), i32(np.argsort(win_index_M, kind="stable")), i32(pos_Px2),
                        i32(full_seg_P), i32(win_seg_P))


def rope_2d(x_PxHxD: jax.Array, ang_PxK: jax.Array) -> jax.Array:
    """Rotary embedding by per-token angles (K = D/2), halves rotated as in `apply_rope`."""
    cos, sin = jnp.cos(ang_PxK)[:, None, :], jnp.sin(ang_PxK)[:, None, :]
    x = x_PxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_PxHxD.dtype)


class VisionTower(nnx.Module):
    """Patch embedding -> `depth` scanned pre-norm blocks (window/full attention with 2-D rope,
    SwiGLU MLP, biases everywhere) -> patch merger (RMSNorm, merge^2 patches -> MLP)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, D, F, H, Dh = (cfg.depth, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                          cfg.head_dim)
        Mi, O = D * cfg.merge_unit, cfg.out_hidden_size
        pd = jnp.dtype(cfg.param_dtype)
        P = nnx.Param
        self.patch_embed = P(_init(rngs, (cfg.patch_dim, D), pd))
        self.norm1 = P(jnp.ones((L, D), pd))
        self.wqkv = P(_init(rngs, (L, D, 3, H, Dh), pd))
        self.bqkv = P(jnp.zeros((L, 3, H, Dh), pd))
        self.wo = P(_init(rngs, (L, H, Dh, D), pd))
        self.bo = P(jnp.zeros((L, D), pd))
        self.norm2 = P(jnp.ones((L, D), pd))
        self.w_gate = P(_init(rngs, (L, D, F), pd))
        self.b_gate = P(jnp.zeros((L, F), pd))
        self.w_up = P(_init(rngs, (L, D, F), pd))
        self.b_up = P(jnp.zeros((L, F), pd))
        self.w_down = P(_init(rngs, (L, F, D), pd))
        self.b_down = P(jnp.zeros((L, D), pd))
        self.merger_norm = P(jnp.ones((D,), pd))
        self.merger_w1 = P(_init(rngs, (Mi, Mi), pd))
        self.merger_b1 = P(jnp.zeros((Mi,), pd))
        self.merger_w2 = P(_init(rngs, (Mi, O), pd))
        self.merger_b2 = P(jnp.zeros((O,), pd))

    def _layer_params(self) -> dict:
        return {n: getattr(self, n)[...] for n, ax in VISION_PARAM_AXES.items()
                if ax[0] == "layers"}

    def inv_freq(self) -> jax.Array:
        """Frequencies of each spatial axis (head_dim / 4 of them; rows and columns share)."""
        half = self.cfg.head_dim // 2
        return 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))

    def _block(self, x_PxD, p, ang_PxK, mask_PxP):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        c = lambda a: a.astype(dt)
        h = rms_norm(x_PxD, p["norm1"], cfg.rms_norm_eps)
        qkv_Px3xHxK = jnp.einsum("pd,dthk->pthk", h, c(p["wqkv"])) + c(p["bqkv"])
        q, k, v = (qkv_Px3xHxK[:, i] for i in range(3))
        q, k = rope_2d(q, ang_PxK), rope_2d(k, ang_PxK)
        o_PxHxK = attention(q[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
                            mask_PxP[None])[0]
        x_PxD = x_PxD + jnp.einsum("phk,hkd->pd", o_PxHxK, c(p["wo"])) + c(p["bo"])
        h = rms_norm(x_PxD, p["norm2"], cfg.rms_norm_eps)
        g = h @ c(p["w_gate"]) + c(p["b_gate"])
        u = h @ c(p["w_up"]) + c(p["b_up"])
        return x_PxD + (_ACTS[cfg.hidden_act](g) * u) @ c(p["w_down"]) + c(p["b_down"])

    def apply(self, pixel_values_PxF: jax.Array, layout: VisionLayout) -> jax.Array:
        """[M, out_hidden_size] for `layout = vision_layout(cfg, grid_thw)` (traceable: the
        layout's arrays may be jit inputs)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        order_P, reverse_M, pos_Px2, full_seg_P, win_seg_P = (jnp.asarray(a) for a in layout)
        x_PxD = pixel_values_PxF.astype(dt) @ self.patch_embed[...].astype(dt)
        x_PxD = x_PxD[order_P]
        inv = self.inv_freq()
        ang_PxK = jnp.concatenate([pos_Px2[:, :1] * inv, pos_Px2[:, 1:] * inv], axis=-1)
        full_mask = full_seg_P[:, None] == full_seg_P[None, :]
        win_mask = win_seg_P[:, None] == win_seg_P[None, :]

        def body(x, xs):
            p, full = xs
            return self._block(x, p, ang_PxK, jnp.where(full, full_mask, win_mask)), None

        if cfg.remat:
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat_policy))
        x_PxD, _ = jax.lax.scan(body, x_PxD, (self._layer_params(), jnp.asarray(cfg.full_blocks)))
        h = rms_norm(x_PxD, self.merger_norm[...], cfg.rms_norm_eps)
        h_MxU = h.reshape(-1, cfg.hidden_size * cfg.merge_unit)
        h_MxU = jax.nn.gelu(h_MxU @ self.merger_w1[...].astype(dt)
                            + self.merger_b1[...].astype(dt), approximate=False)
        out_MxO = h_MxU @ self.merger_w2[...].astype(dt) + self.merger_b2[...].astype(dt)
        return out_MxO[reverse_M]

    def __call__(self, pixel_values_PxF: jax.Array, grid_thw_Ix3) -> jax.Array:
        """[sum(t*h*w) / merge^2, out_hidden_size]. `grid_thw_Ix3` is a host array (static under
        jit): the output shape and the attention layout depend on it."""
        grid = np.asarray(grid_thw_Ix3).reshape(-1, 3)
        n = int(np.prod(grid, axis=1).sum())
        if pixel_values_PxF.shape != (n, self.cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values_PxF.shape)}: grid_thw "
                             f"{grid.tolist()} needs ({n}, {self.cfg.patch_dim})")
        return self.apply(pixel_values_PxF, vision_layout(self.cfg, grid))


# ---------------------------------------------------------------------------- checkpoint I/O
PREFIXES = ("visual.", "model.visual.")  # transformers 5 writes (and Qwen ships) "visual."
_PATCH = "patch_embed"


def vision_name_map(prefix: str = "visual.") -> list[TensorMap]:
    """Every tower parameter with its HF tensor and layout (see `TensorMap`). Symbols: D, F, H,
    Dh, Q (q/k/v), X (C*T*P*P; the Conv3d weight [D, C, T, P, P] is read as [D, X]), Mi (the
    merged width D * merge^2, input side), Mo (same width, output side), O (out_hidden_size)."""
    b, m = prefix + "blocks.{i}.", prefix + "merger."
    vec = lambda ours, hf, s: TensorMap(ours, hf, ((s,),), (s,))
    return [
        TensorMap(_PATCH, prefix + "patch_embed.proj.weight", (("D",), ("X",)), ("X", "D")),
        vec("norm1", b + "norm1.weight", "D"),
        TensorMap("wqkv", b + "attn.qkv.weight", (("Q", "H", "Dh"), ("D",)),
                  ("D", "Q", "H", "Dh")),
        TensorMap("bqkv", b + "attn.qkv.bias", (("Q", "H", "Dh"),), ("Q", "H", "Dh")),
        TensorMap("wo", b + "attn.proj.weight", (("D",), ("H", "Dh")), ("H", "Dh", "D")),
        vec("bo", b + "attn.proj.bias", "D"),
        vec("norm2", b + "norm2.weight", "D"),
        TensorMap("w_gate", b + "mlp.gate_proj.weight", (("F",), ("D",)), ("D", "F")),
        vec("b_gate", b + "mlp.gate_proj.bias", "F"),
        TensorMap("w_up", b + "mlp.up_proj.weight", (("F",), ("D",)), ("D", "F")),
        vec("b_up", b + "mlp.up_proj.bias", "F"),
        TensorMap("w_down", b + "mlp.down_proj.weight", (("D",), ("F",)), ("F", "D")),
        vec("b_down", b + "mlp.down_proj.bias", "D"),
        vec("merger_norm", m + "ln_q.weight", "D"),
        TensorMap("merger_w1", m + "mlp.0.weight", (("Mo",), ("Mi",)), ("Mi", "Mo")),
        vec("merger_b1", m + "mlp.0.bias", "Mo"),
        TensorMap("merger_w2", m + "mlp.2.weight", (("O",), ("Mo",)), ("Mo", "O")),
        vec("merger_b2", m + "mlp.2.bias", "O"),
    ]


def _sizes(cfg: VisionConfig) -> dict[str, int]:
    mi = cfg.hidden_size * cfg.merge_unit
    return dict(D=cfg.hidden_size, F=cfg.intermediate_size, H=cfg.num_heads, Dh=cfg.head_dim,
                Q=3, X=cfg.patch_dim, Mi=mi, Mo=mi, O=cfg.out_hidden_size)


def _file_shape(tm: TensorMap, cfg: VisionConfig) -> tuple[int, ...]:
    if tm.ours == _PATCH:
        p = cfg.patch_size
        return (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, p, p)
    return hf_shape(tm, _sizes(cfg))


def vision_hf_names(cfg: VisionConfig, prefix: str = "visual.") -> dict[str, tuple[str, int | None]]:
    """{HF tensor name: (our parameter, block index or None)}."""
    out = {}
    for tm in vision_name_map(prefix):
        for layer in range(cfg.depth) if tm.stacked else (None,):
            out[tm.hf_name(layer)] = (tm.ours, layer)
    return out


def _prefix_of(names) -> str:
    for prefix in PREFIXES:
        if prefix + "patch_embed.proj.weight" in names:
            return prefix
    raise KeyError(f"no vision tower tensors (one of {[p + 'patch_embed.proj.weight' for p in PREFIXES]})")


def vision_params_from_tensors(read, cfg: VisionConfig, names, dtype=None) -> dict[str, np.ndarray]:
    """Our {name: array} from HF tensors: `read(name)` returns a whole tensor; `names` are the
    tensor names available (the prefix is found from them). Shapes are checked against `cfg`."""
    prefix = _prefix_of(names)
    sizes = _sizes(cfg)
    out = {}
    for tm in vision_name_map(prefix):
        blocks = []
        for layer in range(cfg.depth) if tm.stacked else (None,):
            name = tm.hf_name(layer)
            if name not in names:
                raise KeyError(f"tensor {name!r} missing")
            x = np.asarray(read(name))
            if tuple(x.shape) != _file_shape(tm, cfg):
                raise ValueError(f"tensor {name!r}: shape {tuple(x.shape)}, the vision config "
                                 f"needs {_file_shape(tm, cfg)}")
            x = x.reshape(hf_shape(tm, sizes))
            full = {s: (0, sizes[s]) for s in sizes}
            blocks.append(read_block(lambda ix, x=x: x[ix], tm, sizes, full))
        arr = np.stack(blocks) if tm.stacked else blocks[0]
        out[tm.ours] = arr if dtype is None else arr.astype(dtype)
    return out


def load_vision(path: str, *, dtype: str | None = None) -> tuple[VisionTower, VisionConfig]:
    """(tower, config) from a Qwen2.5-VL model directory: `vision_config` of config.json and the
    `visual.*` (or `model.visual.*`) tensors of its safetensors files; other tensors are left
    alone. `dtype` sets the parameter and compute dtype (default float32)."""
    path = os.fspath(path)
    overrides = {} if dtype is None else dict(param_dtype=str(jnp.dtype(dtype)),
                                               dtype=str(jnp.dtype(dtype)))
    cfg = VisionConfig.from_dir(path, **overrides)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack)
        read = lambda name: ckpt.read(name, tuple(slice(None) for _ in ckpt.shape(name)))
        arrays = vision_params_from_tensors(read, cfg, set(ckpt.where),
                                            dtype=jnp.dtype(cfg.param_dtype))
    return tower_from_params(cfg, arrays), cfg


def tower_from_params(cfg: VisionConfig, params: dict) -> VisionTower:
    abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    if set(shapes) != set(params):
        raise ValueError(f"parameters {sorted(params)} != the tower's {sorted(shapes)}")
    for k, v in shapes.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(f"parameter {k!r}: shape {tuple(params[k].shape)}, the config "
                             f"needs {tuple(v.shape)}")
    nnx.replace_by_pure_dict(state, {k: jnp.asarray(params[k], v.dtype) for k, v in shapes.items()})
    return nnx.merge(graphdef, state)


def vision_tensors(tower_or_params, cfg: VisionConfig, *, prefix: str = "visual.",
                   dtype=None) -> dict[str, np.ndarray]:
    """{HF tensor name: array} of the tower (a `VisionTower` or its flat param dict), in the
    layout transformers stores (`dtype` default: cfg.param_dtype)."""
    if isinstance(tower_or_params, VisionTower):
        _, state = nnx.split(tower_or_params, nnx.Param)
        params = nnx.to_pure_dict(state)
    else:
        params = tower_or_params
    sizes = _sizes(cfg)
    dtype = jnp.dtype(cfg.param_dtype if dtype is None else dtype)
    out = {}
    for tm in vision_name_map(prefix):
        arr = np.asarray(jax.device_get(params[tm.ours]))
        for layer in range(cfg.depth) if tm.stacked else (None,):
            x = arr if layer is None else arr[layer]
            y = to_hf_layout(x.astype(dtype), tm, sizes).reshape(_file_shape(tm, cfg))
            out[tm.hf_name(layer)] = np.ascontiguousarray(y)
    return out


def save_vision(tower: VisionTower, cfg: VisionConfig, path: str, *, others: dict | None = None,
                filename: str = SINGLE_FILE) -> str:
    """Writes the tower's tensors (plus `others`, e.g. the language model's, already in HF
    names) as one safetensors file `path/filename`. Returns the file path. config.json is the
    caller's (see `VisionConfig.to_hf` for its `vision_config`)."""
    tensors = dict(others or {})
    tensors.update(vision_tensors(tower, cfg))
    os.makedirs(os.fspath(path), exist_ok=True)
    file = os.path.join(os.fspath(path), filename)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def num_params(cfg: VisionConfig) -> int:
    return sum(math.prod(_file_shape(tm, cfg)) * (cfg.depth if tm.stacked else 1)
               for tm in vision_name_map())
