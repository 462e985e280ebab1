"""Where the reward stage's time goes: decode, segmentation, verification and the step-likelihood
pass, timed apart on real rollouts of a model, beside the rollout and the update. `likelihoods`
is the pass on the rollout's full shapes; `stage` the whole stage as the trainer runs it (the
probe blocks of the prefixes the batch needs, `rewards.stage.scoring_shapes`, reading the
sampler's KV cache), and
`max_abs_diff` how far its l_NxK1 is from the full pass's (a check, not a timing).

    python scripts/bench_reward.py --model WARMSTART/sft_model [--reps 5] \
        [--config=configs/arith_tiny.py] [--config.rl.batch_prompts=16 ...]

Prints one JSON object per repetition (seconds per phase) and the medians.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/arith_tiny.py",
                                          "Config file (configs/*.py[:variant]).",
                                          lock_config=False)
_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (with its tokenizer).",
                             required=True)
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (after one warm-up).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from migjax import experiment as ex
    from migjax import trainer
    from migjax.data.pipeline import make_iterator
    from migjax.rewards.stage import score_steps
    from migjax.rewards.verify import Verifier, outcome_rewards
    from migjax.rollout import sample
    from migjax.train_state import init_state, place_state
    from migjax.update import UpdateHParams, make_update

    c = _CONFIG.value
    mesh, tok, graphdef, params, mcfg = ex.load_model_dir(c, _MODEL.value)
    train, _, _ = ex.build_data(c, tok)
    verifier = Verifier(timeout_s=c.reward.verify_timeout_s)
    rules = trainer.sampling_rules(c, tok)
    optimizer = trainer.rl_optimizer(c)
    state, shardings = place_state(init_state(params, optimizer), mesh)
    update_fn = make_update(graphdef, optimizer, UpdateHParams.from_config(c), shardings)
    stage = trainer.reward_stage(c, tok, mcfg, verifier)
    it = make_iterator(train, batch_size=c.rl.batch_prompts, seed=c.seed)
    g = c.rl.group_size
    rows = []
    for rep in range(_REPS.value + 1):
        ids = next(it).example_id_B
        t = [time.perf_counter()]
        ro, cache = sample(graphdef, state.params, jnp.asarray(train.tokens_ExP[ids]),
                           jnp.asarray(train.mask_ExP[ids]), jax.random.key(rep), rules=rules,
                           group_size=g, return_cache=True)
        ro = jax.tree.map(np.asarray, ro)
        t.append(time.perf_counter())
        texts = stage.texts(ro.tokens_NxC, ro.mask_NxC)
        t.append(time.perf_counter())
        seg = stage.segment(ro)
        t.append(time.perf_counter())
        refs = [train.answers[i // g] for i in np.repeat(ids, g)]
        outcome_rewards(texts, refs, verifier, **stage.format_kw)
        t.append(time.perf_counter())
        rep_g = lambda x: jnp.repeat(jnp.asarray(x), g, axis=0)
        l_NxK1 = score_steps(graphdef, state.params, ro.prompt_NxP, ro.prompt_mask_NxP,
                             ro.tokens_NxC, ro.mask_NxC, jnp.asarray(seg.cuts_NxK1),
                             stage.probe_Q, rep_g(train.answer_ExVxA[ids]),
                             rep_g(train.answer_mask_ExVxA[ids]), rules=stage.rules)
        jax.block_until_ready(l_NxK1)
        t.append(time.perf_counter())
        batch, _ = stage(graphdef, state.params, ro, train.answer_ExVxA[ids],
                         train.answer_mask_ExVxA[ids], [train.answers[i] for i in ids], g,
                         cache=cache)
        jax.block_until_ready(batch.l_NxK1)
        t.append(time.perf_counter())
        state, m = update_fn(state, batch, None)
        jax.device_get(m)
        t.append(time.perf_counter())
        d = np.diff(t)
        row = dict(rollout=d[0], decode=d[1], segment=d[2], verify=d[3], likelihoods=d[4],
                   stage=d[5], update=d[6],
                   max_abs_diff=float(jnp.max(jnp.abs(batch.l_NxK1 - l_NxK1))))
        row["stage_share"] = row["stage"] / (row["rollout"] + row["stage"] + row["update"])
        if rep:  # the first repetition compiles
            rows.append(row)
            print(json.dumps({k: float(f"{v:.4g}") for k, v in row.items()}), flush=True)
    med = {k: float(f"{np.median([r[k] for r in rows]):.4g}") for k in rows[0]}
    print(json.dumps({"median": med, "completion_len": float(ro.mask_NxC.sum(1).mean()),
                      "C": int(ro.mask_NxC.shape[1]), "K1": int(seg.cuts_NxK1.shape[1]),
                      "steps_max": int(seg.num_steps_N.max())}))
    for closing in (it, verifier):
        closing.close()


if __name__ == "__main__":
    app.run(main)
