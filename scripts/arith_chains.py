"""How often the policy is right for the right reason on the embedded arithmetic task.

    python scripts/arith_chains.py --model runs/arith_tiny/sft_model \
        [--config=configs/arith_tiny.py] [--prompts 64] [--group_size 8] [--seed 0]

Samples `group_size` completions (the config's sampler: temperature, token budget) for
`prompts` training prompts and prints one JSON object: how many samples are correct, how many
have a valid chain (every "Step n: a op b = c" line right and starting from the previous result,
`migjax.data.arith.chain_is_valid`), both, and `lucky` (correct with an invalid chain). A high
lucky share means the outcome reward mostly pays for guesses, which RL then reinforces; small
answer ranges (`task.arith.train.max_value`) and weak warm starts produce it.
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


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from migjax import experiment as ex
    from migjax.evaluation import completion_texts
    from migjax.rollout import sample
    from migjax.trainer import sampling_rules

    c = _CONFIG.value
    _, tok, graphdef, params, _ = ex.load_model_dir(c, _MODEL.value)
    train, _, _ = ex.build_data(c, tok)
    n = min(_PROMPTS.value, len(train))
    rollout = sample(graphdef, params, jnp.asarray(train.tokens_ExP[:n]),
                     jnp.asarray(train.mask_ExP[:n]), jax.random.key(_SEED.value),
                     rules=sampling_rules(c, tok), group_size=_GROUP.value)
    texts = completion_texts(tok, rollout)
    refs = [train.answers[i // _GROUP.value][0] for i in range(len(texts))]
    print(json.dumps(chain_stats(texts, refs)))


if __name__ == "__main__":
    app.run(main)
