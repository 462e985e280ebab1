"""The jitted policy update: watermark -> advantages -> decoupled streams -> clipped surrogates +
dual-gated SFT (+ KL), scanned over epochs and minibatches, with a non-finite guard."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from migjax import advantages as adv_lib
from migjax import losses
from migjax.models import merge
from migjax.models.scoring import token_logprobs
from migjax.rewards import watermark as wm_lib
from migjax.train_state import TrainState, apply_if_finite
from migjax.types import TrainBatch

NAN_EVERY_UPDATE = -2  # debug.nan_at_step value that puts a NaN into the loss of every update


@dataclasses.dataclass(frozen=True)
class UpdateHParams:
    """Everything the update reads from the config (hashable: a static jit argument)."""

    group_size: int = 8
    minibatches: int = 1
    epochs: int = 1
    seed: int = 0
    score_chunk: int = 256
    temperature: float = 1.0
    w_format: float = 0.1
    # MIG
    h0: str = "l0"
    watermark: bool = True
    mig_reward: str = "gain"
    likelihood_space: str = "log"
    advantage_mode: str = "trajectory"
    reward_to_go: bool = False
    decoupled: bool = True
    # advantages
    estimator: str = "grpo"
    std_normalize: bool = True
    unbiased_std: bool = False
    # loss (METHOD.md's names; the config keys are loss.w_process, loss.w_outcome, loss.w_sft)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.1
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    sft_gates: tuple[str, ...] = ("format", "correct")
    nan_at_step: int = -1
    mask_truncated: bool = False

    @classmethod
    def from_config(cls, c) -> UpdateHParams:
        return cls(
            group_size=c.rl.group_size, minibatches=c.rl.minibatches, epochs=c.rl.epochs,
            seed=c.seed, score_chunk=c.rl.score_chunk, temperature=c.sampler.temperature,
            w_format=c.reward.w_format, h0=c.mig.h0, watermark=c.mig.watermark,
            mig_reward=c.mig.reward, likelihood_space=c.mig.likelihood_space,
            advantage_mode=c.mig.advantage_mode, reward_to_go=c.mig.reward_to_go,
            decoupled=c.mig.decoupled, estimator=c.adv.estimator,
            std_normalize=c.adv.std_normalize, unbiased_std=c.adv.unbiased_std,
            alpha=c.loss.w_process, beta=c.loss.w_outcome, gamma=c.loss.w_sft,
            eps_low=c.loss.eps_low, eps_high=c.loss.eps_high, aggregation=c.loss.aggregation,
            kl_coef=c.loss.kl_coef, kl_estimator=c.loss.kl_estimator, sft_gates=tuple(c.sft.gates),
            nan_at_step=c.debug.nan_at_step, mask_truncated=c.rl.mask_truncated)


def step_watermark(l_NxK1, step_mask_NxK, hp: UpdateHParams) -> tuple[jax.Array, wm_lib.Watermark]:
    """(l in the configured likelihood space, the watermark record) of a batch's likelihoods."""
    l = l_NxK1 if hp.likelihood_space == "log" else jnp.exp(l_NxK1)
    return l, wm_lib.watermark(l, step_mask_NxK, h0=hp.h0, monotonic=hp.watermark)


