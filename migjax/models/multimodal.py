"""Image prompts on the text path (Qwen2.5-VL): the sampler, scoring, the MIG probes and the
update run the text decoder with image features spliced into the prompt's embeddings and the
prompt's M-RoPE positions.

Images appear only in prompts, so every sequence these stages build is "prompt, then text":
the prompt's P columns take the image features at their image tokens and the prompt's
(time, height, width) positions; every later token at ordinary position p (the count of real
tokens before it) sits at p + delta on all three rows, where delta is the prompt's rope delta
(`qwen25vl.mrope_positions`). `ImageFeatures` carries that per row; it is a batch-first pytree,
so it is sharded, repeated over a group and split into minibatches like the tokens.

Images are preprocessed to one fixed size per run (`patchify`), so every prompt has the same
number of patches and image tokens; the tower (`ImageEncoder`) turns a batch of images into
features in one vmapped call. In RL the tower is frozen: it is trained by the supervised warm
start, and the policy update trains the language model on its features.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from migjax.models import merge, split
from migjax.models.vision import VisionConfig, VisionTower, vision_layout

# transformers' Qwen2-VL image processor normalises with OpenAI CLIP's statistics
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
VIDEO_TOKEN = "<|video_pad|>"


class ImageFeatures(NamedTuple):
    """The images of N prompts of P columns, M image tokens each."""

    feats_NxMxD: jax.Array  # float, the tower's output at each image token, in order
    index_NxM: jax.Array  # int32, prompt column of each image token
    positions_NxPx3: jax.Array  # int32, M-RoPE (time, height, width) positions of the prompt
    delta_N: jax.Array  # int32, rope delta: text after the prompt sits at position p + delta


class ImageLayout(NamedTuple):
    """Host arrays of E encoded prompts with images (see `image_layout`)."""

    index_ExM: np.ndarray
    positions_ExPx3: np.ndarray
    delta_E: np.ndarray

    def take(self, idx) -> ImageLayout:
        return ImageLayout(*(a[idx] for a in self))

    def trimmed(self, cut: int) -> ImageLayout:
        """The layout of the same prompts without their first `cut` (pad) columns."""
        return ImageLayout(self.index_ExM - cut, self.positions_ExPx3[:, cut:], self.delta_E)


def decoder_inputs(model, tokens_NxT, pos_NxT, images: ImageFeatures | None):
    """(embeds [N, T, D] or None, positions) for `model.hidden` on a sequence whose first P
    columns are the prompt: without images (None, pos_NxT), with them the token embeddings with
    the features in place and [3, N, T] positions."""
    if images is None:
        return None, pos_NxT
    n, p = images.positions_NxPx3.shape[:2]
    dt = jnp.dtype(model.cfg.dtype)
    x = model.embed[...].astype(dt)[tokens_NxT]
    x = x.at[jnp.arange(n)[:, None], images.index_NxM].set(images.feats_NxMxD.astype(dt))
    pos3 = jnp.concatenate([jnp.moveaxis(images.positions_NxPx3, -1, 0),
                            text_positions(pos_NxT[:, p:], images)], axis=2)
    return x, pos3


def text_positions(pos_NxT, images: ImageFeatures | None):
    """Rope positions of text after the prompt at ordinary positions `pos_NxT`: those, or with
    image prompts [3, N, T] positions p + delta on all three rows."""
    if images is None:
        return pos_NxT
    rest = pos_NxT + images.delta_N[:, None]
    return jnp.broadcast_to(rest, (3, *rest.shape))


def repeat(images: ImageFeatures | None, g: int) -> ImageFeatures | None:
    """Each prompt's images repeated for its G samples (None stays None)."""
    return None if images is None else jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), images)


