"""Supervised warm start: cross-entropy on demonstration completions, with the same optimizer,
state and non-finite guard as RL (used by `mode="sft"` and the embedded default's first stage)."""

from __future__ import annotations

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from migjax.config_checks import DEMO_KINDS
from migjax.models import merge
from migjax.models.scoring import token_logprobs
from migjax.train_state import TrainState, apply_if_finite

SFT_METRICS = "sft_metrics.jsonl"  # WORKDIR/: the warm start's loss, one line per step


def encode_demos(tokenizer, prompts: list[str], completions: list[str], max_len: int, *,
                 return_kept: bool = False):
    """Right-padded [E, T] tokens, attention mask and loss mask (completion + eos tokens).
    Demonstrations longer than max_len are dropped; returns the arrays and the drop count (and
    with `return_kept` the index of each kept demonstration)."""
    eos = tokenizer.eos_token_id
    rows, kept = [], []
    for i, (p, comp) in enumerate(zip(prompts, completions, strict=True)):
        pt = tokenizer.encode(p, add_special_tokens=False)
        ct = tokenizer.encode(comp, add_special_tokens=False) + ([eos] if eos is not None else [])
        if len(pt) + len(ct) <= max_len:
            rows.append((pt, ct))
            kept.append(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(rows), max_len), pad, np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    loss_mask = np.zeros((len(rows), max_len), bool)
    for i, (pt, ct) in enumerate(rows):
        s = pt + ct
        tokens[i, :len(s)], mask[i, :len(s)] = s, True
        loss_mask[i, len(pt):len(s)] = True
    if return_kept:
        return (tokens, mask, loss_mask), len(prompts) - len(rows), np.asarray(kept, np.int64)
    return (tokens, mask, loss_mask), len(prompts) - len(rows)


