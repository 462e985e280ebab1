"""Every config variant, checked by what it does to the update: the advantages and stream masks
of `update.credit` and the loss of one jitted update, against an independent numpy reference
written from docs/METHOD.md; and the method fixes (no-CoT samples under end-of-CoT credit,
coupled streams weighted by alpha and beta, clip ties)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import arith_tiny
from configs.base import RETIRED_VARIANTS, VARIANTS
from migjax import advantages as adv_lib
from migjax.train_state import init_state
from migjax.types import TrainBatch
from migjax.update import UpdateHParams, credit, make_update
from tests.test_nonfinite import CFG, tiny_model

G, N, P, C, K = 4, 8, 3, 8, 3
EPS = 1e-6


def batch_with_structure(seed=0) -> TrainBatch:
    """Two groups of four: varied step counts, one completion without a CoT in group 0, mixed
    correctness and format, and a short (padded) completion."""
    rng = np.random.default_rng(seed)
    num_steps = np.array([0, 1, 2, 3, 3, 2, 3, 1], np.int32)
    step_id = np.zeros((N, C), np.int32)
    cot = np.zeros((N, C), bool)
    for n, k in enumerate(num_steps):
        if k:  # token 0 is <think>, then two tokens per step, then </think>
            for j in range(k):
                step_id[n, 1 + 2 * j: 3 + 2 * j] = j + 1
            cot[n, : 2 + 2 * k] = True
    mask = np.ones((N, C), bool)
    mask[5, 7:] = False
    return TrainBatch(
        prompt_NxP=jnp.asarray(rng.integers(1, CFG.vocab_size, (N, P)), jnp.int32),
        prompt_mask_NxP=jnp.ones((N, P), bool),
        tokens_NxC=jnp.asarray(rng.integers(1, CFG.vocab_size, (N, C)), jnp.int32),
        mask_NxC=jnp.asarray(mask), cot_mask_NxC=jnp.asarray(cot),
        step_id_NxC=jnp.asarray(step_id), sampler_logp_NxC=jnp.full((N, C), -3.0),
        l_NxK1=jnp.asarray(rng.uniform(-4.0, -0.3, (N, K + 1)), jnp.float32),
        step_mask_NxK=jnp.asarray(np.arange(1, K + 1)[None] <= num_steps[:, None]),
        num_steps_N=jnp.asarray(num_steps),
        r_correct_N=jnp.asarray([1, 0, 0, 1, 0, 1, 1, 1], jnp.float32),
        r_format_N=jnp.asarray([0, 1, 1, 1, 1, 0, 1, 1], jnp.float32))


def hparams(variant: str) -> UpdateHParams:
    c = arith_tiny.get_config(variant)
    c.rl.group_size = G
    c.rl.score_chunk = 8
    return UpdateHParams.from_config(c)


# ------------------------------------------------------------------ the numpy reference

def np_normalise(x, valid, hp):
    """Group statistics over the valid entries of each row, as METHOD.md section 4 says."""
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        v = x[b][valid[b]]
        if len(v) < 2 or v.max() == v.min():
            continue
        c = x[b] - v.mean()
        if hp.estimator == "rloo":
            c = c * len(v) / (len(v) - 1)
        if hp.std_normalize and hp.estimator != "dr_grpo":
            c = c / (np.std(v, ddof=1 if hp.unbiased_std else 0) + EPS)
        out[b] = np.where(valid[b], c, 0.0)
    return out


def np_gains(l, step_mask, hp):
    l = np.exp(l) if hp.likelihood_space == "prob" else l
    g = np.zeros((N, K))
    for n in range(N):
        h = l[n, 0] if hp.h0 == "l0" else 0.0
        for k in range(K):
            if step_mask[n, k]:
                g[n, k] = max(0.0, l[n, k + 1] - h) if hp.watermark else l[n, k + 1] - h
                h = max(h, l[n, k + 1]) if hp.watermark else l[n, k + 1]
    return l, g


def np_streams(b: TrainBatch, hp):
    """(process adv, process mask, outcome adv, outcome mask, weights) of METHOD.md 4, 5, 7."""
    f = lambda x: np.asarray(x, np.float64)
    step_mask, cot, full = (np.asarray(x, bool) for x in (b.step_mask_NxK, b.cot_mask_NxC,
                                                           b.mask_NxC))
    k_n, step_id = np.asarray(b.num_steps_N), np.asarray(b.step_id_NxC)
    grp = lambda x, v: np_normalise(x.reshape(-1, G), v.reshape(-1, G), hp).reshape(-1)
    r_out = f(b.r_correct_N) + hp.w_format * f(b.r_format_N)
    adv_out = grp(r_out, np.ones(N, bool))
    l, g = np_gains(f(b.l_NxK1), step_mask, hp)
    has_cot = k_n > 0
    if hp.mig_reward == "end_of_cot":
        seq = grp(l[np.arange(N), k_n], has_cot)
    elif hp.advantage_mode == "trajectory":
        seq = grp(g.sum(1), np.ones(N, bool))  # no CoT: R_mig = 0
    else:
        seq = np.zeros(N)
    if hp.advantage_mode == "stepwise":
        credit_ = np.where(step_mask, g, 0.0)
        if hp.reward_to_go:
            credit_ = np.cumsum(credit_[:, ::-1], 1)[:, ::-1]
        rows = np_normalise(credit_.reshape(-1, G * K), step_mask.reshape(-1, G * K), hp)
        per_step = np.concatenate([np.zeros((N, 1)), rows.reshape(N, K)], 1)
        proc = np.where(cot, per_step[np.arange(N)[:, None], step_id], 0.0)
    else:
        proc = np.where(cot, seq[:, None], 0.0)
    if hp.decoupled:
        return (np.where(cot & full, proc, 0.0), cot & full,
                np.where(full, adv_out[:, None], 0.0), full, (hp.alpha, hp.beta))
    one = np.where(cot, proc, seq[:, None]) * hp.alpha + hp.beta * adv_out[:, None]
    return np.zeros((N, C)), np.zeros((N, C), bool), np.where(full, one, 0.0), full, (0.0, 1.0)


def np_aggregate(x, m, mode):
    x = np.where(m, x, 0.0)
    if mode == "token_mean":
        return x.sum() / max(m.sum(), 1)
    if mode == "seq_mean_token_sum_norm":
        return x.sum() / x.size
    has = m.sum(1) > 0
    return (x.sum(1)[has] / m.sum(1)[has]).sum() / max(has.sum(), 1)


def np_sft_pass(b, hp, gains):
    tests = {"format": np.asarray(b.r_format_N) > 0.5, "correct": np.asarray(b.r_correct_N) > 0.5,
             "mig_positive": gains > 0}
    return np.logical_and.reduce([tests[t] for t in hp.sft_gates])


# ------------------------------------------------------------------ every variant

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_advantages_match_the_reference(variant):
    hp, b = hparams(variant), batch_with_structure()
    streams, sft_pass, _ = jax.jit(credit, static_argnums=1)(b, hp)
    ap, mp, ao, mo, _ = np_streams(b, hp)
    np.testing.assert_allclose(np.asarray(streams.adv_process_NxC), ap, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(streams.mask_process_NxC), mp)
    np.testing.assert_allclose(np.asarray(streams.adv_outcome_NxC), ao, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(streams.mask_outcome_NxC), mo)
    gains = np_gains(np.asarray(b.l_NxK1, np.float64), np.asarray(b.step_mask_NxK), hp)[1]
    np.testing.assert_array_equal(np.asarray(sft_pass), np_sft_pass(b, hp, gains.sum(1)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def one_update(model, hp, b):
    graphdef, params = model
    opt = optax.sgd(0.1)  # plain SGD: the step is proportional to the gradient (Adam's is not)
    state, m = make_update(graphdef, opt, hp)(init_state(jax.tree.map(jnp.copy, params), opt),
                                               b, None)
    return state, {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_loss_at_the_sampling_policy_matches_the_reference(model, variant):
    """One optimizer step per rollout: ratio 1, so each stream's surrogate is the aggregate of
    -A and the total weighs them as the variant says."""
    hp, b = hparams(variant), batch_with_structure()
    ap, mp, ao, mo, (w_p, w_o) = np_streams(b, hp)
    _, m = one_update(model, hp, b)
    l_p, l_o = np_aggregate(-ap, mp, hp.aggregation), np_aggregate(-ao, mo, hp.aggregation)
    assert m["loss/process"] == pytest.approx(l_p, rel=1e-4, abs=1e-6)
    assert m["loss/outcome"] == pytest.approx(l_o, rel=1e-4, abs=1e-6)
    assert m["loss/total"] == pytest.approx(
        w_p * l_p + w_o * l_o + hp.gamma * m["loss/sft"], rel=1e-4, abs=1e-6)
    assert m["update/skipped"] == 0.0


def test_each_variant_moves_the_parameters_differently(model):
    """No variant is a silent no-op: each one's update differs from MIG's, except DAPO's, which
    with one optimizer step per rollout (ratio 1, nothing clipped) equals the matched GRPO."""
    b = batch_with_structure()
    finals = {v: one_update(model, hparams(v), b)[0].params["wq"] for v in VARIANTS}
    for v in VARIANTS:
        if v not in ("mig", "dapo", "reference_scorer"):  # the scorer acts in the reward stage
            assert not np.allclose(finals[v], finals["mig"], rtol=1e-6, atol=1e-9), v
    np.testing.assert_array_equal(finals["dapo"], finals["grpo_matched"])
    np.testing.assert_array_equal(finals["reference_scorer"], finals["mig"])


def test_retired_variant_names_say_what_replaced_them():
    assert set(RETIRED_VARIANTS).isdisjoint(VARIANTS)
    with pytest.raises(ValueError, match="grpo_matched.*grpo_canonical"):
        arith_tiny.get_config("grpo")


# ------------------------------------------------------------------ the method fixes

def test_end_of_cot_ranks_completions_without_a_cot_below_none():
    """l_K = -2.0 / -1.9 / -3.0 and one completion without a CoT: the best CoT (-1.9) gets a
    positive advantage, and the no-CoT sample does not move the others' statistics."""
    b = batch_with_structure()
    l = np.asarray(b.l_NxK1).copy()
    k_n = np.asarray(b.num_steps_N)
    for n, lk in zip((1, 2, 3), (-2.0, -1.9, -3.0), strict=True):
        l[n, k_n[n]] = lk
    b = b._replace(l_NxK1=jnp.asarray(l))
    hp = hparams("end_of_cot")
    _, _, stats = credit(b, hp)
    streams, _, _ = credit(b, hp)
    proc = np.asarray(streams.adv_process_NxC)
    cot = np.asarray(b.cot_mask_NxC)
    seq = np.array([proc[n][cot[n]][0] for n in (1, 2, 3)])
    want = np.array([-2.0, -1.9, -3.0])
    want = (want - want.mean()) / (want.std() + EPS)
    np.testing.assert_allclose(seq, want, rtol=1e-5)
    assert seq[1] > 0 > seq[2]
    assert not proc[0].any()


