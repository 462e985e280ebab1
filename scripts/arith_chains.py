"""How often the policy is right for the right reason on the embedded arithmetic task.

    python scripts/arith_chains.py --model runs/arith_tiny/sft_model \
        [--config=configs/arith_tiny.py] [--prompts 64] [--group_size 8] [--seed 0] [--habit]

Samples `group_size` completions (the config's sampler: temperature, token budget) for
`prompts` training prompts and prints one JSON object: how many samples are correct, how many
have a valid chain (every "Step n: a op b = c" line right and starting from the previous result,
`migjax.data.arith.chain_is_valid`), both, and `lucky` (correct with an invalid chain). A high
lucky share means the outcome reward mostly pays for guesses, which RL then reinforces; small
answer ranges (`task.arith.train.max_value`) and weak warm starts produce it.

`--habit` instead decodes the `test` set (`task.eval_limit` problems) greedily and prints, for
the questions with and without an irrelevant fact, the greedy accuracy and how often the chain has
more steps than the question's operations: the careless teacher's habit
(`warmstart.distracted_prob`) that RL on the embedded default has to remove.
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
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Training prompts to sample.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_HABIT = flags.DEFINE_boolean("habit", False, "Greedy test-set accuracy and extra steps, split "
                              "by distractor presence.")


def chain_stats(texts, refs) -> dict:
    """Counts of correct, valid-chain, correct-and-valid and lucky samples."""
    from migjax.data.arith import chain_is_valid, check_answer
    from migjax.rewards.answers import extract_answer

    out = dict(samples=len(texts), correct=0, valid_chain=0, correct_and_valid=0, lucky=0)
    for text, ref in zip(texts, refs, strict=True):
        ok = check_answer(extract_answer(text), ref)
        valid = chain_is_valid(text)
        out["correct"] += ok
        out["valid_chain"] += valid
        out["correct_and_valid"] += ok and valid
        out["lucky"] += ok and not valid
    return out


def habit_stats(texts, items) -> list[dict]:
    """Per distractor presence (True first): problems, greedy accuracy and the fraction whose
    completion has more "Step n:" lines than the question has operations."""
    import re

    from migjax.data.arith import check_answer
    from migjax.rewards.answers import extract_answer

    out = []
    for has in (True, False):
        rows = [(t, it) for t, it in zip(texts, items, strict=True) if bool(it.distractors) == has]
        n = max(len(rows), 1)
        correct = sum(check_answer(extract_answer(t), it.answer) for t, it in rows)
        extra = sum(len(re.findall(r"(?m)^Step \d+:", t)) > len(it.steps) for t, it in rows)
        out.append(dict(distractor=has, problems=len(rows), greedy_acc=round(correct / n, 4),
                        extra_step=round(extra / n, 4)))
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from migjax import experiment as ex
    from migjax.evaluation import completion_texts
    from migjax.rollout import sample
    from migjax.trainer import eval_rules, sampling_rules

    c = _CONFIG.value
    _, tok, graphdef, params, _ = ex.load_model_dir(c, _MODEL.value)
    train, evals, _ = ex.build_data(c, tok)
    if _HABIT.value:
        import dataclasses

        from migjax.data import arith

        test = evals["test"]
        task = arith.ArithTask(ex.arith_spec(c, "test"), len(test))
        items = [task[i] for i in range(len(test))]
        if [it.answer for it in items] != [a[0] for a in test.answers]:
            raise SystemExit("arith_chains --habit: the encoded test set does not follow the "
                             "task's order (were prompts skipped as over-long?)")
        rules = dataclasses.replace(eval_rules(c, tok), greedy=True)
        rollout = sample(graphdef, params, jnp.asarray(test.tokens_ExP),
                         jnp.asarray(test.mask_ExP), jax.random.key(_SEED.value), rules=rules,
                         group_size=1)
        for row in habit_stats(completion_texts(tok, rollout), items):
            print(json.dumps(row))
        return
    n = min(_PROMPTS.value, len(train))
    rollout = sample(graphdef, params, jnp.asarray(train.tokens_ExP[:n]),
                     jnp.asarray(train.mask_ExP[:n]), jax.random.key(_SEED.value),
                     rules=sampling_rules(c, tok), group_size=_GROUP.value)
    texts = completion_texts(tok, rollout)
    refs = [train.answers[i // _GROUP.value][0] for i in range(len(texts))]
    print(json.dumps(chain_stats(texts, refs)))


if __name__ == "__main__":
    app.run(main)
