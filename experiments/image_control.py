"""Does a vision-language policy look at the image? Greedy pass@1 of a model directory on an
image task's evaluation sets with each prompt's own image, with the images permuted across the
prompts (seeded), and with one blank grey image for every prompt.

    python -m experiments.image_control --workdir runs/scenes_tiny \
        --out experiments/results/scenes_tiny/image_control.json

The model is WORKDIR/sft_model (the warm start) unless --model names another Qwen2.5-VL
directory (e.g. `python -m migjax.export WORKDIR --out DIR` of the RL policy); the config is the
run's own (WORKDIR/config.json), so the evaluation sets are the run's. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="", help="default WORKDIR/sft_model")
    p.add_argument("--out", default="")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import jax

    from migjax import experiment as ex
    from migjax import trainer
    from migjax.data.visual import ImageSet
    from migjax.evaluation import evaluate
    from migjax.export import read_config
    from migjax.rewards.verify import Verifier

    c = read_config(a.workdir)
    path = a.model or os.path.join(a.workdir, "sft_model")
    c.model.path = c.tokenizer_path = path
    mesh, tokenizer, graphdef, params, _ = ex.load_model_dir(c, path)
    vision = ex.build_vision(c, path, tokenizer)
    _, evals, _ = ex.build_data(c, tokenizer)
    rules = trainer.eval_rules(c, tokenizer)
    verifier = Verifier(timeout_s=c.reward.verify_timeout_s)
    rng = np.random.default_rng(a.seed)
    results = {}
    for name, data in evals.items():
        imgs = data.images.images_ExHxWxC
        grey = np.full_like(imgs, 128)
        for cond, images in (("own", imgs), ("permuted", imgs[rng.permutation(len(imgs))]),
                             ("blank", grey)):
            swapped = dataclasses.replace(data, images=ImageSet(images, data.images.layout))
            res, _ = evaluate(graphdef, params, swapped, tokenizer, verifier, rules=rules,
                              batch_size=c.eval.batch_size, k=0,
                              key=jax.random.fold_in(jax.random.key(c.seed), trainer.EVAL),
                              images=trainer.image_features(vision, swapped, mesh))
            results[f"{name}/{cond}"] = {"pass_at_1": res["pass_at_1"],
                                         "pass_at_1_se": res["pass_at_1_se"], "n": res["n"]}
    verifier.close()
    print(f"{'set/images':<18}{'pass@1':<18}n")
    for k, v in results.items():
        print(f"{k:<18}{v['pass_at_1']:.3f} +- {v['pass_at_1_se']:.3f}   {v['n']:.0f}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"model": path, "workdir": a.workdir, "seed": a.seed, "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
