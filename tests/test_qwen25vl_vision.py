"""The Qwen2.5-VL vision tower against transformers' `Qwen2_5_VLForConditionalGeneration.model.
visual` on a tiny random checkpoint: one image, two images of different sizes, the image
processor's own outputs, a two-frame clip, that the windows matter, and the weight writer."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from migjax.models import merge, split
from migjax.models.vision import (
    VisionConfig,
    load_vision,
    num_params,
    save_vision,
    vision_hf_names,
    vision_layout,
    vision_params_from_tensors,
    vision_tensors,
)

PATCH, TPATCH, MERGE = 4, 2, 2
WINDOW = 16  # pixels: 2 x 2 merged patches per window
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
              temporal_patch_size=TPATCH, spatial_merge_size=MERGE, window_size=WINDOW,
              fullatt_block_indexes=[1, 3], out_hidden_size=48, in_channels=3)
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 10000.0})
F = 3 * TPATCH * PATCH * PATCH


def hf_model(seed=0, **vision):
    cfg = transformers.Qwen2_5_VLConfig(vision_config={**VISION, **vision}, text_config=TEXT,
                                        image_token_id=2, video_token_id=3,
                                        vision_start_token_id=4, vision_end_token_id=5)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_features(model, pixel_values_PxF, grid_thw_Ix3):
    with torch.no_grad():
        out = model.model.visual(torch.as_tensor(np.asarray(pixel_values_PxF)),
                                 grid_thw=torch.as_tensor(np.asarray(grid_thw_Ix3)))
    return out.pooler_output.float().numpy()


def ours(tower, pixel_values_PxF, grid_thw_Ix3):
    grid = np.asarray(grid_thw_Ix3)
    fn = nnx.jit(lambda m, x: m(x, grid))
    return np.asarray(fn(tower, jnp.asarray(np.asarray(pixel_values_PxF), jnp.float32)))


def random_pixels(grid_thw_Ix3, seed=0):
    n = int(np.prod(np.asarray(grid_thw_Ix3), axis=1).sum())
    return np.random.RandomState(seed).randn(n, F).astype(np.float32)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    ref = hf_model()
    path = tmp_path_factory.mktemp("qwen25vl")
    ref.save_pretrained(path)
    tower, cfg = load_vision(str(path))
    return ref, tower, cfg, str(path)


def test_config_and_names(vl):
    ref, tower, cfg, path = vl
    assert cfg.depth == 4 and cfg.fullatt_block_indexes == (1, 3) and cfg.window_merged == 2
    assert cfg.patch_dim == F and cfg.rope_theta == 10000.0
    saved = {k for k in load_file(os.path.join(path, "model.safetensors")) if "visual" in k}
    assert set(vision_hf_names(cfg)) == saved
    assert num_params(cfg) == sum(p.numel() for p in ref.model.visual.parameters())
    # the original Qwen config.json spells in_channels "in_chans" and has no rope_parameters
    raw = {**VisionConfig().to_hf(), "in_chans": 1}
    del raw["in_channels"], raw["rope_parameters"]
    assert VisionConfig.from_hf(raw).in_channels == 1


def test_one_image_matches_transformers(vl):
    ref, tower, _, _ = vl
    grid = np.array([[1, 12, 8]])  # 6 x 4 merged patches: 3 x 2 windows, the last ones partial
    x = random_pixels(grid)
    got, want = ours(tower, x, grid), hf_features(ref, x, grid)
    assert got.shape == want.shape == (24, 48)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_two_images_of_different_sizes_match_transformers(vl):
    ref, tower, _, _ = vl
    grid = np.array([[1, 6, 10], [1, 8, 4]])
    x = random_pixels(grid, seed=1)
    got, want = ours(tower, x, grid), hf_features(ref, x, grid)
    assert got.shape == (15 + 8, 48)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # each image attends only to itself: the first image's features alone are the same
    alone = ours(tower, x[:60], grid[:1])
    np.testing.assert_allclose(alone, got[:15], atol=1e-5, rtol=0)


def test_a_two_frame_clip_matches_transformers(vl):
    ref, tower, _, _ = vl
    grid = np.array([[2, 4, 8], [1, 4, 4]])
    x = random_pixels(grid, seed=2)
    np.testing.assert_allclose(ours(tower, x, grid), hf_features(ref, x, grid), atol=1e-4,
                               rtol=0)


def test_image_processor_outputs_match_transformers(vl):
    ref, tower, _, _ = vl
    proc = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH, temporal_patch_size=TPATCH, merge_size=MERGE, min_pixels=8 * 8,
        max_pixels=48 * 48)
    rng = np.random.RandomState(3)
    images = [Image.fromarray(rng.randint(0, 256, (40, 24, 3), np.uint8)),
              rng.randint(0, 256, (30, 50, 3), np.uint8)]
    batch = proc(images=images, return_tensors="np")
    x, grid = np.asarray(batch["pixel_values"]), np.asarray(batch["image_grid_thw"])
    assert len(grid) == 2 and (grid[0] != grid[1]).any() and x.shape[1] == F
    got, want = ours(tower, x, grid), hf_features(ref, x, grid)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_windows_matter(vl, tmp_path):
    ref, tower, cfg, _ = vl
    grid = np.array([[1, 12, 8]])
    x = random_pixels(grid, seed=4)
    windowed = ours(tower, x, grid)
    # the same weights with one window over the whole image (48 px) and in transformers
    wide = hf_model(window_size=64)
    wide.load_state_dict(ref.state_dict())
    wide.save_pretrained(tmp_path)
    wide_tower, wide_cfg = load_vision(str(tmp_path))
    assert wide_cfg.window_merged == 8
    got = ours(wide_tower, x, grid)
    np.testing.assert_allclose(got, hf_features(wide, x, grid), atol=1e-4, rtol=0)
    assert np.abs(got - windowed).max() > 1e-2
    lay = vision_layout(cfg, grid)
    assert len(np.unique(lay.win_seg_P)) == 6 and len(np.unique(lay.full_seg_P)) == 1
    assert sorted(lay.order_P.tolist()) == list(range(96))


def test_writer_round_trip_reloads_in_transformers(vl, tmp_path):
    ref, tower, cfg, path = vl
    hf = load_file(os.path.join(path, "model.safetensors"))
    back = vision_tensors(tower, cfg)
    assert set(back) == {k for k in hf if k.startswith("visual.")}
    for k, v in back.items():
        assert v.shape == hf[k].shape and v.dtype == hf[k].dtype
        np.testing.assert_array_equal(v, hf[k])
    # the reader also takes the "model.visual." spelling
    named = vision_tensors(tower, cfg, prefix="model.visual.")
    again = vision_params_from_tensors(named.__getitem__, cfg, set(named))
    for k, v in split(tower)[1].items():
        np.testing.assert_array_equal(again[k], np.asarray(v))
    # changed weights written next to the language model's load in transformers with the same
    # features as ours
    graphdef, params = split(tower)
    changed = merge(graphdef, {k: v * 1.1 for k, v in params.items()})
    others = {k: v for k, v in hf.items() if not k.startswith("visual.")}
    out = tmp_path / "export"
    save_vision(changed, cfg, out, others=others)
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    with open(out / "config.json", "w") as fh:
        json.dump(config, fh)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    grid = np.array([[1, 8, 8]])
    x = random_pixels(grid, seed=5)
    want = hf_features(reloaded, x, grid)
    np.testing.assert_allclose(ours(changed, x, grid), want, atol=1e-4, rtol=0)
    assert np.abs(want - hf_features(ref, x, grid)).max() > 1e-2
    tower2, _ = load_vision(str(out))
    np.testing.assert_allclose(ours(tower2, x, grid), want, atol=1e-4, rtol=0)


def test_layout_as_jit_inputs_and_bfloat16(vl):
    """`apply` takes the layout's arrays as traced inputs; a bf16 tower stays close."""
    ref, tower, cfg, path = vl
    grid = np.array([[1, 6, 10], [1, 8, 4]])
    x = jnp.asarray(random_pixels(grid, seed=6))
    fn = nnx.jit(lambda m, x, lay: m.apply(x, lay))
    got = np.asarray(fn(tower, x, vision_layout(cfg, grid)))
    np.testing.assert_allclose(got, ours(tower, x, grid), atol=1e-5, rtol=0)
    bf16, bcfg = load_vision(path, dtype="bfloat16")
    assert bcfg.dtype == "bfloat16" and bf16.wqkv[...].dtype == jnp.bfloat16
    low = np.asarray(fn(bf16, x, vision_layout(bcfg, grid))).astype(np.float32)
    assert np.abs(low - got).max() < 0.1 * np.abs(got).max()
    with pytest.raises(ValueError, match="pixel_values"):
        tower(x[:-1], grid)
