"""What `model.remat_policy` keeps: XLA's temporary buffers (the compiled program's
`memory_analysis()`) for the gradient of the teacher-forced log-likelihood, without remat and
with each policy. Prints one JSON object.

    python scripts/remat_memory.py [--model tiny] [--layers 4] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def temp_bytes(cfg, batch: int, seq_len: int) -> int:
    import jax
    import jax.numpy as jnp

    from migjax.models import init_model, merge, split
    from migjax.models.scoring import token_logprobs

    graphdef, params = split(init_model(cfg))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size)
    mask = jnp.ones_like(tokens, bool)
    loss = lambda p: -token_logprobs(merge(graphdef, p), tokens, mask)[0].mean()
    return int(jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
               .temp_size_in_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a preset of migjax.models.PRESETS")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args(argv)
    from migjax.models import PRESETS
    from migjax.models.config import REMAT_POLICIES

    cfg = PRESETS[a.model].replace(num_layers=a.layers)
    out = {"model": a.model, "layers": a.layers, "batch": a.batch, "seq_len": a.seq_len,
           "none": temp_bytes(cfg, a.batch, a.seq_len)}
    for policy in REMAT_POLICIES:
        out[policy] = temp_bytes(cfg.replace(remat=True, remat_policy=policy), a.batch,
                                 a.seq_len)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
