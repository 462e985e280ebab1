"""The composition root: rollout -> rewards (MIG + outcome) -> jitted update, with evaluation,
checkpoints, resume and metrics. The only module with side effects."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from migjax import experiment as ex
from migjax import workdir as wd
from migjax.checkpointing import Checkpointer, atomic_write_json
from migjax.data.pipeline import make_iterator
from migjax.data.tokenizer import token_strings
from migjax.data.visual import is_visual
from migjax.evaluation import evaluate
from migjax.metrics import MetricsWriter, format_sample_table, is_rate
from migjax.models.loading import save_params
from migjax.models.sharding import batch_sharding, gather
from migjax.rewards.custom import CustomRewards
from migjax.rewards.segment import step_spans_text
from migjax.rewards.stage import MigRules, RewardStage
from migjax.rewards.verify import Verifier
from migjax.rollout import SamplingRules, sample
from migjax.train_state import TrainState, init_state, make_optimizer, place_state
from migjax.update import UpdateHParams, credit, make_update, step_watermark
from migjax.viz import completions_html, write_html
from migjax.warmstart import run_warmstart

# Named random streams. Rollouts: fold_in(fold_in(key(seed), ROLLOUT), step). Evaluations all use
# fold_in(key(seed), EVAL): the same sampling noise before, during and after RL, so a change in
# pass@k or mean@k comes from the parameters.
ROLLOUT, EVAL = 1, 2


class NonFiniteError(RuntimeError):
    pass


class NullWriter:
    """Stands in for the metrics writer on processes other than 0."""

    def write(self, step, metrics, *, final=False):
        pass

    def resume(self, step):
        pass

    def close(self):
        pass


def say(msg: str) -> None:
    """Progress output on the console (process 0 only), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(msg)


def to_global(x, mesh):
    """Places a host array that every process holds in full onto the mesh, batch-sharded."""
    x = np.asarray(x)
    sh = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def concat_processes(x) -> np.ndarray:
    """Every process's own host array `x`, concatenated in process order (on every process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def sampling_rules(c, tokenizer) -> SamplingRules:
    eos = tokenizer.eos_token_id
    return SamplingRules(
        max_new_tokens=c.sampler.max_new_tokens, temperature=c.sampler.temperature,
        top_k=c.sampler.top_k, top_p=c.sampler.top_p,
        stop_ids=() if eos is None else (int(eos),),
        stop_seqs=ex.stop_sequences(tokenizer, c.sampler.stop_strings),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0))


def eval_rules(c, tokenizer) -> SamplingRules:
    """The sampling rules of held-out evaluation: the sampler's, with `eval.max_new_tokens`."""
    rules = sampling_rules(c, tokenizer)
    return dataclasses.replace(rules, max_new_tokens=c.eval.max_new_tokens or rules.max_new_tokens)


def uses_warmstart(c) -> bool:
    """Whether the run trains (or reuses) the supervised warm start `WORKDIR/sft_model`: the
    supervised mode, and RL with `warmstart.steps > 0` and `model.init_from_sft` (a cold start of
    `model.path`, or of the scratch shape when it is empty)."""
    return c.mode == "sft" or (c.mode == "rl" and c.model.init_from_sft and c.warmstart.steps > 0)


