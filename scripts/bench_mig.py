"""Cost of the step likelihoods l_0..l_K: the fast pass (the completion once, read by probe blocks)
against the naive one forward per prefix, and against a GRPO update step
(`migjax.update.make_update` with alpha = gamma = 0) on the same batch, for several step counts K.

    python scripts/bench_mig.py --model tiny --steps 4,8,16 --out bench_mig.json
    # the 0.5b shape on CPU (minutes; about 10 GB of memory for the update's AdamW state):
    python scripts/bench_mig.py --model qwen2.5-0.5b --steps 8 --batch 2 --group-size 2 \
        --prompt-len 32 --reps 1 --out bench_mig_05b.json

Synthetic batch with random weights and tokens: N = --batch completions of --completion-len C
tokens after a --prompt-len P prompt; the CoT fills the completion but its last 16 tokens, cut
into K steps of about (C - 16) / K tokens; a --probe-len probe and an --answer-len A answer.
Times exclude compilation (one warm-up call) and end on block_until_ready; the naive path calls
one jitted forward (compiled once, the same shape for every k) from its host loop. Prints one
JSON line per K: mig_fast_ms, mig_naive_ms, update_ms, mig_overhead_frac (fast / update),
mig_fast_vs_naive_speedup, and the largest |fast - naive| difference of l.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from migjax.models import PRESETS, init_model, merge, split
from migjax.models.scoring import token_logprobs
from migjax.rewards.mig import step_likelihoods_naive
from migjax.rewards.stage import MigRules, score_steps
from migjax.train_state import init_state, make_optimizer
from migjax.types import TrainBatch
from migjax.update import UpdateHParams, make_update

TAIL = 16  # completion tokens after the CoT (closing tag, answer, stop)


def timed_ms(fn, reps: int, name: str = ""):
    """(milliseconds per call, last output) of `fn` after one warm-up call (which compiles);
    progress on stderr."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    ms = 1e3 * (time.perf_counter() - t) / reps
    print(f"{name}: warm-up {t - t0:.1f} s, {ms:.1f} ms/call", file=sys.stderr, flush=True)
    return ms, out


def even_cuts(n: int, c: int, k: int) -> np.ndarray:
    """cuts_NxK1: cut_0 = 1 (the think-open token), then K steps of equal length up to C - TAIL."""
    body = max(c - TAIL, k + 1)
    cuts = 1 + np.round(np.arange(k + 1) * (body - 1) / k).astype(np.int32)
    return np.broadcast_to(cuts, (n, k + 1)).copy()


def step_ids(cuts_NxK1: np.ndarray, c: int) -> np.ndarray:
    """step_id_NxC: k on tokens cut_{k-1} .. cut_k - 1, 0 elsewhere."""
    col = np.arange(c)[None, :, None]
    inside = (col >= cuts_NxK1[:, None, :-1]) & (col < cuts_NxK1[:, None, 1:])
    return (inside * np.arange(1, cuts_NxK1.shape[1])).sum(-1).astype(np.int32)


def make_inputs(vocab: int, a, k: int, k_max: int, seed: int):
    """The likelihood pass's arguments and a TrainBatch of the same completions; the batch's step
    arrays are padded to `k_max` steps so that one compiled update serves every K."""
    rng = np.random.default_rng(seed)
    n, p, c, A = a.batch, a.prompt_len, a.completion_len, a.answer_len
    tok = lambda *shape: jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
    cuts = even_cuts(n, c, k)
    mig_args = (tok(n, p), jnp.ones((n, p), bool), tok(n, c), jnp.ones((n, c), bool),
                jnp.asarray(cuts), tok(a.probe_len), tok(n, 1, A), jnp.ones((n, 1, A), bool))
    sid = step_ids(cuts, c)
    batch = TrainBatch(
        prompt_NxP=mig_args[0], prompt_mask_NxP=mig_args[1], tokens_NxC=mig_args[2],
        mask_NxC=mig_args[3], cot_mask_NxC=jnp.asarray(np.arange(c)[None] < cuts[:, -1:]),
        step_id_NxC=jnp.asarray(sid), sampler_logp_NxC=jnp.zeros((n, c), jnp.float32),
        l_NxK1=jnp.asarray(rng.normal(-3.0, 1.0, (n, k_max + 1)), jnp.float32),
        step_mask_NxK=jnp.asarray(np.arange(k_max)[None].repeat(n, 0) < k),
        num_steps_N=jnp.full((n,), k, jnp.int32),
        r_correct_N=jnp.asarray(rng.integers(0, 2, n), jnp.float32),
        r_format_N=jnp.ones((n,), jnp.float32))
    return mig_args, batch


