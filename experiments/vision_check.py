"""Can the scene recipe's vision-language model learn to read its images at all? The warm
start's training step (`migjax.warmstart.vl_sft_step`) on the scratch Qwen2.5-VL shape of
`scenes_tiny`, on one of three image tasks, reporting the loss and the teacher-forced loss of
the colour words on held-out examples with their own images and with the images permuted:

    python -m experiments.vision_check --task solid --steps 150      # "What colour?", one colour
    python -m experiments.vision_check --task quadrant --steps 150   # the colour in one quadrant
    python -m experiments.vision_check --task scenes --steps 300 --objects 1 1   # descriptions

A model that reads the image has a lower colour loss with its own images than with permuted
ones; log 8 = 2.08 nats is a uniform guess among the 8 colours.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("solid", "quadrant", "scenes"), default="scenes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--objects", type=int, nargs=2, default=(2, 4), help="scenes: min max")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import jax.numpy as jnp
    import optax

    from migjax import experiment as ex
    from migjax.configs.cli import load
    from migjax.data import scenes, visual
    from migjax.models import merge
    from migjax.models.multimodal import ImageFeatures, image_layout, patchify, tower_features
    from migjax.models.scoring import token_logprobs
    from migjax.train_state import init_state, place_state
    from migjax.warmstart import (
        _demo_images,
        _scratch_only,
        _vl_model,
        encode_demos,
        make_vl_sft_step,
    )

    c = load("scenes_tiny")
    c.task.scenes.objects = tuple(a.objects)
    work = tempfile.mkdtemp(prefix="vision_check_")
    tok = ex.build_tokenizer(c, work)
    mesh = ex.build_mesh(c)
    vlcfg, graphdefs, params = _vl_model(c, _scratch_only(c), tok, mesh, work)
    grid = ex.image_grid(c, vlcfg.vision)
    mark = visual.placeholder(ex.image_token_count(c, vlcfg.vision))
    h, w = c.task.image.height, c.task.image.width
    names = list(scenes.COLORS)
    rng = np.random.default_rng(a.seed)
    spec = dataclasses.replace(visual.scene_spec(c, "train"), min_objects=a.objects[0],
                               max_objects=a.objects[1])
    pool = [scenes.describe_item(spec, i) for i in range(600)] if a.task == "scenes" else []

    def examples(idx):
        """(prompts, completions, uint8 images) of examples `idx`."""
        if a.task == "scenes":
            items = [pool[i] for i in idx]
            return ([mark + it.question for it in items], [it.solution for it in items],
                    np.stack([it.image for it in items]))
        colours = [names[i % len(names)] for i in idx]
        imgs = np.full((len(idx), h, w, 3), 128, np.uint8)
        for j, col in enumerate(colours):
            if a.task == "solid":
                imgs[j] = scenes.COLORS[col]
            else:  # one quadrant, drawn by the example's index
                q = (idx[j] // len(names)) % 4
                imgs[j, (q // 2) * h // 2:(q // 2 + 1) * h // 2,
                     (q % 2) * w // 2:(q % 2 + 1) * w // 2] = scenes.COLORS[col]
        return [mark + "What colour?"] * len(idx), [f" {col}" for col in colours], imgs

    def encode(idx):
        prompts, completions, imgs = examples(idx)
        (t, m, lm), dropped = encode_demos(tok, prompts, completions, 256)
        assert not dropped
        return t, m, lm, imgs

    colour_ids = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).lstrip("Ġ")
                  in scenes.COLORS]
    held = encode(np.arange(568, 600))

    def colour_nll(params, imgs):
        t, m, lm, _ = held
        lay = image_layout(t, m, image_token_id=vlcfg.image_token_id, grid_thw=grid,
                           images_per_prompt=1, spatial_merge_size=vlcfg.vision.spatial_merge_size)
        feats = tower_features(merge(graphdefs[1], params["visual"]),
                               jnp.asarray(patchify(imgs, vlcfg.vision)), grid)
        img = ImageFeatures(feats, jnp.asarray(lay.index_ExM), jnp.asarray(lay.positions_ExPx3),
                            jnp.zeros(len(t), jnp.int32))
        lp = np.asarray(token_logprobs(merge(graphdefs[0], params["lm"]), jnp.asarray(t),
                                       jnp.asarray(m), images=img)[0])
        is_colour = np.isin(t, colour_ids) & lm
        return float(-(lp * is_colour).sum() / is_colour.sum())

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(a.lr))
    state, shardings = place_state(init_state(params, opt), mesh)
    step = make_vl_sft_step(graphdefs, grid, opt, shardings)
    perm = np.random.default_rng(a.seed + 1).permutation(len(held[3]))
    print(f"{'step':>5} {'loss':>7} {'colour nll own':>15} {'permuted':>9}")
    for s in range(a.steps):
        t, m, lm, imgs = encode(rng.integers(0, 568, 16))
        state, met = step(state, jnp.asarray(t), jnp.asarray(m), jnp.asarray(lm),
                          _demo_images(imgs, t, m, vlcfg, grid, jnp.asarray))
        if s % a.every == 0 or s == a.steps - 1:
            print(f"{s:>5} {float(met['sft/loss']):>7.3f} {colour_nll(state.params, held[3]):>15.3f} "
                  f"{colour_nll(state.params, held[3][perm]):>9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
