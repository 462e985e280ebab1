"""Does the RL update move the policy the right way? K RL steps from a model, with the policy
measured before and every `--every` steps on fixed prompts with common random numbers.

    python scripts/rl_probe.py --model runs/arith_tiny/sft_model [--steps 30] [--every 10] \
        [--shuffle_rewards] [--config=configs/arith_tiny.py] [--config.optim.lr=5e-5 ...]

The measurements reuse the same sampling keys each time, so a change in them comes from the
parameters, not from sampling noise:
  sampled_train: accuracy of `--samples` samples on `--heldout` training prompts taken from the
                 end of the training set (the RL batches come from a shuffled iterator, so a
                 few may also be trained on);
  sampled_train_len: the mean length in tokens of those samples (over-long chains show here);
  greedy_train:  greedy accuracy on the same prompts;
  sampled_test, greedy_test: the same on the `test` evaluation set (`task.eval_limit` problems).
`--shuffle_rewards` permutes the outcome rewards (and with them the SFT gate) within each batch
before the update: a control that keeps the update's size and noise but not its outcome signal.
The MIG process stream keeps its own signal; with `--config=configs/arith_tiny.py:grpo_matched` the
control has none. Prints one JSON object per measurement.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/arith_tiny.py",
                                          "Config file (configs/*.py[:variant]).",
                                          lock_config=False)
_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (with its tokenizer).",
                             required=True)
_STEPS = flags.DEFINE_integer("steps", 30, "RL steps.")
_EVERY = flags.DEFINE_integer("every", 10, "Measure every this many steps.")
_HELDOUT = flags.DEFINE_integer("heldout", 128, "Training prompts measured (from the end).")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Samples per measured prompt.")
_SHUFFLE = flags.DEFINE_boolean("shuffle_rewards", False, "Permute rewards within each batch.")


def main(argv):
    del argv
    import dataclasses
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from migjax import experiment as ex
    from migjax import trainer
    from migjax.data.pipeline import make_iterator
    from migjax.evaluation import completion_texts
    from migjax.rewards.answers import extract_answer
    from migjax.rewards.verify import Verifier
    from migjax.rollout import sample
    from migjax.train_state import init_state, place_state
    from migjax.update import UpdateHParams, make_update

    c = _CONFIG.value
    c.log.samples_every = 0
    mesh, tok, graphdef, params, mcfg = ex.load_model_dir(c, _MODEL.value)
    train, evals, _ = ex.build_data(c, tok)
    verifier = Verifier(timeout_s=c.reward.verify_timeout_s)
    rules = trainer.sampling_rules(c, tok)
    greedy = dataclasses.replace(trainer.eval_rules(c, tok), greedy=True)
    optimizer = trainer.rl_optimizer(c)
    state, shardings = place_state(init_state(params, optimizer), mesh)
    update_fn = make_update(graphdef, optimizer, UpdateHParams.from_config(c), shardings)
    if _SHUFFLE.value:
        signal_update, rng = update_fn, np.random.default_rng(c.seed)

        def update_fn(s, b, ref):
            p = rng.permutation(b.r_correct_N.shape[0])
            return signal_update(s, b._replace(r_correct_N=b.r_correct_N[p],
                                               r_format_N=b.r_format_N[p]), ref)

    stage = trainer.reward_stage(c, tok, mcfg, verifier)
    it = make_iterator(train, batch_size=c.rl.batch_prompts, seed=c.seed)
    held = np.arange(max(0, len(train) - _HELDOUT.value), len(train))
    test = evals["test"]

    def accuracy(p, data, idx, r, g, key):
        """(accuracy, mean completion length) of g samples per prompt drawn with `key`."""
        ro = sample(graphdef, p, jnp.asarray(data.tokens_ExP[idx]),
                    jnp.asarray(data.mask_ExP[idx]), jax.random.key(key), rules=r, group_size=g)
        texts = completion_texts(tok, ro)
        acc = np.mean([verifier.verify(extract_answer(t), list(data.answers[idx[j // g]]))
                       for j, t in enumerate(texts)])
        return float(acc), float(np.asarray(ro.mask_NxC).sum(axis=1).mean())

    def measure(step, rewards):
        p, all_test = state.params, np.arange(len(test))
        sampled_train, sampled_len = accuracy(p, train, held, rules, _SAMPLES.value, 1)
        row = dict(step=step, batch_reward=float(np.mean(rewards)) if rewards else None,
                   sampled_train=sampled_train, sampled_train_len=sampled_len,
                   greedy_train=accuracy(p, train, held, greedy, 1, 0)[0],
                   sampled_test=accuracy(p, test, all_test, rules, _SAMPLES.value, 1)[0],
                   greedy_test=accuracy(p, test, all_test, greedy, 1, 0)[0])
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)

    measure(0, [])
    rewards = []
    with tempfile.TemporaryDirectory() as workdir:
        for step in range(_STEPS.value):
            state, m = trainer.rl_step(c, step, graphdef, update_fn, state, None, it, train,
                                       stage, rules, mesh, workdir)
            rewards.append(m["reward/correct"])
            if (step + 1) % _EVERY.value == 0 or step + 1 == _STEPS.value:
                measure(step + 1, rewards[-_EVERY.value:])
    for closing in (it, verifier):
        closing.close()


if __name__ == "__main__":
    app.run(main)