def credit(batch: TrainBatch, hp: UpdateHParams):
    """Watermark, rewards, advantage streams and SFT gate of a rollout batch (pure)."""
    l, wm = step_watermark(batch.l_NxK1, batch.step_mask_NxK, hp)
    gains_N = wm_lib.gain_sum(wm)
    r_out_N = batch.r_correct_N + hp.w_format * batch.r_format_N
    if batch.r_custom_N is not None:
        r_out_N = r_out_N + batch.r_custom_N
    norm = dict(estimator=hp.estimator, std_normalize=hp.std_normalize,
                unbiased_std=hp.unbiased_std)
    adv_out_N = adv_lib.group_advantages(r_out_N, hp.group_size, **norm)
    if hp.mig_reward == "end_of_cot":
        # l_K only (VeriFree/RLPR-style), one value per trajectory. A completion without a CoT
        # has no l_K: it is left out of its group's statistics and gets 0, so it can neither
        # outrank the completions with a CoT nor pull their advantages down.
        has_cot_N = batch.num_steps_N > 0
        proc_seq_N = adv_lib.group_advantages(wm_lib.end_of_cot(l, batch.num_steps_N),
                                              hp.group_size, valid_N=has_cot_N, **norm)
        adv_proc_NxC = jnp.where(batch.cot_mask_NxC, proc_seq_N[:, None], 0.0)
    else:
        adv_proc_NxC = adv_lib.token_process_advantages(
            hp.advantage_mode, wm.g_NxK, wm.step_mask_NxK, batch.step_id_NxC, batch.cot_mask_NxC,
            hp.group_size, reward_to_go=hp.reward_to_go, **norm)
        proc_seq_N = adv_lib.sequence_process_advantages(
            hp.advantage_mode, wm.g_NxK, wm.step_mask_NxK, hp.group_size, **norm)
    streams = adv_lib.combine_streams(
        adv_proc_NxC, adv_out_N, batch.cot_mask_NxC, batch.mask_NxC, decoupled=hp.decoupled,
        proc_seq_N=proc_seq_N if hp.advantage_mode == "trajectory" else None,
        alpha=hp.alpha, beta=hp.beta)
    sft_pass_N = losses.sft_gate(batch.r_correct_N, batch.r_format_N, gains_N, hp.sft_gates)
    if hp.mask_truncated:
        streams, sft_pass_N = drop_truncated(streams, sft_pass_N, batch.truncated_N)
    stats = {
        "reward/correct": jnp.mean(batch.r_correct_N),
        "reward/format": jnp.mean(batch.r_format_N),
        "reward/outcome": jnp.mean(r_out_N),
        **({} if batch.r_custom_N is None else {"reward/custom": jnp.mean(batch.r_custom_N)}),
        "mig/l0": jnp.mean(l[:, 0]),
        "mig/lK": jnp.mean(wm_lib.end_of_cot(l, batch.num_steps_N)),
        "mig/gain_sum": jnp.mean(gains_N),
        "mig/zero_gain_step_frac": wm_lib.zero_gain_step_frac(wm),
        "mig/steps_per_completion": jnp.mean(batch.num_steps_N.astype(jnp.float32)),
        "mig/no_cot_frac": jnp.mean((batch.num_steps_N == 0).astype(jnp.float32)),
        "adv/process_std": _masked_std(streams.adv_process_NxC, streams.mask_process_NxC),
        "adv/outcome_std": jnp.std(adv_out_N),
        # groups where the outcome reward cannot rank anything: no right answer at all, or the
        # same r_out for every sample (outcome advantage exactly 0)
        "reward/all_wrong_group_frac": jnp.mean(
            jnp.max(batch.r_correct_N.reshape(-1, hp.group_size), axis=1) <= 0.5),
        "adv/outcome_zero_var_frac": jnp.mean(
            jnp.ptp(r_out_N.reshape(-1, hp.group_size), axis=1) == 0.0),
        "adv/corr_process_outcome": _corr(proc_seq_N, adv_out_N),
    }
    return streams, sft_pass_N, stats


def drop_truncated(streams: adv_lib.Streams, sft_pass_N, truncated_N):
    """Streams and SFT gate without the truncated completions (`rl.mask_truncated`)."""
    if truncated_N is None:
        raise ValueError("rl.mask_truncated needs TrainBatch.truncated_N")
    keep_NxC = ~jnp.asarray(truncated_N, bool)[:, None]
    streams = streams._replace(
        adv_process_NxC=jnp.where(keep_NxC, streams.adv_process_NxC, 0.0),
        mask_process_NxC=streams.mask_process_NxC & keep_NxC,
        adv_outcome_NxC=jnp.where(keep_NxC, streams.adv_outcome_NxC, 0.0),
        mask_outcome_NxC=streams.mask_outcome_NxC & keep_NxC)
    return streams, sft_pass_N & keep_NxC[:, 0]


def loss_mask(batch: TrainBatch, hp: UpdateHParams):
    """M_full of the SFT and KL terms: the completion tokens, less truncated completions'."""
    if not hp.mask_truncated:
        return batch.mask_NxC
    return batch.mask_NxC & ~jnp.asarray(batch.truncated_N, bool)[:, None]


def _masked_std(x, m):
    m = m.astype(jnp.float32)
    cnt = jnp.maximum(m.sum(), 1.0)
    mu = (x * m).sum() / cnt
    return jnp.sqrt((((x - mu) * m) ** 2).sum() / cnt)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    den = jnp.sqrt((a * a).sum() * (b * b).sum())
    return jnp.where(den > 0, (a * b).sum() / jnp.where(den > 0, den, 1.0), 0.0)


def completion_logprobs(model, batch: TrainBatch, chunk: int, temperature: float):
    """(logp_NxC, entropy_NxC) of the completion tokens under `model`."""
    p = batch.prompt_NxP.shape[1]
    tokens = jnp.concatenate([batch.prompt_NxP, batch.tokens_NxC], axis=1)
    mask = jnp.concatenate([batch.prompt_mask_NxP, batch.mask_NxC], axis=1)
    lp, ent = token_logprobs(model, tokens, mask, chunk_size=chunk, temperature=temperature,
                             with_entropy=True, images=batch.images, first=p)
    return lp[:, p:], ent[:, p:]