def length_grouped_batches(lengths, batch_size: int, window: int, seed: int, max_width: int,
                           multiple: int = 16) -> list[tuple[np.ndarray, int]]:
    """(row indices, width) of each batch, in order, over the whole batches of `lengths`.

    `window` 0: rows in their given order, every batch `max_width` wide. Otherwise rows are taken
    a window of `window` batches at a time; within a window they are sorted by length, cut into
    batches and the batches shuffled (seeded), so each batch holds rows of similar length and is
    only as wide as its longest row rounded up to `multiple` (a few widths: a few compilations).
    """
    lengths = np.asarray(lengths)
    n = len(lengths) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"warm start: {len(lengths)} demonstrations do not fill one batch of "
                         f"warmstart.batch_size={batch_size}")
    if not window:
        return [(np.arange(i, i + batch_size), max_width) for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, 2])
    out, span = [], window * batch_size
    for lo in range(0, n, span):
        rows = lo + np.argsort(lengths[lo:min(lo + span, n)], kind="stable")
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        for j in rng.permutation(len(batches)):
            width = -(-int(lengths[batches[j]].max()) // multiple) * multiple
            out.append((batches[j], min(width, max_width)))
    return out


def make_sft_step(graphdef, optimizer, state_shardings=None):
    """The jitted `(state, tokens, mask, loss_mask) -> (state, metrics)`, donating the state."""
    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(functools.partial(sft_step, graphdef, optimizer), donate_argnums=(0,),
                   out_shardings=out)


def sft_step(graphdef, optimizer, state: TrainState, tokens_NxT, mask_NxT, loss_mask_NxT):
    """One cross-entropy step on demonstrations; returns (state, metrics)."""

    def loss_fn(params):
        lp, _ = token_logprobs(merge(graphdef, params), tokens_NxT, mask_NxT)
        return demo_nll(lp, loss_mask_NxT)

    return _sft_update(state, loss_fn, optimizer)


def demo_nll(logp_NxT, loss_mask_NxT):
    """Mean negative log-likelihood over the demonstrations' loss tokens."""
    m = loss_mask_NxT.astype(jnp.float32)
    return -(logp_NxT * m).sum() / jnp.maximum(m.sum(), 1.0)


def _sft_update(state: TrainState, loss_fn, optimizer):
    """One guarded optimizer step on `loss_fn(params)`; returns (state, metrics)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, ok = apply_if_finite(state, grads, loss, optimizer)
    return state, {"sft/loss": loss, "update/skipped": 1.0 - ok.astype(jnp.float32)}


def make_vl_sft_step(graphdefs, grid, optimizer, state_shardings=None):
    """The jitted `(state, tokens, mask, loss_mask, images) -> (state, metrics)` of a
    vision-language model: params {"lm", "visual"}, both trained; `images` is
    (pixels [N, S, F], image-token columns [N, M], M-RoPE positions [N, T, 3])."""
    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(functools.partial(vl_sft_step, graphdefs, grid, optimizer),
                   donate_argnums=(0,), out_shardings=out)


def vl_sft_step(graphdefs, grid, optimizer, state: TrainState, tokens_NxT, mask_NxT,
                loss_mask_NxT, images):
    """One cross-entropy step on image demonstrations; gradients reach the tower."""
    from migjax.models.multimodal import ImageFeatures, tower_features

    pixels, index, positions = images
    lm_graphdef, tower_graphdef = graphdefs

    def loss_fn(params):
        feats = tower_features(merge(tower_graphdef, params["visual"]), pixels, grid)
        img = ImageFeatures(feats, index, positions, jnp.zeros(tokens_NxT.shape[:1], jnp.int32))
        lp, _ = token_logprobs(merge(lm_graphdef, params["lm"]), tokens_NxT, mask_NxT,
                               images=img)
        return demo_nll(lp, loss_mask_NxT)

    return _sft_update(state, loss_fn, optimizer)


def demonstrations(items, distracted_prob: float, seed: int) -> list[str]:
    """The demonstration of each arith item: its solution, or with probability `distracted_prob`
    (a seeded draw per item) the careless teacher's `arith.distracted_solution`."""
    from migjax.data import arith

    careless = np.random.default_rng([seed, 1]).random(len(items)) < distracted_prob
    return [arith.distracted_solution(it) if bad else it.solution
            for it, bad in zip(items, careless, strict=True)]




def demo_texts(c, render) -> tuple[list[str], list[str]]:
    """(prompts, completions) of the warm start: `warmstart.steps * warmstart.batch_size`
    demonstrations, cycling through the task's training records. Arith: generated items (with
    the careless teacher's share); GSM8K and MATH: the training file's worked solutions rendered
    by `migjax.data.demos` with the run's step delimiter (records without one are skipped and
    counted; `task.exclude_path`, e.g. MATH500, is never trained on)."""
    from migjax import experiment as ex
    from migjax.data import arith, demos

    w = c.warmstart
    n = w.steps * w.batch_size
    if c.task.kind == "arith":
        task = arith.ArithTask(ex.arith_spec(c, "train"), c.task.arith.train_size)
        items = [task[i % len(task)] for i in range(n)]
        return [render(it.question) for it in items], demonstrations(items, w.distracted_prob,
                                                                      c.seed)
    if c.task.kind == "scenes":
        prompts, completions, _, _ = scene_demos(c, render)
        return prompts, completions
    if c.task.kind not in DEMO_KINDS:
        raise ValueError(f"task.kind={c.task.kind!r} has no demonstrations for the warm start; "
                         f"kinds with demonstrations: {DEMO_KINDS}")
    records = ex.raw_examples(c, None, limit=c.task.train_limit or None)
    pairs, bad = [], 0
    for e in records:
        try:
            pairs.append((e.question, demos.demonstration(
                c.task.kind, e.solution, c.mig.step_delimiter,
                answer=e.answers[0] if e.answers else None)))
        except ValueError:
            bad += 1
    if bad:
        logging.getLogger(__name__).warning("warm start: %d of %d records of %s have no usable "
                                            "worked solution; skipped", bad, len(records),
                                            c.task.train_path)
    if not pairs:
        raise ValueError(f"warm start: no record of {c.task.train_path} has a worked solution")
    order = np.random.default_rng([c.seed, 3]).permutation(len(pairs))
    picked = [pairs[order[i % len(pairs)]] for i in range(n)]
    return [render(q) for q, _ in picked], [d for _, d in picked]


def scene_demos(c, render):
    """(prompts with the image placeholder, solutions, image row of each demonstration, the
    uint8 training images) of the scene task: `warmstart.steps * warmstart.batch_size`
    demonstrations cycling through the training scenes in a seeded order; a seeded
    `warmstart.describe_frac` of them ask for the scene's description instead of its
    question (`scenes.describe_item`)."""
    from migjax import experiment as ex
    from migjax.data import scenes, visual

    n = c.warmstart.steps * c.warmstart.batch_size
    examples, images = ex.visual_examples(c, None, limit=None)
    mark = visual.placeholder(ex.image_token_count(c, ex.vision_config(c)))
    rng = np.random.default_rng([c.seed, 3])
    order = rng.permutation(len(examples))
    rows = np.asarray([order[i % len(examples)] for i in range(n)], np.int64)
    describe = rng.random(n) < c.warmstart.describe_frac
    spec, described = visual.scene_spec(c, "train"), {}
    questions, solutions = [], []
    for r, d in zip(rows.tolist(), describe, strict=True):
        if d:
            if r not in described:
                described[r] = scenes.describe_item(spec, r)
            questions.append(described[r].question)
            solutions.append(described[r].solution)
        else:
            questions.append(examples[r].question)
            solutions.append(examples[r].solution)
    return [render(mark + q) for q in questions], solutions, rows, images


def _vl_model(c, init, tokenizer, mesh, workdir):
    """(VLConfig, (lm graphdef, tower graphdef), {"lm", "visual"} params) to warm-start: the
    Qwen2.5-VL directory model.path, or the scratch shape with random weights."""
    from flax import nnx

    from migjax import experiment as ex
    from migjax.models import split
    from migjax.models.qwen25vl import Qwen25VL
    from migjax.models.sharding import DEFAULT_RULES, param_shardings

    path = ex.packaged_model(init.model.path, workdir)
    if path:
        from migjax.models.qwen25vl import load
        model, vlcfg = load(path, dtype=c.model.dtype, mesh=mesh)
    else:
        vlcfg = ex.scratch_vl_config(c, tokenizer)
        model = Qwen25VL(vlcfg, rngs=nnx.Rngs(c.seed))
    lm_gd, lm_params = split(model.lm)
    tower_gd, tower_params = split(model.visual)
    if not path:
        shard = param_shardings({k: v.shape for k, v in lm_params.items()}, mesh, DEFAULT_RULES)
        lm_params = {k: jax.device_put(v, shard[k]) for k, v in lm_params.items()}
    return vlcfg, (lm_gd, tower_gd), {"lm": lm_params, "visual": tower_params}


def run_warmstart(c, workdir: str, tokenizer, mesh) -> str:
    """The supervised warm start (cold start): `warmstart.steps` steps of cross-entropy on the
    completion tokens of demonstrations, from `model.path` (any Hugging Face directory) or, when
    it is empty, from random weights in the `model.scratch` shape. Checkpoints every
    `warmstart.checkpoint_every` steps in `workdir/sft_checkpoints` and resumes from them; stops
    after `optim.max_consecutive_skips` non-finite steps in a row. Saves the result as the
    Hugging Face directory `workdir/sft_model`, which later runs reuse; a folder there without
    its config.json (an interrupted save) is replaced."""
    import os

    from tqdm import tqdm

    from migjax import experiment as ex
    from migjax.checkpointing import Checkpointer
    from migjax.metrics import MetricsWriter
    from migjax.models.loading import save_params
    from migjax.models.sharding import batch_sharding, gather
    from migjax.train_state import init_state, place_state

    out = os.path.join(workdir, "sft_model")
    if is_complete(out):
        return out
    if os.path.exists(out) and jax.process_index() == 0:
        logging.getLogger(__name__).warning(
            "warm start: %s is incomplete (no config.json, weights or tokenizer: an interrupted "
            "save); training it again and replacing it", out)
    from migjax.data.visual import is_visual

    w = c.warmstart
    init = c if (c.model.path or c.model.preset) else _scratch_only(c)
    vl = is_visual(c.task.kind)
    if vl:
        mcfg, graphdef, params = _vl_model(c, init, tokenizer, mesh, workdir)
        prompts, completions, image_rows, images = scene_demos(c, ex.renderer(c, tokenizer))
    else:
        graphdef, params, mcfg = ex.build_model(init, tokenizer, mesh, workdir=workdir)
        prompts, completions = demo_texts(c, ex.renderer(c, tokenizer))
    prefix = c.task.completion_prefix  # the rendered prompt already ends with it
    completions = [d[len(prefix):] if prefix and d.startswith(prefix) else d
                   for d in completions]
    (tokens, mask, loss_mask), dropped, kept = encode_demos(tokenizer, prompts, completions,
                                                            w.max_len, return_kept=True)
    if dropped:
        logging.getLogger(__name__).warning("warm start: dropped %d demonstrations longer than "
                                            "warmstart.max_len=%d", dropped, w.max_len)
    batches = length_grouped_batches(mask.sum(axis=1), w.batch_size, w.group_by_length, c.seed,
                                     w.max_len)
    sched = optax.warmup_cosine_decay_schedule(0.0, w.lr, max(1, w.steps // 20), max(2, w.steps))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state, shardings = place_state(init_state(params, optimizer), mesh)
    ckpt = Checkpointer(os.path.join(workdir, "sft_checkpoints"), keep=2,
                        async_save=c.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    if start:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        state, _ = ckpt.restore(start, abstract)
        tqdm.write(f"warm start: resumed from step {start} in {ckpt.directory}")
    put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.ndim))
    if vl:
        grid = ex.image_grid(c, mcfg.vision)
        step_fn = make_vl_sft_step(graphdef, grid, optimizer, shardings)
        image_rows = image_rows[kept]
        extra = lambda idx, width: (_demo_images(images[image_rows[idx]], tokens[idx, :width],
                                                 mask[idx, :width], mcfg, grid, put),)
    else:
        step_fn = make_sft_step(graphdef, optimizer, shardings)
        extra = lambda idx, width: ()
    log = MetricsWriter(workdir, tensorboard=False, filename=SFT_METRICS) \
        if jax.process_index() == 0 else None
    if log is not None:
        log.resume(start if start else -1)  # what the interrupted run logged past `start`
    bar = tqdm(range(start, w.steps), initial=start, total=w.steps, desc="sft warm start",
               disable=not c.log.progress or jax.process_index() != 0, dynamic_ncols=True)
    skips = 0
    for s in bar:
        idx, width = batches[s % len(batches)]
        state, m = step_fn(state, put(tokens[idx, :width]), put(mask[idx, :width]),
                           put(loss_mask[idx, :width]), *extra(idx, width))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if log is not None:
            log.write(s + 1, m)
        skips = skips + 1 if m["update/skipped"] else 0
        if skips >= c.optim.max_consecutive_skips:
            ckpt.close()
            if log is not None:
                log.close()
            raise FloatingPointError(
                f"warm start step {s + 1}: {skips} consecutive non-finite updates "
                f"(optim.max_consecutive_skips={c.optim.max_consecutive_skips}); last good "
                f"checkpoint: {ckpt.latest_step()} in {ckpt.directory}")
        if s % 20 == 0 or s == w.steps - 1:
            bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
        if w.checkpoint_every and (s + 1) % w.checkpoint_every == 0 and s + 1 < w.steps:
            ckpt.save(s + 1, state, {"step": s + 1})
    ckpt.close()
    if log is not None:
        log.close()
    host_params = jax.tree.map(gather, state.params)  # a collective when sharded across hosts
    if jax.process_index() == 0:
        for stale in (out + ".tmp", out):  # an interrupted save, a partial folder
            shutil.rmtree(stale, ignore_errors=True)
        if vl:
            from migjax.models.qwen25vl import Qwen25VL, save
            save(Qwen25VL(mcfg, lm=merge(graphdef[0], host_params["lm"]),
                          visual=merge(graphdef[1], host_params["visual"])), out + ".tmp",
                 tokenizer=tokenizer)
        else:
            save_params(host_params, mcfg, out + ".tmp", tokenizer=tokenizer)
        os.replace(out + ".tmp", out)
    ex._barrier("sft_model")  # the other processes load what process 0 wrote
    return out


def _demo_images(images_NxHxWxC, tokens_NxT, mask_NxT, vlcfg, grid, put):
    """(pixels, image-token columns, M-RoPE positions) of a batch of image demonstrations."""
    from migjax.models.multimodal import image_layout, patchify

    lay = image_layout(tokens_NxT, mask_NxT, image_token_id=vlcfg.image_token_id, grid_thw=grid,
                       images_per_prompt=1, spatial_merge_size=vlcfg.vision.spatial_merge_size)
    return (put(patchify(images_NxHxWxC, vlcfg.vision)), put(lay.index_ExM),
            put(lay.positions_ExPx3))


def is_complete(model_dir: str) -> bool:
    """Whether a saved warm start holds everything a run loads: config, weights, tokenizer."""
    import os

    from migjax.preflight import check_model_dir

    try:
        check_model_dir(model_dir, "sft_model")
    except (OSError, ValueError):
        return False
    return os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))


def _scratch_only(c):
    c = c.copy_and_resolve_references()
    c.model.path = ""
    c.model.preset = ""
    return c
