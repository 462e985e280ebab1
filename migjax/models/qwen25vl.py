"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the vision tower of `migjax.models.vision`
feeding the decoder of `migjax.models.transformer` with M-RoPE, and its Hugging Face checkpoint
I/O.

`model(tokens_NxT, attention_mask, pixel_values=..., image_grid_thw=...)` takes what
transformers' processor produces (`<|image_pad|>` written t*h*w / merge^2 times per image,
`pixel_values` [P, C*T*Pp*Pp], `image_grid_thw` [I, 3]) and returns logits [N, T, V]. The image
features replace the embeddings at the `image_token_id` positions, in order (images of all
rows one after another), and the positions are the 3-row (time, height, width) positions of
transformers' `get_rope_index`. Both the positions and the vision layout depend on the token
values and the grid, so `__call__` computes them on the host (`mrope_positions`,
`vision_layout`) and runs the traceable `apply`; a jitted caller computes them outside and
passes them to `apply`. Text-only input is the plain decoder with [N, T] positions (equal rows
make M-RoPE the ordinary rope). Videos are not supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from migjax.models.config import ModelConfig
from migjax.models.loading import load_decoder, save_params
from migjax.models.transformer import Transformer, cache_mask, causal_inputs
from migjax.models.vision import (
    PREFIXES,
    VisionConfig,
    VisionLayout,
    VisionTower,
    load_vision,
    vision_layout,
    vision_tensors,
)

MODEL_TYPE = "qwen2_5_vl"
TEXT_TYPE = "qwen2_5_vl_text"
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """A Qwen2.5-VL model: its language model (`text`, with `mrope_section`), its vision tower
    and the ids of its special tokens."""

    text: ModelConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ValueError("text config: Qwen2.5-VL needs an mrope_section")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size {self.vision.out_hidden_size} != "
                             f"text hidden_size {self.text.hidden_size}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.text.eos_ids

    @classmethod
    def from_hf(cls, hf: dict, **text_overrides) -> VLConfig:
        """From a Qwen2.5-VL config.json: transformers 5 (`text_config`) or the original flat
        layout (text fields at the top level, rope_scaling {"type": "mrope", ...})."""
        if hf.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type {hf.get('model_type')!r}: not {MODEL_TYPE!r}")
        text = dict(hf.get("text_config") or
                    {k: v for k, v in hf.items() if k not in ("vision_config", "architectures")})
        for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if k in hf and k not in text:
                text[k] = hf[k]
        if "tie_word_embeddings" in hf:  # the top-level value is the one transformers applies
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        if text.get("use_sliding_window"):
            raise ValueError("text config: use_sliding_window=True is not supported")
        text["model_type"] = TEXT_TYPE
        vision_over = {k: text_overrides[k] for k in ("param_dtype", "dtype")
                       if k in text_overrides}
        tokens = {k: int(hf[k]) for k in TOKEN_FIELDS if hf.get(k) is not None}
        if "image_token_id" not in tokens and "image_token_index" in hf:
            tokens["image_token_id"] = int(hf["image_token_index"])
        return cls(ModelConfig.from_hf(text, **text_overrides),
                   VisionConfig.from_hf(hf["vision_config"], **vision_over), **tokens)

    @classmethod
    def from_dir(cls, path: str, **text_overrides) -> VLConfig:
        f = os.path.join(os.fspath(path), "config.json")
        try:
            with open(f) as fh:
                hf = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: cannot read ({e})") from e
        try:
            return cls.from_hf(hf, **text_overrides)
        except KeyError as e:
            raise ValueError(f"{f}: missing field {e.args[0]!r}") from e
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e

    def to_hf(self) -> dict:
        """The config.json transformers (4.5x and 5) loads as a Qwen2.5-VL model."""
        t = self.text
        text = t.to_hf()
        del text["architectures"]
        rope = {"rope_type": "default", "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section)}
        text.update(model_type=TEXT_TYPE, rope_parameters=rope,
                    rope_scaling={"type": "mrope", "mrope_section": list(t.mrope_section)},
                    use_sliding_window=False, sliding_window=None,
                    max_window_layers=t.num_layers)
        tokens = {k: getattr(self, k) for k in TOKEN_FIELDS}
        return dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type=MODEL_TYPE,
                    text_config=text, vision_config=self.vision.to_hf(),
                    tie_word_embeddings=t.tie_word_embeddings, torch_dtype=t.param_dtype,
                    bos_token_id=t.bos_token_id, eos_token_id=text["eos_token_id"],
                    pad_token_id=t.pad_token_id, **tokens)


