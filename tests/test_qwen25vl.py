"""Qwen2.5-VL end to end against transformers' `Qwen2_5_VLForConditionalGeneration` on a tiny
random checkpoint: M-RoPE positions, logits with several images of different sizes between text
(windows that matter, a left-padded batch), text-only logits, the checkpoint names of
transformers 5's state dict, and the writer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from migjax.models import ModelConfig, load_pretrained, save_pretrained
from migjax.models.qwen25vl import MODEL_TYPE, Qwen25VL, VLConfig, mrope_positions

PATCH, TPATCH, MERGE = 4, 2, 2
IMG, VID, START, END = 2, 3, 4, 5
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
              temporal_patch_size=TPATCH, spatial_merge_size=MERGE, window_size=16,
              fullatt_block_indexes=[1, 3], out_hidden_size=48, in_channels=3)
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 4, 6],
                             "rope_theta": 10000.0})
F = 3 * TPATCH * PATCH * PATCH
GRID = np.array([[1, 12, 8], [1, 4, 6], [1, 8, 8]])  # 6x4 (3x2 windows), 2x3, 4x4 merged


def hf_model(seed=0, tie=False):
    cfg = transformers.Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT,
                                        image_token_id=IMG, video_token_id=VID,
                                        vision_start_token_id=START, vision_end_token_id=END,
                                        tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def image_run(grid_thw):
    return [START] + [IMG] * (int(np.prod(grid_thw)) // MERGE ** 2) + [END]


def text(n, seed):
    return np.random.RandomState(seed).randint(6, 64, n).tolist()


def prompt(grids, seed=0):
    """Text, then each image between vision start/end with text after it."""
    out = text(5, seed)
    for k, g in enumerate(grids):
        out += image_run(g) + text(3 + k, seed + k + 1)
    return out


def pixels(grid, seed=0):
    n = int(np.prod(grid, axis=1).sum())
    return np.random.RandomState(seed).randn(n, F).astype(np.float32)


def hf_logits(model, tokens, mask=None, pixel_values=None, grid=None):
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=torch.as_tensor(pixel_values),
                  image_grid_thw=torch.as_tensor(grid),
                  mm_token_type_ids=torch.as_tensor((np.asarray(tokens) == IMG).astype(np.int64)))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens)),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
                    **kw)
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    ref = hf_model()
    path = tmp_path_factory.mktemp("qwen25vl_lm")
    ref.save_pretrained(path)
    model, cfg = load_pretrained(str(path))
    return ref, model, cfg, str(path)


def test_config(vl):
    _, model, cfg, path = vl
    assert isinstance(model, Qwen25VL) and isinstance(cfg, VLConfig)
    assert cfg.text.mrope_section == (2, 4, 6) and cfg.text.model_type == "qwen2_5_vl_text"
    assert cfg.text.attention_bias and not cfg.text.tie_word_embeddings
    assert cfg.image_token_id == IMG and cfg.vision.window_merged == 2
    assert cfg.text.rms_norm_eps == 1e-5  # transformers' default for the text config
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    with pytest.raises(ValueError, match="vision-language"):
        ModelConfig.from_hf(hf)
    # the original layout: text fields at the top, rope_scaling of type "mrope"
    flat = {**hf.pop("text_config"), **hf}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 4, 6]}
    del flat["rope_parameters"]
    flat["model_type"] = MODEL_TYPE
    assert VLConfig.from_hf(flat) == cfg
    assert VLConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="mrope_section"):
        cfg.text.replace(mrope_section=(2, 4, 4))


def test_positions_match_transformers(vl):
    ref, _, _, _ = vl
    a, b = prompt(GRID[:2]), prompt(GRID[2:], seed=7)
    t = len(a) + 3  # right padding in row 0, left padding in row 1
    tokens = np.array([a + [0] * 3, [0] * (t - len(b)) + b])
    mask = np.ones_like(tokens)
    mask[0, len(a):] = 0
    mask[1, :t - len(b)] = 0
    with torch.no_grad():
        want, want_d = ref.model.get_rope_index(
            torch.as_tensor(tokens), torch.as_tensor((tokens == IMG).astype(np.int64)),
            image_grid_thw=torch.as_tensor(GRID), attention_mask=torch.as_tensor(mask))
    got, got_d = mrope_positions(tokens, GRID, mask, image_token_id=IMG, spatial_merge_size=MERGE)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(got_d, want_d.numpy()[:, 0])
    assert got_d[0] < 0  # images take fewer positions than tokens
    with pytest.raises(ValueError, match="image_grid_thw"):
        mrope_positions(tokens, GRID[:2], mask, image_token_id=IMG, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="consecutive"):
        mrope_positions(tokens, GRID[[1, 0, 2]], mask, image_token_id=IMG,
                        spatial_merge_size=MERGE)


def test_images_between_text_match_transformers(vl):
    ref, model, _, _ = vl
    tokens = np.array([prompt(GRID)])
    x = pixels(GRID, seed=1)
    want = hf_logits(ref, tokens, pixel_values=x, grid=GRID)
    got = np.asarray(model(jnp.asarray(tokens), pixel_values=jnp.asarray(x), image_grid_thw=GRID))
    assert got.shape == want.shape == (1, tokens.shape[1], 64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the images change the logits after them, and M-RoPE is not the ordinary rope here
    plain = np.asarray(model.apply(jnp.asarray(tokens), None,
                                   jnp.broadcast_to(jnp.arange(tokens.shape[1]), (3, *tokens.shape)),
                                   jnp.asarray(x), *model.inputs(tokens, GRID)[1:3]))
    assert np.abs(plain - want).max() > 1e-2


def test_a_padded_batch_matches_transformers(vl):
    ref, model, _, _ = vl
    a, b = prompt(GRID[:2], seed=3), prompt(GRID[2:], seed=4)
    t = max(len(a), len(b))
    tokens = np.array([[0] * (t - len(a)) + a, [0] * (t - len(b)) + b])
    mask = (np.arange(t)[None] >= np.array([[t - len(a)], [t - len(b)]])).astype(np.int64)
    x = pixels(GRID, seed=5)
    want = hf_logits(ref, tokens, mask, x, GRID)
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask), pixel_values=jnp.asarray(x),
                           image_grid_thw=GRID))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_text_only_matches_transformers(vl):
    ref, model, _, _ = vl
    tokens = np.array([text(17, 8), text(17, 9)])
    want = hf_logits(ref, tokens)
    got = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # three equal M-RoPE rows are the ordinary rope
    pos = jnp.broadcast_to(jnp.arange(17), (3, 2, 17))
    np.testing.assert_allclose(np.asarray(model.apply(jnp.asarray(tokens), None, pos)), got,
                               atol=1e-6, rtol=0)


def test_transformers_state_dict_names_load(vl, tmp_path):
    """model.language_model.* / model.visual.* (the in-memory names of transformers 5), tied
    embeddings."""
    ref = hf_model(seed=1, tie=True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.layers.") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref.config.to_json_file(str(tmp_path / "config.json"))
    model, cfg = load_pretrained(str(tmp_path))
    assert cfg.text.tie_word_embeddings
    tokens = np.array([prompt(GRID[1:])])
    x = pixels(GRID[1:], seed=6)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens), pixel_values=jnp.asarray(x),
                         image_grid_thw=GRID[1:])),
        hf_logits(ref, tokens, pixel_values=x, grid=GRID[1:]), atol=1e-4, rtol=0)


def test_writer_round_trip_reloads_in_transformers(vl, tmp_path):
    ref, model, cfg, _ = vl
    graphdef, state = nnx.split(model)
    changed = nnx.merge(graphdef, jax.tree.map(lambda v: v * 1.05, state))
    out = str(tmp_path / "export")
    save_pretrained(changed, cfg, out)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    tokens = np.array([prompt(GRID)])
    x = pixels(GRID, seed=7)
    want = hf_logits(reloaded, tokens, pixel_values=x, grid=GRID)
    got = np.asarray(changed(jnp.asarray(tokens), pixel_values=jnp.asarray(x),
                             image_grid_thw=GRID))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want - hf_logits(ref, tokens, pixel_values=x, grid=GRID)).max() > 1e-2
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_allclose(
        np.asarray(again(jnp.asarray(tokens), pixel_values=jnp.asarray(x), image_grid_thw=GRID)),
        got, atol=1e-5, rtol=0)


def test_kv_cache_decoding_with_rope_deltas_matches_transformers(vl):
    """Prefill with the image features and M-RoPE positions, then decode with the ordinary
    [N, T] positions shifted by rope_deltas: the logits of a full forward in transformers."""
    from migjax.models.transformer import KVCache, cache_mask
    ref, model, cfg, _ = vl
    a, b = prompt(GRID[:2], seed=10), prompt(GRID[2:], seed=11)
    t = max(len(a), len(b))
    tokens = np.array([[0] * (t - len(a)) + a, [0] * (t - len(b)) + b])
    mask = (np.arange(t)[None] >= np.array([[t - len(a)], [t - len(b)]]))
    x = pixels(GRID, seed=12)
    new = np.array([text(3, 13), text(3, 14)])
    h, cache, deltas = model.prefill(tokens, mask, KVCache.empty(cfg.text, 2, t + 3),
                                     pixel_values=x, image_grid_thw=GRID)
    got = [np.asarray(model.lm.logits(h))[:, -1]]
    lengths = mask.sum(axis=1)
    for j in range(2):
        cache, m = cache_mask(cache, jnp.ones((2, 1), bool))
        pos = jnp.asarray((lengths + j + deltas)[:, None])
        h, cache = model.lm.hidden(jnp.asarray(new[:, j:j + 1]), pos, m, cache)
        got.append(np.asarray(model.lm.logits(h))[:, -1])
    full = np.concatenate([tokens, new[:, :2]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 2), bool)], axis=1).astype(np.int64)
    want = hf_logits(ref, full, full_mask, x, GRID)[:, t - 1:]
    np.testing.assert_allclose(np.stack(got, axis=1), want, atol=1e-4, rtol=0)
