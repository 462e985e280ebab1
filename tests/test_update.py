"""The jitted update against the objective written out by hand: with one optimizer step per
rollout batch the loss reuses its own log-probs as pi_old (no second forward pass)."""

import jax
import jax.numpy as jnp
import numpy as np

from migjax import losses
from migjax.models import merge
from migjax.train_state import apply_if_finite, init_state, make_optimizer
from migjax.update import UpdateHParams, completion_logprobs, credit, make_update
from tests.test_nonfinite import G, tiny_model, train_batch


def by_hand(graphdef, optimizer, state, batch, hp):
    """One optimizer step on the objective with pi_old from a separate forward pass."""
    streams, sft_pass, _ = credit(batch, hp)
    model = lambda p: merge(graphdef, p)
    old = jax.lax.stop_gradient(
        completion_logprobs(model(state.params), batch, hp.score_chunk, hp.temperature)[0])

    def loss_fn(params):
        logp, _ = completion_logprobs(model(params), batch, hp.score_chunk, hp.temperature)
        total, _ = losses.objective(
            logp, old, streams.adv_process_NxC, streams.mask_process_NxC,
            streams.adv_outcome_NxC, streams.mask_outcome_NxC, batch.mask_NxC, sft_pass,
            alpha=hp.alpha, beta=hp.beta, gamma=hp.gamma, eps_low=hp.eps_low,
            eps_high=hp.eps_high, aggregation=hp.aggregation)
        return total

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_if_finite(state, grads, loss, optimizer)[0], loss


def test_single_step_update_matches_the_objective_by_hand():
    graphdef, params = tiny_model()
    opt = make_optimizer(lr=1e-2)
    hp = UpdateHParams(group_size=G, score_chunk=8)
    batch = train_batch()
    want, want_loss = jax.jit(lambda s, b: by_hand(graphdef, opt, s, b, hp))(
        init_state(params, opt), batch)
    fresh = jax.tree.map(jnp.copy, params)  # the update donates its state
    got, m = make_update(graphdef, opt, hp)(init_state(fresh, opt), batch, None)
    np.testing.assert_allclose(float(m["loss/total"]), float(want_loss), rtol=1e-6, atol=1e-7)
    moved = 0
    for k in params:
        np.testing.assert_allclose(np.asarray(got.params[k]), np.asarray(want.params[k]),
                                   rtol=1e-5, atol=1e-6, err_msg=k)
        moved += not np.allclose(np.asarray(got.params[k]), np.asarray(params[k]))
    assert moved == len(params)  # every weight took part in the step
    # the sampler's log-probs in train_batch are a constant -3: the check reports the distance
    assert float(m["policy/sampler_trainer_logp_absdiff"]) > 0.0


def test_several_minibatches_start_from_the_sampling_policy():
    # two minibatches of one epoch: the first step's ratio is 1, so nothing is clipped, and
    # the second step sees pi_old from before the first step
    graphdef, params = tiny_model()
    opt = make_optimizer(lr=1e-2)
    batch = train_batch()
    one = make_update(graphdef, opt, UpdateHParams(group_size=G, score_chunk=8))
    two = make_update(graphdef, opt, UpdateHParams(group_size=G, score_chunk=8, minibatches=2))
    s1, _ = one(init_state(jax.tree.map(jnp.copy, params), opt), batch, None)
    s2, m2 = two(init_state(jax.tree.map(jnp.copy, params), opt), batch, None)
    assert int(s1.step) == 1 and int(s2.step) == 2
    assert float(m2["update/skipped"]) == 0.0
    assert np.isfinite(float(m2["loss/total"]))
    assert not np.allclose(np.asarray(s1.params["wq"]), np.asarray(s2.params["wq"]))