def image_layout(tokens_ExP, mask_ExP, *, image_token_id: int, grid_thw, images_per_prompt: int,
                 spatial_merge_size: int) -> ImageLayout:
    """Image-token columns, M-RoPE positions and rope deltas of left-padded prompts that each
    hold `images_per_prompt` images of grid `grid_thw` (raises ValueError naming the row when
    one does not)."""
    from migjax.models.qwen25vl import mrope_positions

    tokens, mask = np.asarray(tokens_ExP), np.asarray(mask_ExP, bool)
    e = len(tokens)
    grid = np.asarray(grid_thw, np.int64).reshape(1, 3)
    per = images_per_prompt * int(np.prod(grid)) // spatial_merge_size ** 2
    is_img = (tokens == image_token_id) & mask
    counts = is_img.sum(axis=1)
    bad = np.flatnonzero(counts != per)
    if len(bad):
        raise ValueError(f"prompt {int(bad[0])}: {int(counts[bad[0]])} image tokens (id "
                         f"{image_token_id}); {images_per_prompt} image(s) of grid "
                         f"{grid[0].tolist()} need {per}")
    pos, delta = mrope_positions(tokens, np.repeat(grid, e * images_per_prompt, axis=0), mask,
                                 image_token_id=image_token_id,
                                 spatial_merge_size=spatial_merge_size)
    index = np.nonzero(is_img)[1].reshape(e, per).astype(np.int32)
    return ImageLayout(index, np.moveaxis(pos, 0, -1).astype(np.int32), delta.astype(np.int32))


def patchify(images_BxHxWxC, cfg: VisionConfig, mean=IMAGE_MEAN, std=IMAGE_STD) -> np.ndarray:
    """[B, t*h*w, C*T*Pp*Pp] float32 patches of uint8 images whose sides are multiples of
    patch_size * spatial_merge_size: exactly transformers' Qwen2-VL image processor without its
    resize (rescale by 1/255, normalise, repeat the frame temporal_patch_size times, patches in
    2x2 merge order)."""
    x = np.asarray(images_BxHxWxC)
    b, h, w, ch = x.shape
    pp, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if h % (pp * m) or w % (pp * m) or ch != cfg.in_channels:
        raise ValueError(f"images {h}x{w}x{ch}: sides must be multiples of patch_size * "
                         f"spatial_merge_size = {pp * m} with {cfg.in_channels} channels")
    x = (x.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std,
                                                                                   np.float32)
    x = np.repeat(x.transpose(0, 3, 1, 2)[:, None], tp, axis=1)  # [B, T, C, H, W]
    gh, gw = h // pp, w // pp
    x = x.reshape(b, tp, ch, gh // m, m, pp, gw // m, m, pp)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(b, gh * gw, ch * tp * pp * pp))


def grid_of(cfg: VisionConfig, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patches of one image of that size."""
    return 1, height // cfg.patch_size, width // cfg.patch_size


def tower_features(tower: VisionTower, pixels_BxSxF, grid_thw) -> jax.Array:
    """[B, M, D] features of B images of one grid (traceable; `grid_thw` is static)."""
    layout = vision_layout(tower.cfg, np.asarray(grid_thw).reshape(1, 3))
    return jax.vmap(lambda px: tower.apply(px, layout))(pixels_BxSxF)


class ImageEncoder:
    """A frozen vision tower: uint8 images of one size -> `ImageFeatures` for prompts."""

    def __init__(self, tower: VisionTower, height: int, width: int, vl_config=None):
        self.cfg = tower.cfg
        self.vl = vl_config  # the Qwen2.5-VL config the tower came with (for export)
        self.size = (height, width)
        self.grid = grid_of(tower.cfg, height, width)
        self.graphdef, self.params = split(tower)
        self._fn = jax.jit(functools.partial(_features, self.graphdef, grid=self.grid))

    def tower(self) -> VisionTower:
        return merge(self.graphdef, self.params)

    def vl_config(self, text_config):
        """The Qwen2.5-VL config of this tower with the language model `text_config`."""
        import dataclasses

        if self.vl is None:
            raise ValueError("ImageEncoder: built without its Qwen2.5-VL config")
        return dataclasses.replace(self.vl, text=text_config)

    def features(self, images_BxHxWxC, layout: ImageLayout, put=jnp.asarray) -> ImageFeatures:
        """The features and layout of B prompts' images (one image each), placed by `put`."""
        feats = self._fn(self.params, put(patchify(images_BxHxWxC, self.cfg)))
        return ImageFeatures(feats, put(layout.index_ExM), put(layout.positions_ExPx3),
                             put(layout.delta_E))


def _features(graphdef, params, pixels_BxSxF, *, grid):
    return tower_features(merge(graphdef, params), pixels_BxSxF, grid)