def test_coupled_alpha_zero_is_exactly_the_outcome_only_update(model):
    b = batch_with_structure()
    coupled = hparams("coupled")
    grpo = hparams("grpo_matched")
    coupled_grpo = dataclasses.replace(coupled, alpha=0.0, gamma=0.0)
    a, _ = one_update(model, coupled_grpo, b)
    g, _ = one_update(model, grpo, b)
    for k in a.params:
        np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(g.params[k]), rtol=1e-6,
                                   atol=1e-8, err_msg=k)
    # alpha acts in the coupled stream: alpha * A_process + beta * A_outcome on every token
    s1, _, _ = credit(b, coupled)
    s2, _, _ = credit(b, dataclasses.replace(coupled, alpha=3.0, beta=0.5))
    s0, _, _ = credit(b, dataclasses.replace(coupled, alpha=0.0, beta=1.0))
    out, proc = np.asarray(s0.adv_outcome_NxC), np.asarray(s1.adv_outcome_NxC) - np.asarray(
        s0.adv_outcome_NxC)
    np.testing.assert_allclose(np.asarray(s2.adv_outcome_NxC), 3.0 * proc + 0.5 * out,
                               rtol=1e-5, atol=1e-6)
    assert np.abs(proc).max() > 0.1
    assert adv_lib.stream_weights(False, 3.0, 0.5) == (0.0, 1.0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_clip_bounds_at_ratio_one_keep_the_full_gradient(model, eps):
    """At the sampling policy (ratio 1) the clip is inactive whatever eps is: eps 0 must give
    the same update as eps 0.2 (a min/clip tie would halve or quarter the gradient)."""
    b = batch_with_structure()
    hp = hparams("grpo_matched")
    base, _ = one_update(model, hp, b)
    tied, _ = one_update(model, dataclasses.replace(hp, eps_low=eps, eps_high=eps), b)
    for k in base.params:
        np.testing.assert_array_equal(np.asarray(tied.params[k]), np.asarray(base.params[k]))


def test_group_sparsity_metrics():
    """The share of groups with no right answer, and of groups whose outcome reward is constant
    (outcome advantage 0): where a dense process signal has to carry the update."""
    b = batch_with_structure()
    hp = hparams("mig")
    _, _, stats = credit(b, hp)
    assert float(stats["reward/all_wrong_group_frac"]) == 0.0
    assert float(stats["adv/outcome_zero_var_frac"]) == 0.0
    wrong = b._replace(r_correct_N=jnp.asarray([0, 0, 0, 0, 0, 1, 1, 1], jnp.float32),
                       r_format_N=jnp.asarray([1, 1, 1, 1, 1, 0, 1, 1], jnp.float32))
    _, _, stats = credit(wrong, hp)
    assert float(stats["reward/all_wrong_group_frac"]) == 0.5
    assert float(stats["adv/outcome_zero_var_frac"]) == 0.5


def test_method_doc_lists_every_variant_with_its_switches():
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "METHOD.md")
    rows = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"\| `(\w+)` \| (.*?) \|", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`([\w.]+)=", m.group(2)))
    assert set(rows) == set(VARIANTS)
    for name, switches in VARIANTS.items():
        assert rows[name] == set(switches), name