def make_update(graphdef, optimizer: optax.GradientTransformation, hp: UpdateHParams,
                state_shardings=None):
    """The jitted `(state, batch, ref_params) -> (state, metrics)`, donating the state. With
    `state_shardings` (see `migjax.train_state.state_shardings`) the new state keeps the layout of
    the old one, so the function compiles once."""
    fn = functools.partial(update, graphdef, optimizer, hp=hp)
    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(fn, donate_argnums=(0,), out_shardings=out)


def update(graphdef, optimizer: optax.GradientTransformation, state: TrainState,
           batch: TrainBatch, ref_params=None, *, hp: UpdateHParams):
    """(state, batch) -> (state, metrics): `hp.epochs` passes of `hp.minibatches` steps.
    Pure; `make_update` jits it."""
    n = batch.tokens_NxC.shape[0]
    if n % hp.minibatches:
        raise ValueError(f"rollout batch N={n} is not divisible by rl.minibatches={hp.minibatches}")
    streams, sft_pass_N, stats = credit(batch, hp)
    mb = n // hp.minibatches
    split = lambda x: x.reshape(hp.minibatches, mb, *x.shape[1:])
    lp_fn = lambda params, b: completion_logprobs(merge(graphdef, params), b, hp.score_chunk,
                                                  hp.temperature)

    # Log-probs of the policy that sampled (the parameters before this update), per minibatch.
    # With a single optimizer step they equal the loss's own log-probs, so the loss takes those
    # (without gradient) and this extra forward pass is skipped; the ratio pi / pi_old is then 1
    # on every token, and policy/clipfrac and policy/approx_kl (losses.ppo_surrogate) are 0 by
    # construction.
    single = hp.epochs * hp.minibatches == 1
    old_logp_NxC = None
    if not single:
        old_logp = jax.lax.map(lambda b: lp_fn(state.params, b)[0], jax.tree.map(split, batch))
        old_logp_NxC = jax.lax.stop_gradient(old_logp.reshape(n, -1))
    ref_logp_NxC = None
    if ref_params is not None:
        ref = jax.lax.map(lambda b: lp_fn(ref_params, b)[0], jax.tree.map(split, batch))
        ref_logp_NxC = jax.lax.stop_gradient(ref.reshape(n, -1))
    rows = dict(batch=batch, streams=streams, sft=sft_pass_N, old=old_logp_NxC, ref=ref_logp_NxC,
                loss_mask=loss_mask(batch, hp))
    w_proc, w_out = adv_lib.stream_weights(hp.decoupled, hp.alpha, hp.beta)

    def loss_fn(params, r, step):
        logp, ent = lp_fn(params, r["batch"])
        old = jax.lax.stop_gradient(logp) if single else r["old"]
        s = r["streams"]
        total, m = losses.objective(
            logp, old, s.adv_process_NxC, s.mask_process_NxC, s.adv_outcome_NxC,
            s.mask_outcome_NxC, r["loss_mask"], r["sft"], ref_logp_NxC=r["ref"],
            alpha=w_proc, beta=w_out, gamma=hp.gamma, kl_coef=hp.kl_coef,
            kl_kind=hp.kl_estimator, eps_low=hp.eps_low, eps_high=hp.eps_high,
            aggregation=hp.aggregation)
        if hp.nan_at_step == NAN_EVERY_UPDATE:
            total = total + jnp.nan
        elif hp.nan_at_step >= 0:
            total = total + jnp.where(step == hp.nan_at_step, jnp.nan, 0.0)
        m["policy/entropy"] = losses.masked_mean(ent, r["batch"].mask_NxC)
        m["policy/sampler_trainer_logp_absdiff"] = losses.masked_mean(
            jnp.abs(r["batch"].sampler_logp_NxC - old), r["batch"].mask_NxC)
        return total, m

    def one_step(state: TrainState, r):
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, r, state.step)
        m["optim/grad_norm"] = optax.global_norm(grads)
        new_state, ok = apply_if_finite(state, grads, loss, optimizer)
        m["update/skipped"] = 1.0 - ok.astype(jnp.float32)
        return new_state, m

    def one_epoch(state: TrainState, e):
        perm = jax.random.permutation(
            jax.random.fold_in(jax.random.key(hp.seed), state.step * hp.epochs + e), n)
        shuffled = jax.tree.map(lambda x: split(jnp.take(x, perm, axis=0)), rows)
        return jax.lax.scan(one_step, state, shuffled)

    state, m = jax.lax.scan(one_epoch, state, jnp.arange(hp.epochs))
    metrics = jax.tree.map(jnp.mean, m)
    metrics.update(stats)
    metrics["update/skipped"] = jnp.sum(m["update/skipped"])
    return state, metrics