class VLInputs(NamedTuple):
    """Host-computed inputs of `Qwen25VL.apply` for one batch: M-RoPE positions [3, N, T],
    the flat (row-major N*T) indices of the image tokens [M], the vision layout (None without
    images) and rope_deltas [N] (max position + 1 - real length: decoding step j after a
    prompt of real length L sits at position L + j + delta on all three rows)."""

    positions_3xNxT: np.ndarray
    image_index_M: np.ndarray
    layout: VisionLayout | None
    rope_deltas_N: np.ndarray


def mrope_positions(tokens_NxT, image_grid_thw=None, attention_mask=None, *,
                    image_token_id: int, spatial_merge_size: int,
                    video_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions [3, N, T], rope_deltas [N]) as transformers' `get_rope_index`: text tokens
    count up on all three rows; an image of grid (t, h, w) starting at position s (its
    t*h*w/merge^2 image tokens, consecutive) takes time s + frame, height s + row, width
    s + column over its merged grid and moves the position on by max(h, w) / merge. Padding
    (attention_mask 0) is skipped and gets position 0. Images are taken in order across rows."""
    tokens = np.asarray(tokens_NxT)
    n, t = tokens.shape
    valid = np.ones((n, t), bool) if attention_mask is None else np.asarray(attention_mask) > 0
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else \
        np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = spatial_merge_size
    if video_token_id is not None and (tokens[valid] == video_token_id).any():
        raise ValueError(f"tokens: video tokens (id {video_token_id}) are not supported")
    pos = np.zeros((3, n, t), np.int64)
    deltas = np.zeros((n,), np.int64)
    image = 0
    for row in range(n):
        ids = tokens[row][valid[row]]
        out = np.zeros((3, len(ids)), np.int64)
        i = s = 0
        while i < len(ids):
            if ids[i] != image_token_id:
                out[:, i] = s
                i, s = i + 1, s + 1
                continue
            if image >= len(grids):
                raise ValueError(f"tokens: more image tokens than image_grid_thw has images "
                                 f"({len(grids)})")
            gt, gh, gw = (int(v) for v in grids[image])
            gh, gw = gh // m, gw // m
            k = gt * gh * gw
            if len(ids) - i < k or (ids[i:i + k] != image_token_id).any():
                raise ValueError(f"tokens: image {image} of grid {grids[image].tolist()} needs "
                                 f"{k} consecutive image tokens (id {image_token_id})")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i:i + k] = np.stack([tt, hh, ww]).reshape(3, -1) + s
            i, s, image = i + k, s + max(gh, gw), image + 1
        pos[:, row, valid[row]] = out
        deltas[row] = (out.max() + 1 - len(ids)) if len(ids) else 0
    if image != len(grids):
        raise ValueError(f"image_grid_thw: {len(grids)} images, the tokens hold {image}")
    return pos.astype(np.int32), deltas.astype(np.int32)


class Qwen25VL(nnx.Module):
    """The vision tower (`visual`) and the M-RoPE decoder (`lm`) of Qwen2.5-VL."""

    def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs | None = None,
                 visual: VisionTower | None = None, lm: Transformer | None = None):
        self.cfg = cfg
        rngs = rngs or nnx.Rngs(0)
        self.visual = visual if visual is not None else VisionTower(cfg.vision, rngs=rngs)
        self.lm = lm if lm is not None else Transformer(cfg.text, rngs=rngs)

    def inputs(self, tokens_NxT, image_grid_thw=None, attention_mask=None) -> VLInputs:
        """The host-side inputs of `apply` (numpy; tokens and grid must be concrete)."""
        cfg = self.cfg
        tokens = np.asarray(tokens_NxT)
        pos, deltas = mrope_positions(tokens, image_grid_thw, attention_mask,
                                      image_token_id=cfg.image_token_id,
                                      spatial_merge_size=cfg.vision.spatial_merge_size,
                                      video_token_id=cfg.video_token_id)
        valid = np.ones(tokens.shape, bool) if attention_mask is None else \
            np.asarray(attention_mask) > 0
        index = np.flatnonzero((tokens == cfg.image_token_id) & valid).astype(np.int32)
        layout = None if image_grid_thw is None else vision_layout(cfg.vision, image_grid_thw)
        return VLInputs(pos, index, layout, deltas)

    def embed(self, tokens_NxT, pixel_values_PxF, image_index_M, layout) -> jax.Array:
        """Token embeddings [N, T, D] with the image features at the image tokens."""
        dt = jnp.dtype(self.cfg.text.dtype)
        x_NxTxD = self.lm.embed[...].astype(dt)[tokens_NxT]
        if pixel_values_PxF is None:
            return x_NxTxD
        feats_MxD = self.visual.apply(pixel_values_PxF, layout).astype(dt)
        n, t, d = x_NxTxD.shape
        return x_NxTxD.reshape(n * t, d).at[image_index_M].set(feats_MxD).reshape(n, t, d)

    def apply(self, tokens_NxT, attention_mask, positions_3xNxT, pixel_values_PxF=None,
              image_index_M=None, layout: VisionLayout | None = None) -> jax.Array:
        """Logits [N, T, V] (traceable: every argument may be a jit input)."""
        x = self.embed(tokens_NxT, pixel_values_PxF, image_index_M, layout)
        pos, mask = causal_inputs(tokens_NxT, attention_mask, positions_3xNxT)
        h, _ = self.lm.hidden(tokens_NxT, pos, mask, embeds_NxTxD=x, causal=True)
        return self.lm.logits(h)

    def prefill(self, tokens_NxT, attention_mask, cache, *, pixel_values=None,
                image_grid_thw=None):
        """(final-norm hidden [N, T, D], cache, rope_deltas [N]) of a prompt written into the
        KV cache at its next slots (see `Transformer.hidden`). Decoding step j (0-based) after
        it then runs `lm.hidden` with the ordinary [N, 1] positions
        real_prompt_length + j + rope_deltas (all three M-RoPE rows are equal there)."""
        valid = np.ones(np.shape(tokens_NxT), bool) if attention_mask is None else \
            np.asarray(attention_mask) > 0
        inp = self.inputs(tokens_NxT, image_grid_thw if pixel_values is not None else None,
                          valid)
        tokens = jnp.asarray(tokens_NxT)
        x = self.embed(tokens, None if pixel_values is None else jnp.asarray(pixel_values),
                       jnp.asarray(inp.image_index_M), inp.layout)
        cache, mask = cache_mask(cache, jnp.asarray(valid))
        h, cache = self.lm.hidden(tokens, jnp.asarray(inp.positions_3xNxT), mask, cache,
                                  embeds_NxTxD=x, causal=True)
        return h, cache, inp.rope_deltas_N

    def __call__(self, tokens_NxT, attention_mask=None, *, pixel_values=None,
                 image_grid_thw=None):
        """Logits [N, T, V]. Without images this is the plain decoder (its own positions)."""
        if pixel_values is None:
            if image_grid_thw is not None:
                raise ValueError("image_grid_thw given without pixel_values")
            return self.lm(tokens_NxT, attention_mask)
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        want = (int(np.prod(grid, axis=1).sum()), self.cfg.vision.patch_dim)
        if tuple(pixel_values.shape) != want:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: image_grid_thw "
                             f"{grid.tolist()} needs {want}")
        inp = self.inputs(tokens_NxT, grid, attention_mask)
        m = want[0] // self.cfg.vision.merge_unit
        if len(inp.image_index_M) != m:
            raise ValueError(f"tokens: {len(inp.image_index_M)} image tokens, image_grid_thw "
                             f"gives {m} image features")
        return self.apply(jnp.asarray(tokens_NxT), attention_mask, jnp.asarray(inp.positions_3xNxT),
                          jnp.asarray(pixel_values), jnp.asarray(inp.image_index_M), inp.layout)


# ---------------------------------------------------------------------------- checkpoint I/O
def load(path: str, *, dtype: str | None = None, mesh=None, rules=None
         ) -> tuple[Qwen25VL, VLConfig]:
    """(model, config) from a Qwen2.5-VL model directory (config.json + safetensors; the
    language model as model.layers.* or model.language_model.layers.*, the tower as visual.* or
    model.visual.*). `dtype` sets parameter and compute dtypes (default float32); with `mesh`
    the language model is created sharded (see `load_pretrained`), the tower replicated."""
    path = os.fspath(path)
    overrides = {} if dtype is None else dict(param_dtype=str(jnp.dtype(dtype)),
                                               dtype=str(jnp.dtype(dtype)))
    cfg = VLConfig.from_dir(path, **overrides)
    lm, _ = load_decoder(path, cfg.text, mesh=mesh, rules=rules, others=PREFIXES)
    visual, _ = load_vision(path, dtype=dtype)
    return Qwen25VL(cfg, visual=visual, lm=lm), cfg


def save(model: Qwen25VL, path: str, *, tokenizer=None, max_shard_bytes: int | None = None
         ) -> str:
    """Writes `model` as a transformers Qwen2.5-VL directory (config.json, safetensors with
    model.layers.* / visual.* names as transformers writes them). Returns `path`."""
    _, state = nnx.split(model.lm, nnx.Param)
    kw = {} if max_shard_bytes is None else dict(max_shard_bytes=max_shard_bytes)
    return save_params(nnx.to_pure_dict(state), model.cfg.text, path, tokenizer=tokenizer,
                       extra=vision_tensors(model.visual, model.cfg.vision),
                       hf_config=model.cfg.to_hf(), **kw)
