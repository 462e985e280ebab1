"""Throughput of migjax's three jitted stages on random weights in a real model's shape: the
sampler (new tokens/s), teacher-forced scoring (tokens/s, MFU) and a forward+backward+AdamW step
(tokens/s, MFU). Same phases, shapes and output keys as ../shared/bench/hf_reference.py, so the
two JSON objects compare when run on the same accelerator.

    python scripts/bench.py --model qwen2.5-0.5b --out bench.json          # GPU, spec sizes

On CPU use smaller shapes: `--shapes small` (8 x (32 + 32) rollout, 4 x 256 scoring,
2 x 256 update) runs the tiny preset in well under a minute; for the 0.5b shape shrink further:

    python scripts/bench.py --model tiny --shapes small --out bench_tiny.json
    python scripts/bench.py --model qwen2.5-0.5b --shapes small --gen-batch 2 --new-tokens 8 \\
        --score-batch 1 --train-batch 1 --seq-len 128 --reps 1 --out bench_05b_cpu.json

MFU uses 2*N*tokens (scoring) and 6*N*tokens (update), N = parameters (embedding included, tied
counted once), over --peak-tflops (989: H100 SXM bf16 dense). Times exclude compilation (one
warm-up call) and end on block_until_ready. Prints one JSON object, also written to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import time

import jax
import jax.numpy as jnp
import optax

from migjax.models import PRESETS, init_model, merge, split
from migjax.models.scoring import token_logprobs
from migjax.rollout.sampler import SamplingRules, sample
from migjax.train_state import make_optimizer

# Batch and length settings: "spec" matches hf_reference.py, "small" is a quick CPU run.
SHAPES = {
    "spec": dict(gen_batch=64, prompt_len=128, new_tokens=256, score_batch=16, train_batch=8,
                 seq_len=1024),
    "small": dict(gen_batch=8, prompt_len=32, new_tokens=32, score_batch=4, train_batch=2,
                  seq_len=256),
}
KEYS = ("rollout_new_tok_s", "score_tok_s", "score_mfu_pct", "update_tok_s", "update_mfu_pct",
        "peak_mem_gib")


def timed(fn, reps: int) -> float:
    """Seconds per call of `fn` after one warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def peak_mem_gib() -> float:
    """Device peak bytes in use where the backend reports it, else the process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def rollout_call(graphdef, params, vocab, a, key, group_size: int = 1):
    """A call of `sample`: gen_batch random prompts of prompt_len tokens, `group_size` samples
    of new_tokens each (the group shares its prompt's prefill), no stop tokens."""
    prompt = jax.random.randint(key, (a.gen_batch, a.prompt_len), 0, vocab, jnp.int32)
    mask = jnp.ones_like(prompt, bool)
    rules = SamplingRules(max_new_tokens=a.new_tokens, temperature=1.0, stop_ids=())
    return lambda: sample(graphdef, params, prompt, mask, key, rules=rules,
                          group_size=group_size).tokens_NxC


def bench_rollout(graphdef, params, vocab, a, key) -> float:
    """New tokens/s of `sample` at gen_batch x (prompt_len + new_tokens), `group_size` samples
    per prompt sharing its prefill, no stop tokens."""
    run = rollout_call(graphdef, params, vocab, a, key, group_size=a.group_size)
    return a.gen_batch * a.group_size * a.new_tokens / timed(run, a.reps)


def score_call(graphdef, params, vocab, a, key):
    """A call of the teacher-forced log-prob pass over score_batch x seq_len tokens."""
    tokens = jax.random.randint(key, (a.score_batch, a.seq_len), 0, vocab, jnp.int32)
    fn = jax.jit(lambda p, t: token_logprobs(merge(graphdef, p), t, chunk_size=a.chunk)[0])
    return lambda: fn(params, tokens)


def bench_score(graphdef, params, vocab, a, key) -> float:
    """Seconds per teacher-forced log-prob pass over score_batch x seq_len tokens."""
    return timed(score_call(graphdef, params, vocab, a, key), a.reps)


def update_call(graphdef, params, vocab, a, key):
    """A call of one forward+backward+AdamW step on train_batch x seq_len tokens; each call
    steps the same state on (donates `params`: use it last)."""
    tokens = jax.random.randint(key, (a.train_batch, a.seq_len), 0, vocab, jnp.int32)
    optimizer = make_optimizer(lr=1e-6)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, t):
        def loss_fn(p):
            return -jnp.mean(token_logprobs(merge(graphdef, p), t, chunk_size=a.chunk)[0][:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    # Committed to the device like the step's outputs (no recompile on the second call); the
    # step donates them, so `params` is not used after this phase.
    state = list(jax.device_put((params, optimizer.init(params)), jax.devices()[0]))

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens)
        return loss

    return run


def bench_update(graphdef, params, vocab, a, key) -> float:
    """Seconds per forward+backward+AdamW step on train_batch x seq_len tokens (donates
    `params`: run it last)."""
    return timed(update_call(graphdef, params, vocab, a, key), a.reps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="spec",
                   help="spec: the sizes of hf_reference.py; small: a CPU smoke test. "
                   "The size flags below override single entries.")
    for name in SHAPES["spec"]:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--group-size", type=int, default=1,
                   help="rollout samples per prompt (they share one prefill)")
    p.add_argument("--chunk", type=int, default=256, help="sequence chunk of the log-prob head")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for name, value in SHAPES[a.shapes].items():
        if getattr(a, name) is None:
            setattr(a, name, value)

    device = jax.devices()[0]
    dtype = a.dtype if a.dtype != "auto" else (
        "float32" if device.platform == "cpu" else "bfloat16")
    cfg = PRESETS[a.model].replace(param_dtype=dtype, dtype=dtype, remat=a.remat)
    graphdef, params = split(init_model(cfg, a.seed))
    n_params = cfg.num_params()
    peak = a.peak_tflops * 1e12
    k_roll, k_score, k_upd = jax.random.split(jax.random.key(a.seed), 3)

    res = {"model": a.model, "params": n_params,
           "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
           "gen_batch": a.gen_batch, "group_size": a.group_size}
    res["rollout_new_tok_s"] = sig(bench_rollout(graphdef, params, cfg.vocab_size, a, k_roll))
    dt = bench_score(graphdef, params, cfg.vocab_size, a, k_score)
    toks = a.score_batch * a.seq_len
    res["score_tok_s"] = sig(toks / dt)
    res["score_mfu_pct"] = sig(100 * 2 * n_params * toks / dt / peak)
    dt = bench_update(graphdef, params, cfg.vocab_size, a, k_upd)
    toks = a.train_batch * a.seq_len
    res["update_tok_s"] = sig(toks / dt)
    res["update_mfu_pct"] = sig(100 * 6 * n_params * toks / dt / peak)
    res["peak_mem_gib"] = sig(peak_mem_gib(), 3)
    assert all(k in res and math.isfinite(res[k]) for k in KEYS)
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
