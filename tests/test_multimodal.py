"""The RL path with image prompts against `Qwen25VL.__call__` (itself checked against
transformers in test_qwen25vl.py): scoring, the sampler (prefill with the image, decoding after
it), the MIG probes, the encoded data's image layout, and our image preprocessing against
transformers' Qwen2-VL image processor."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from migjax.models import split
from migjax.models.config import ModelConfig
from migjax.models.multimodal import (
    ImageEncoder,
    ImageFeatures,
    ImageLayout,
    image_layout,
    patchify,
    tower_features,
)
from migjax.models.qwen25vl import Qwen25VL, VLConfig
from migjax.models.scoring import token_logprobs
from migjax.models.vision import VisionConfig
from migjax.rewards import mig
from migjax.rollout import SamplingRules, sample

IMG, START, END, PAD = 2, 4, 5, 0
H = W = 16  # 4x4 patches of 4 px, 2x2 merged: 4 image tokens
GRID = (1, 4, 4)
M = 4


@pytest.fixture(scope="module")
def vl():
    text = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                       mrope_section=(2, 3, 3), eos_token_id=1, pad_token_id=PAD,
                       tie_word_embeddings=True)
    vision = VisionConfig(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                          patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                          window_size=8, fullatt_block_indexes=(1,), out_hidden_size=32)
    # no video token: the greedy reference decodes by the full model, which refuses one
    cfg = VLConfig(text, vision, image_token_id=IMG, video_token_id=None,
                   vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    # larger weights than the init's: the images must change the logits visibly
    graphdef, state = nnx.split(model, nnx.Param)
    key = jax.random.key(1)
    state = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(
        jax.random.fold_in(key, x.size), x.shape), state)
    return nnx.merge(graphdef, state), cfg


def prompts(rng, b, width):
    """b left-padded prompts: text, an image, text (different lengths)."""
    toks = np.full((b, width), PAD, np.int32)
    mask = np.zeros((b, width), bool)
    for i in range(b):
        row = (rng.integers(6, 64, 2 + i).tolist() + [START] + [IMG] * M + [END]
               + rng.integers(6, 64, 3 + (i % 2)).tolist())
        toks[i, width - len(row):], mask[i, width - len(row):] = row, True
    return toks, mask


def images(rng, b):
    return rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8)


def features(model, cfg, toks, mask, imgs) -> ImageFeatures:
    lay = image_layout(toks, mask, image_token_id=IMG, grid_thw=GRID, images_per_prompt=1,
                       spatial_merge_size=2)
    feats = tower_features(model.visual, jnp.asarray(patchify(imgs, cfg.vision)), GRID)
    return ImageFeatures(feats, jnp.asarray(lay.index_ExM), jnp.asarray(lay.positions_ExPx3),
                         jnp.asarray(lay.delta_E))


def reference_logp(model, cfg, tokens, mask, imgs):
    """log-softmax of Qwen25VL.__call__ on whole sequences, as [N, T, V]."""
    px = patchify(imgs, cfg.vision).reshape(-1, cfg.vision.patch_dim)
    grid = np.tile(np.asarray(GRID), (len(imgs), 1))
    logits = model(jnp.asarray(tokens), jnp.asarray(mask), pixel_values=jnp.asarray(px),
                   image_grid_thw=grid)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def test_scoring_with_images_matches_the_full_model(vl):
    model, cfg = vl
    rng = np.random.default_rng(0)
    toks, mask = prompts(rng, 3, 16)
    imgs = images(rng, 3)
    comp = rng.integers(6, 64, (3, 5)).astype(np.int32)
    cmask = np.ones((3, 5), bool)
    cmask[1, 3:] = False
    seq, smask = np.concatenate([toks, comp], 1), np.concatenate([mask, cmask], 1)
    got, _ = token_logprobs(model.lm, jnp.asarray(seq), jnp.asarray(smask),
                            images=features(model, cfg, toks, mask, imgs))
    ref = reference_logp(model, cfg, seq, smask, imgs)
    want = np.take_along_axis(np.asarray(ref[:, :-1]), seq[:, 1:, None], -1)[..., 0]
    m = smask[:, 1:] & smask[:, :-1]
    np.testing.assert_allclose(np.asarray(got)[:, 1:][m], want[m], atol=2e-5, rtol=0)
    # the images matter: other images give other log-probs of the completion
    other = features(model, cfg, toks, mask, images(np.random.default_rng(9), 3))
    moved, _ = token_logprobs(model.lm, jnp.asarray(seq), jnp.asarray(smask), images=other)
    assert np.abs(np.asarray(moved - got))[:, 16:][cmask].max() > 1e-3


def test_greedy_sampling_with_images_matches_step_by_step_decoding(vl):
    model, cfg = vl
    rng = np.random.default_rng(1)
    toks, mask = prompts(rng, 2, 16)
    imgs = images(rng, 2)
    graphdef, params = split(model.lm)
    rules = SamplingRules(max_new_tokens=6, greedy=True, pad_id=PAD)
    out = sample(graphdef, params, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0),
                 rules=rules, group_size=2, images=features(model, cfg, toks, mask, imgs))
    got = np.asarray(out.tokens_NxC)
    assert got.shape == (4, 6) and (got[0] == got[1]).all()  # greedy: a group agrees
    seq, smask = toks, mask
    for _ in range(6):  # the reference: the full model on the whole sequence at every step
        nxt = np.asarray(jnp.argmax(reference_logp(model, cfg, seq, smask, imgs)[:, -1], -1))
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], 1)
        smask = np.concatenate([smask, np.ones((2, 1), bool)], 1)
    np.testing.assert_array_equal(got[::2], seq[:, 16:])
    assert out.images.feats_NxMxD.shape[0] == 4  # repeated for the group


def test_mig_probes_see_the_image(vl):
    """l_k of the fast pass against the full model on prompt + prefix_k + probe + answer, and
    other images give other l_k."""
    model, cfg = vl
    rng = np.random.default_rng(2)
    toks, mask = prompts(rng, 2, 16)
    imgs = images(rng, 2)
    comp = rng.integers(6, 64, (2, 6)).astype(np.int32)
    cmask = np.ones((2, 6), bool)
    cuts = np.array([[0, 2, 6], [0, 3, 5]], np.int32)
    probe = np.array([7, 8], np.int32)
    ans = rng.integers(6, 64, (2, 1, 2)).astype(np.int32)
    amask = np.ones((2, 1, 2), bool)
    img = features(model, cfg, toks, mask, imgs)
    got = np.asarray(mig.step_likelihoods(model.lm, toks, mask, comp, cmask, cuts, probe, ans,
                                          amask, images=img))
    want = np.zeros((2, 3), np.float32)
    for i in range(2):  # prompt + prefix_k + probe + answer through the full model
        for k in range(3):
            row = np.concatenate([toks[i][mask[i]], comp[i, :cuts[i, k]], probe, ans[i, 0]])
            lp = reference_logp(model, cfg, row[None], np.ones((1, len(row)), bool),
                                imgs[i:i + 1])[0]
            want[i, k] = np.mean([lp[len(row) - 3 + j, ans[i, 0, j]] for j in range(2)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    other = features(model, cfg, toks, mask, images(np.random.default_rng(9), 2))
    moved = mig.step_likelihoods(model.lm, toks, mask, comp, cmask, cuts, probe, ans, amask,
                                 images=other)
    assert np.abs(np.asarray(moved) - got).min() > 1e-4


def test_image_layout_follows_trimming_and_names_a_bad_row():
    rng = np.random.default_rng(3)
    toks, mask = prompts(rng, 3, 20)
    kw = dict(image_token_id=IMG, grid_thw=GRID, images_per_prompt=1, spatial_merge_size=2)
    lay = image_layout(toks, mask, **kw)
    again = image_layout(toks[:, 4:], mask[:, 4:], **kw)
    for a, b in zip(lay.trimmed(4), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (toks[np.arange(3)[:, None], lay.index_ExM] == IMG).all()
    bad = toks.copy()
    bad[1, np.flatnonzero(bad[1] == IMG)[0]] = 9
    with pytest.raises(ValueError, match="prompt 1: 3 image tokens"):
        image_layout(bad, mask, **kw)
    assert isinstance(lay.take([2, 0]), ImageLayout)


def test_patchify_matches_transformers_image_processor():
    transformers = pytest.importorskip("transformers")
    cfg = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                       fullatt_block_indexes=(0,), out_hidden_size=32)
    proc = transformers.Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2,
                                                 merge_size=2, do_resize=False)
    imgs = np.random.default_rng(4).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    want = np.asarray(proc(images=list(imgs), return_tensors="np")["pixel_values"])
    got = patchify(imgs, cfg)
    assert got.shape == (2, 24, cfg.patch_dim)
    np.testing.assert_allclose(got.reshape(-1, cfg.patch_dim), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patchify(imgs[:, :10], cfg)


def test_image_encoder_is_the_tower(vl):
    model, cfg = vl
    rng = np.random.default_rng(5)
    toks, mask = prompts(rng, 2, 16)
    imgs = images(rng, 2)
    lay = image_layout(toks, mask, image_token_id=IMG, grid_thw=GRID, images_per_prompt=1,
                       spatial_merge_size=2)
    enc = ImageEncoder(model.visual, H, W, cfg)
    got = enc.features(imgs, lay)
    want = features(model, cfg, toks, mask, imgs)
    np.testing.assert_allclose(np.asarray(got.feats_NxMxD), np.asarray(want.feats_NxMxD),
                               atol=1e-5)  # jitted against not: float32 rounding
    assert enc.vl_config(dataclasses.replace(cfg.text, num_layers=3)).text.num_layers == 3


def test_the_update_trains_on_the_image_features(vl):
    """One policy update from a batch with images: the parameters move, and move differently
    when the images differ (the loss's log-probs condition on them)."""
    from migjax.train_state import init_state, make_optimizer
    from migjax.types import TrainBatch
    from migjax.update import UpdateHParams, make_update

    model, cfg = vl
    rng = np.random.default_rng(6)
    toks, mask = prompts(rng, 2, 16)
    g, c = 2, 5
    comp = rng.integers(6, 64, (4, c)).astype(np.int32)
    cmask = np.ones((4, c), bool)
    rep = lambda x: np.repeat(x, g, axis=0)
    batch = lambda imgs: TrainBatch(
        prompt_NxP=jnp.asarray(rep(toks)), prompt_mask_NxP=jnp.asarray(rep(mask)),
        tokens_NxC=jnp.asarray(comp), mask_NxC=jnp.asarray(cmask),
        cot_mask_NxC=jnp.zeros((4, c), bool), step_id_NxC=jnp.zeros((4, c), jnp.int32),
        sampler_logp_NxC=jnp.zeros((4, c)), l_NxK1=jnp.zeros((4, 2)),
        step_mask_NxK=jnp.zeros((4, 1), bool), num_steps_N=jnp.zeros(4, jnp.int32),
        r_correct_N=jnp.asarray([1.0, 0.0, 0.0, 1.0]), r_format_N=jnp.zeros(4),
        truncated_N=jnp.zeros(4, bool),
        images=features(model, cfg, rep(toks), rep(mask), rep(imgs)))
    graphdef, params = split(model.lm)
    opt = make_optimizer(lr=1e-2)
    update = make_update(graphdef, opt, UpdateHParams(group_size=g))
    moved = []
    for seed in (7, 8):
        state = init_state(jax.tree.map(jnp.copy, params), opt)
        state, m = update(state, batch(images(np.random.default_rng(seed), 2)))
        assert float(m["update/skipped"]) == 0.0
        moved.append(state.params)
    delta = max(float(jnp.abs(moved[0][k] - params[k]).max()) for k in params)
    apart = max(float(jnp.abs(moved[0][k] - moved[1][k]).max()) for k in params)
    assert delta > 1e-3 and apart > 1e-6