def restore_state(ckpt: Checkpointer, step: int | None, state: TrainState):
    """(state, extra) of checkpoint `step` (None: the latest), restored onto the shapes, dtypes
    and shardings of `state`."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    return ckpt.restore(step, abstract)


def export_params(params, mcfg, workdir: str, tokenizer, out: str | None = None,
                  vision=None, graphdef=None) -> str:
    """Writes `params` as a Hugging Face directory (default WORKDIR/export); with `vision` (the
    frozen `ImageEncoder` of an image task) a Qwen2.5-VL directory. Every process takes part in
    gathering parameters sharded across hosts; process 0 writes."""
    out = out or os.path.join(workdir, "export")
    host_params = jax.tree.map(gather, params)
    if jax.process_index() == 0:
        if vision is None:
            save_params(host_params, mcfg, out, tokenizer=tokenizer)
        else:
            from migjax.models import merge
            from migjax.models.qwen25vl import Qwen25VL, save
            save(Qwen25VL(vision.vl_config(mcfg), lm=merge(graphdef, host_params),
                          visual=vision.tower()), out, tokenizer=tokenizer)
    return out


def image_features(vision, data, mesh):
    """`idx -> ImageFeatures` of rows of `data` (None for a text task)."""
    if vision is None:
        return None
    return lambda idx: vision.features(*data.images.take(np.asarray(idx)),
                                       put=lambda x: to_global(x, mesh))


def rl_optimizer(c):
    """The RL optimizer of a config (`optim.*`)."""
    return make_optimizer(lr=c.optim.lr, warmup_steps=c.optim.warmup_steps,
                          weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2,
                          grad_clip=c.optim.grad_clip)


def reward_stage(c, tokenizer, mcfg, verifier, custom=None) -> RewardStage:
    """The host-side reward stage (verification, segmentation, step likelihoods, the user's
    reward functions `custom`) of a config."""
    return RewardStage(tokenizer, token_strings(tokenizer, size=mcfg.vocab_size),
                       probe=c.mig.probe, verifier=verifier, custom=custom,
                       completion_prefix=c.task.completion_prefix,
                       rules=MigRules(max_steps=c.mig.max_steps, delimiter=c.mig.step_delimiter,
                                      variant_reduce=c.mig.variant_reduce,
                                      count_closing_tokens=c.mig.count_closing_tokens,
                                      chunk=c.rl.score_chunk, fast=c.mig.fast))


def run_evals(graphdef, params, evals, tokenizer, verifier, c, mesh, vision=None):
    """({"eval/<set>/<metric>": value}, {set: the greedy completions of its first batch})."""
    out, rows = {}, {}
    key = jax.random.fold_in(jax.random.key(c.seed), EVAL)
    bs = c.eval.batch_size
    rules = eval_rules(c, tokenizer)
    for name, data in evals.items():
        res, rows_ = evaluate(graphdef, params, data, tokenizer, verifier, rules=rules,
                              batch_size=bs, k=c.eval.pass_k, key=key,
                              put=lambda x: to_global(x, mesh), fetch=gather,
                              images=image_features(vision, data, mesh))
        for k_, v in res.items():
            out[f"eval/{name}/{k_}"] = v
        rows[name] = rows_
    return out, rows


def train(c, workdir: str) -> dict:
    """Runs the config in `workdir` (resuming from its last checkpoint) and returns a summary.
    Process 0 holds the workdir's lock while it runs; a workdir holding another config (beyond
    `workdir.RESUMABLE`) is refused."""
    os.makedirs(workdir, exist_ok=True)
    held = wd.lock(workdir) if jax.process_index() == 0 else None
    try:
        wd.check_resume(workdir, wd.config_record(c))
        if held is not None:
            wd.write_config(workdir, c)
        return _train(c, workdir)
    finally:
        if held is not None:
            held.close()


def _train(c, workdir: str) -> dict:
    t_start = time.time()
    mesh = ex.build_mesh(c)
    tokenizer = ex.build_tokenizer(c, workdir)
    verifier = Verifier(timeout_s=c.reward.verify_timeout_s)
    rules = sampling_rules(c, tokenizer)
    if c.mode != "sft":  # before the warm start: an empty data set fails here, not after it
        train_data, evals, data_stats = ex.build_data(c, tokenizer)
    model_path = None
    if uses_warmstart(c):
        model_path = run_warmstart(c, workdir, tokenizer, mesh)
    if c.mode == "sft":  # the supervised stage alone: its model directory is the output
        verifier.close()
        say(f"supervised model written to {model_path}")
        return {"before": {}, "after": {}, "steps": c.warmstart.steps, "workdir": workdir,
                "wall_s": time.time() - t_start, "export": model_path}
    graphdef, params, mcfg = ex.build_model(c, tokenizer, mesh, model_path, workdir)
    vision = None
    if is_visual(c.task.kind):  # the frozen tower of the warm-started (or given) model
        if not (model_path or c.model.path):
            raise ValueError(f"task.kind={c.task.kind!r}: RL on images needs a Qwen2.5-VL model "
                             "(model.path) or a warm start (warmstart.steps > 0)")
        vision = ex.build_vision(c, ex.packaged_model(model_path or c.model.path, workdir),
                                 tokenizer)
    say(f"data: {len(train_data)} training prompts; eval sets "
        f"{ {k: len(v) for k, v in evals.items()} }; {data_stats}")
    if c.mode == "eval":
        return _evaluate_only(c, workdir, graphdef, params, evals, tokenizer, verifier, mesh,
                              vision, t_start)

    optimizer = rl_optimizer(c)
    state, shardings = place_state(init_state(params, optimizer), mesh)
    needs_ref = c.loss.kl_coef > 0 or c.mig.scorer == "reference"
    ref_params = jax.tree.map(jnp.copy, params) if needs_ref else None
    hp = UpdateHParams.from_config(c)
    update_fn = make_update(graphdef, optimizer, hp, shardings)
    custom = CustomRewards.from_config(c)
    stage = reward_stage(c, tokenizer, mcfg, verifier, custom)
    nproc, pid = jax.process_count(), jax.process_index()
    it = make_iterator(train_data, batch_size=c.rl.batch_prompts // nproc, seed=c.seed,
                       shard_index=pid, shard_count=nproc)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                        async_save=c.checkpoint.async_save)
    wandb = (dict(project=c.log.wandb_project, config=wd.config_record(c)) if c.log.wandb
             else None)
    writer = (MetricsWriter(workdir, tensorboard=c.log.tensorboard, wandb=wandb) if pid == 0
              else NullWriter())
    start = ckpt.latest_step() or 0
    summary_path = os.path.join(workdir, "summary.json")
    if start >= c.rl.steps and os.path.isfile(summary_path):
        # Finished already: evaluating again would only log the final evaluation twice.
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        if c.checkpoint.export_hf and "export" not in summary:
            state, _ = restore_state(ckpt, start, state)
            summary["export"] = export_params(state.params, mcfg, workdir, tokenizer,
                                              vision=vision, graphdef=graphdef)
            if pid == 0:
                atomic_write_json(summary_path, summary)
            say(f"{workdir} holds a finished run of {summary['steps']} steps; checkpoint "
                f"{start} exported to {summary['export']}")
        else:
            say(f"{workdir} holds a finished run of {summary['steps']} steps; nothing to do")
        for done_with in (writer, ckpt, verifier, it, custom):
            if done_with is not None:
                done_with.close()
        return summary
    if start > c.rl.steps:
        raise ValueError(f"{ckpt.directory} holds checkpoint {start}, past rl.steps="
                         f"{c.rl.steps}; raise rl.steps or use another --workdir")
    if start:
        start, state, extra = ckpt.restore_latest(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         state), warn=say)
        it.set_state(extra["data"])
        before = extra["before"]
        say(f"resumed from checkpoint {start} in {ckpt.directory}")
    # Drop what was logged after the checkpoint resumed from, and the final evaluation of a
    # run now extended; without a checkpoint, the evaluation before RL is logged again.
    writer.resume(start if start else -1)
    if not start:
        before, _ = run_evals(graphdef, state.params, evals, tokenizer, verifier, c,
                              mesh, vision)
        writer.write(0, {**before, "time/elapsed_s": time.time() - t_start})  # curves start here
        say("before RL: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(before.items())))

    bar = tqdm(range(start, c.rl.steps), initial=start, total=c.rl.steps, desc="rl",
               disable=not c.log.progress or pid != 0, dynamic_ncols=True)
    for step in bar:
        state, metrics = rl_step(c, step, graphdef, update_fn, state, ref_params, it,
                                 train_data, stage, rules, mesh, workdir, vision)
        if int(state.skips) >= c.optim.max_consecutive_skips:
            ckpt.wait()
            raise NonFiniteError(
                f"step {step + 1}: {int(state.skips)} consecutive updates had a non-finite loss "
                f"or gradient (optim.max_consecutive_skips={c.optim.max_consecutive_skips}); "
                f"last good checkpoint: {ckpt.latest_step()} in {ckpt.directory}")
        done = step + 1
        if c.eval.every and done % c.eval.every == 0 and done < c.rl.steps:
            ev, _ = run_evals(graphdef, state.params, evals, tokenizer, verifier, c,
                              mesh, vision)
            metrics.update(ev)
        if done % c.log.every == 0 or done == c.rl.steps:
            metrics["time/elapsed_s"] = time.time() - t_start
            writer.write(done, metrics)
        bar.set_postfix(reward=f"{metrics['reward/correct']:.2f}",
                        gain=f"{metrics['mig/gain_sum']:.3f}")
        if done % c.checkpoint.every == 0 or done == c.rl.steps:
            ckpt.save(done, state, {"data": it.get_state(), "before": before, "step": done})
    ckpt.wait()
    after, rows = run_evals(graphdef, state.params, evals, tokenizer, verifier, c, mesh,
                            vision)
    writer.write(c.rl.steps, {**after, "time/elapsed_s": time.time() - t_start}, final=True)
    writer.close()
    ckpt.close()
    verifier.close()
    if custom is not None:
        custom.close()
    summary = {"before": before, "after": after, "steps": c.rl.steps, "workdir": workdir,
               "wall_s": time.time() - t_start}
    if c.checkpoint.export_hf:
        summary["export"] = export_params(state.params, mcfg, workdir, tokenizer,
                                          vision=vision, graphdef=graphdef)
    if pid == 0:
        write_eval_html(workdir, rows, f"Evaluation samples after {c.rl.steps} RL steps (greedy)")
        atomic_write_json(summary_path, summary)
    return summary


def write_eval_html(workdir: str, rows: dict, title: str) -> None:
    """WORKDIR/eval_samples.html: the first 16 greedy completions of each evaluation set."""
    write_html(os.path.join(workdir, "eval_samples.html"), completions_html(
        [dict(r, reward=float(r["correct"]), section=f"evaluation set {name}")
         for name, rs in rows.items() for r in rs[:16]], title=title))


def _evaluate_only(c, workdir, graphdef, params, evals, tokenizer, verifier, mesh, vision,
                   t_start) -> dict:
    """`mode="eval"`: the evaluation sets on `model.path` (or the preset) as RL would measure
    them before its first step; summary.json holds them under "after", with "steps" 0."""
    res, rows = run_evals(graphdef, params, evals, tokenizer, verifier, c, mesh, vision)
    verifier.close()
    summary = {"before": {}, "after": res, "steps": 0, "workdir": workdir,
               "wall_s": time.time() - t_start}
    if jax.process_index() == 0:
        writer = MetricsWriter(workdir, tensorboard=c.log.tensorboard)
        writer.write(0, {**res, "time/elapsed_s": summary["wall_s"]}, final=True)
        writer.close()
        write_eval_html(workdir, rows, "Evaluation samples (greedy)")
        atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def rl_step(c, step, graphdef, update_fn, state: TrainState, ref_params, it, data, stage,
            rules, mesh, workdir, vision=None):
    """One rollout batch: sample, reward, update. Returns (state, metrics as floats)."""
    prompts = next(it)
    g = c.rl.group_size
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), ROLLOUT), step)
    ids = concat_processes(prompts.example_id_B)
    toks = to_global(np.asarray(data.tokens_ExP[ids]), mesh)
    pmask = to_global(np.asarray(data.mask_ExP[ids]), mesh)
    t0 = time.perf_counter()
    images = image_features(vision, data, mesh)
    # MIG's likelihood pass reads the sampler's KV cache when the policy scores (text prompts)
    reuse = c.mig.fast and c.mig.scorer == "policy" and images is None
    rollout = sample(graphdef, state.params, toks, pmask, key, rules=rules, group_size=g,
                     images=None if images is None else images(ids), return_cache=reuse)
    rollout, cache = rollout if reuse else (rollout, None)
    rollout = jax.tree.map(gather, rollout)
    t1 = time.perf_counter()
    refs = [data.answers[i] for i in ids]
    scorer = ref_params if c.mig.scorer == "reference" else state.params
    batch, info = stage(graphdef, scorer, rollout, data.answer_ExVxA[ids],
                        data.answer_mask_ExVxA[ids], refs, g, cache=cache)
    del cache  # freed before the update
    batch = jax.tree.map(lambda x: to_global(gather(x), mesh), batch)
    jax.block_until_ready(batch.l_NxK1)
    t2 = time.perf_counter()
    state, metrics = update_fn(state, batch, ref_params if c.loss.kl_coef > 0 else None)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t3 = time.perf_counter()
    n_new = float(np.asarray(rollout.mask_NxC).sum())
    n_tok = float(np.prod(batch.tokens_NxC.shape) + np.prod(batch.prompt_NxP.shape))
    metrics.update({
        "perf/rollout_tok_s": n_new / max(t1 - t0, 1e-9),
        "perf/score_tok_s": n_tok / max(t2 - t1, 1e-9),
        "perf/update_tok_s": n_tok * c.rl.epochs / max(t3 - t2, 1e-9),
        # seconds of each stage: sampling, the reward stage (verification, segmentation, the
        # step-likelihood pass), the update
        "perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1, "perf/update_s": t3 - t2,
        "rollout/truncated_frac": float(np.mean(np.asarray(rollout.truncated_N))),
        "rollout/len": n_new / len(info["texts"]),
    })
    if stage.custom is not None:
        metrics["reward/custom_failed"] = float(stage.custom.n_failed)  # items so far
    if c.log.samples_every and (step + 1) % c.log.samples_every == 0 and jax.process_index() == 0:
        log_samples(c, workdir, step + 1, info, batch, [data.questions[i] for i in ids],
                    [data.image_of(i) for i in ids])
    return state, metrics


def log_samples(c, workdir, step, info, batch, questions, images=None):
    """A text table on the console and an HTML view of the first 16 completions: question,
    reference, extracted prediction, group, advantages (each stream's mean over its tokens, as
    the update computed them) and the steps with l_k, h_k and g_k under the run's watermark."""
    hp = UpdateHParams.from_config(c)
    _, wm = step_watermark(batch.l_NxK1, batch.step_mask_NxK, hp)
    streams, _, _ = credit(batch, hp)
    g, l_, h = (np.asarray(x) for x in (wm.g_NxK, wm.l_NxK1, wm.h_NxK1))
    adv = {name: _token_mean(np.asarray(a), np.asarray(m)) for name, a, m in (
        ("outcome", streams.adv_outcome_NxC, streams.mask_outcome_NxC),
        ("process", streams.adv_process_NxC, streams.mask_process_NxC))}
    rc = np.asarray(batch.r_correct_N)
    rows, html_rows = [], []
    for i, text in enumerate(info["texts"][:16]):
        rows.append({"completion": text, "pred": info["preds"][i], "ref": info["refs"][i][0],
                     "correct": rc[i], "gain": float(g[i].sum())})
        k = int(info["seg"].num_steps_N[i])
        spans = (step_spans_text(text, max_steps=k, delimiter=c.mig.step_delimiter)
                 if k else [])
        html_rows.append(dict(
            **(images[i // c.rl.group_size] if images else {}),
            prompt=questions[i // c.rl.group_size], completion=text, reward=float(rc[i]),
            correct=bool(rc[i] > 0.5), reference=info["refs"][i][0],
            prediction=info["preds"][i], group=i // c.rl.group_size,
            advantages={name: float(a[i]) for name, a in adv.items()},
            steps=[(text[a:b], float(g[i, j]), float(l_[i, j + 1]), float(h[i, j + 1]))
                   for j, (a, b) in enumerate(spans[:k])]))
    tqdm.write(f"step {step} samples\n" + format_sample_table(
        rows, ["completion", "pred", "ref", "correct", "gain"]))
    write_html(os.path.join(workdir, "samples", f"step_{step:06d}.html"),
               completions_html(html_rows, title=f"Samples at step {step}"))


def _token_mean(x_NxC, mask_NxC) -> np.ndarray:
    """Per-row mean of `x` over the masked tokens (0 where none is)."""
    m = mask_NxC.astype(np.float32)
    return (x_NxC * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def report(summary: dict) -> str:
    """The closing lines of a run: pass@k and mean@k before and after RL per evaluation set,
    each +- its binomial standard error, with the number of problems; and the outputs."""
    nan = float("nan")

    def cell(when, key):
        got = summary[when]
        if key not in got:
            return "-"
        return f"{got[key]:.3f} +- {got.get(key + '_se', nan):.3f}"

    lines = ["", f"{'evaluation':<22}{'before':<17}{'after':<17}n"]
    for key in sorted(k for k in summary["after"] if is_rate(k)):
        n = summary["after"].get(key.rsplit("/", 1)[0] + "/n", nan)
        lines.append(f"{key:<22}{cell('before', key):<17}{cell('after', key):<17}{n:.0f}")
    lines.append("(+- one binomial standard error, sqrt(p (1 - p) / n), over n problems)")
    w = summary["workdir"]
    lines += [f"wall time: {summary['wall_s'] / 60:.1f} min", "outputs:",
              f"  metrics      {os.path.join(w, 'metrics.jsonl')}",
              f"  checkpoints  {os.path.join(w, 'checkpoints')}",
              f"  samples      {os.path.join(w, 'samples')}",
              f"  summary      {os.path.join(w, 'summary.json')}",
              f"  curves       python -m migjax.plot {w}"]
    if "export" in summary:
        lines.append(f"  export       {summary['export']}")
    return "\n".join(lines)
