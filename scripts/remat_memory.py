"""What `model.remat_policy` keeps: XLA's temporary buffers (the compiled program's
`memory_analysis()`) for the gradient of the teacher-forced log-likelihood, without remat and
with each policy. Prints one JSON object.

    python scripts/remat_memory.py [--model tiny] [--layers 4] [--batch 4] [--seq-len 128]

A real model's shapes, as the RL update sees them (log-probs and entropy of the last
`--completion` columns, in chunks of `--chunk`; nothing is allocated, only compiled):

    python scripts/remat_memory.py --hf-config WORKDIR/gemma3-270m/config.json --batch 8 \
        --seq-len 576 --completion 256 --chunk 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def temp_bytes(cfg, batch: int, seq_len: int, completion: int = 0, chunk: int = 256) -> int:
    """XLA's temporary bytes for the gradient; `completion` > 0 scores only the last
    `completion` columns, with entropy, as the RL update does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from migjax.models import init_model, merge, split
    from migjax.models.scoring import token_logprobs

    graphdef, params = split(nnx.eval_shape(lambda: init_model(cfg)))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    first = seq_len - completion if completion else 1

    def loss(p, tokens, mask):
        lp, ent = token_logprobs(merge(graphdef, p), tokens, mask, chunk_size=chunk,
                                 with_entropy=bool(completion), first=first)
        return -lp.mean() - ent.mean()

    return int(jax.jit(jax.grad(loss)).lower(params, tokens, mask).compile().memory_analysis()
               .temp_size_in_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a preset of migjax.models.PRESETS")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hf-config", help="a Hugging Face config.json instead of --model/--layers")
    p.add_argument("--completion", type=int, default=0,
                   help="score only the last N columns, with entropy (the RL update)")
    p.add_argument("--chunk", type=int, default=256, help="rl.score_chunk")
    a = p.parse_args(argv)
    from migjax.models import PRESETS
    from migjax.models.config import REMAT_POLICIES, ModelConfig

    if a.hf_config:
        with open(a.hf_config) as f:
            cfg = ModelConfig.from_hf(json.load(f), dtype="float32")
        name, layers = a.hf_config, cfg.num_layers
    else:
        cfg = PRESETS[a.model].replace(num_layers=a.layers)
        name, layers = a.model, a.layers
    shape = dict(batch=a.batch, seq_len=a.seq_len, completion=a.completion, chunk=a.chunk)
    out = {"model": name, "layers": layers, **shape, "none": temp_bytes(cfg, **shape)}
    for policy in REMAT_POLICIES:
        out[policy] = temp_bytes(cfg.replace(remat=True, remat_policy=policy), **shape)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