def bench_k(graphdef, state: list, fwd, update_fn, vocab: int, k: int, k_max: int, a) -> dict:
    """One JSON row for K = k. `state[0]` is the update's TrainState, whose parameters also
    serve the likelihood passes (one copy of the weights); `fwd(params, tokens, mask) -> logp` is
    the naive path's jitted forward and `update_fn` the jitted update. Both are shared by every
    K, so each compiles once."""
    mig_args, batch = make_inputs(vocab, a, k, k_max, a.seed + k)
    rules = MigRules(max_steps=k, chunk=a.chunk)
    fast = lambda: score_steps(graphdef, state[0].params, *mig_args, rules=rules)
    fast_ms, l_fast = timed_ms(fast, a.reps, f"K={k} fast")

    def naive():
        params = state[0].params
        return step_likelihoods_naive(merge(graphdef, params), *mig_args,
                                      forward=lambda t, m: fwd(params, t, m))

    naive_ms, l_naive = timed_ms(naive, a.reps, f"K={k} naive")
    diff = float(jnp.max(jnp.abs(l_fast - l_naive)))

    def step():  # the update donates its state: feed each call the state the last one returned
        state[0], metrics = update_fn(state[0], batch, None)
        return state[0], metrics

    update_ms, _ = timed_ms(step, a.reps, f"K={k} update")
    return {"K": k, "mig_fast_ms": round(fast_ms, 3), "mig_naive_ms": round(naive_ms, 3),
            "update_ms": round(update_ms, 3), "mig_overhead_frac": round(fast_ms / update_ms, 4),
            "mig_fast_vs_naive_speedup": round(naive_ms / fast_ms, 3),
            "fast_naive_max_abs_diff": diff}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", default="4,8,16", help="comma-separated K values")
    p.add_argument("--batch", type=int, default=8, help="N completions")
    p.add_argument("--group-size", type=int, default=4, help="G of the GRPO update (divides N)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--answer-len", type=int, default=4)
    p.add_argument("--probe-len", type=int, default=6)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.batch % a.group_size:
        p.error(f"--group-size {a.group_size} does not divide --batch {a.batch}")
    ks = [int(x) for x in a.steps.split(",") if x.strip()]
    if not ks or min(ks) < 1 or max(ks) > a.completion_len - TAIL - 1:
        p.error(f"--steps {a.steps!r}: each K must be in 1 .. completion_len - {TAIL + 1}")

    cfg = PRESETS[a.model].replace(param_dtype=a.dtype, dtype=a.dtype)
    graphdef, params = split(init_model(cfg, a.seed))
    shapes = dict(model=a.model, device=jax.devices()[0].device_kind, N=a.batch, P=a.prompt_len,
                  C=a.completion_len, A=a.answer_len, Q=a.probe_len)
    fwd = jax.jit(lambda p, t, m: token_logprobs(merge(graphdef, p), t, m, chunk_size=a.chunk)[0])
    optimizer = make_optimizer(lr=1e-6)
    # GRPO: no process stream, no SFT term.
    hp = UpdateHParams(group_size=a.group_size, alpha=0.0, gamma=0.0, score_chunk=a.chunk)
    update_fn = make_update(graphdef, optimizer, hp)
    # Committed to the device like the update's outputs, so the second call does not recompile.
    state = [jax.device_put(init_state(params, optimizer), jax.devices()[0])]
    del params  # the update donates these buffers
    rows = []
    for k in ks:
        row = {**bench_k(graphdef, state, fwd, update_fn, cfg.vocab_size, k, max(ks), a),
               **shapes}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
