"""Non-finite updates are skipped (parameters and optimizer moments untouched), counted, and stop
the run with NonFiniteError after optim.max_consecutive_skips in a row."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import arith_tiny
from migjax import trainer
from migjax.models import ModelConfig, init_model, split
from migjax.train_state import TrainState, apply_if_finite, init_state, make_optimizer
from migjax.types import TrainBatch
from migjax.update import NAN_EVERY_UPDATE, UpdateHParams, make_update


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      np.asarray(y).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------- apply_if_finite

SGD = optax.sgd(0.5)


def small_state():
    params = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}
    return init_state(params, SGD)


def test_finite_step_applies_by_hand():
    state = small_state()
    grads = {"w": jnp.asarray([0.2, -0.4]), "b": jnp.asarray(1.0)}
    new, ok = apply_if_finite(state, grads, jnp.asarray(0.7), SGD)
    assert bool(ok)
    np.testing.assert_allclose(new.params["w"], [0.9, 2.2])  # w - 0.5 g
    np.testing.assert_allclose(new.params["b"], 2.5)
    assert int(new.step) == 1 and int(new.skips) == 0


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "neg_inf_grad", "nan_loss", "inf_loss"])
def test_non_finite_step_is_skipped_and_counted(bad):
    adam = make_optimizer(lr=0.1, grad_clip=1.0)
    state = init_state({"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}, adam)
    # one good step first, so the moments are non-zero and "unchanged" means something
    state, _ = apply_if_finite(state, {"w": jnp.asarray([0.3, 0.1]), "b": jnp.asarray(-0.2)},
                               jnp.asarray(1.0), adam)
    before = host(state)
    grads = {"w": jnp.asarray([0.3, 0.1]), "b": jnp.asarray(-0.2)}
    loss = jnp.asarray(1.0)
    if bad.endswith("grad"):
        value = {"nan_grad": np.nan, "inf_grad": np.inf, "neg_inf_grad": -np.inf}[bad]
        grads["w"] = grads["w"].at[1].set(value)
    else:
        loss = jnp.asarray(np.nan if bad == "nan_loss" else np.inf)
    for i in range(1, 4):  # consecutive skips are counted
        state, ok = apply_if_finite(state, grads, loss, adam)
        assert not bool(ok)
        assert int(state.skips) == i and int(state.step) == 1 + i
        assert_bitwise(state.params, before.params)
        assert_bitwise(state.opt_state, before.opt_state)
    # a finite update resets the count and moves the parameters
    state, ok = apply_if_finite(state, {"w": jnp.asarray([0.3, 0.1]), "b": jnp.asarray(-0.2)},
                                jnp.asarray(1.0), adam)
    assert bool(ok) and int(state.skips) == 0
    assert not np.array_equal(np.asarray(state.params["w"]), before.params["w"])


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, -1.0, 0.0, np.nan, np.inf, -np.inf]),
                       min_size=3, max_size=3))
def test_skipped_iff_any_value_is_not_finite(values):
    state = small_state()
    grads = {"w": jnp.asarray(values[:2], jnp.float32), "b": jnp.asarray(values[2], jnp.float32)}
    new, ok = apply_if_finite(state, grads, jnp.asarray(0.0), SGD)
    finite = all(np.isfinite(values))
    assert bool(ok) == finite
    assert int(new.skips) == (0 if finite else 1)
    expect_w = np.asarray([1.0, 2.0]) - 0.5 * np.asarray(values[:2]) if finite else [1.0, 2.0]
    np.testing.assert_allclose(np.asarray(new.params["w"]), expect_w)


# ---------------------------------------------------------------------------- jitted update

N, P, C, K, G = 4, 4, 6, 2, 2
CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=8)


def train_batch(r_correct_N=(1.0, 0.0, 0.0, 1.0)) -> TrainBatch:
    rng = np.random.default_rng(0)
    prompt_mask = np.ones((N, P), bool)
    prompt_mask[:, 0] = False  # left padding
    mask = np.ones((N, C), bool)
    mask[1, 4:] = False
    step_id = np.tile(np.asarray([1, 1, 2, 2, 0, 0], np.int32), (N, 1))
    return TrainBatch(
        prompt_NxP=jnp.asarray(rng.integers(1, CFG.vocab_size, (N, P)), jnp.int32),
        prompt_mask_NxP=jnp.asarray(prompt_mask),
        tokens_NxC=jnp.asarray(rng.integers(1, CFG.vocab_size, (N, C)), jnp.int32),
        mask_NxC=jnp.asarray(mask),
        cot_mask_NxC=jnp.asarray(step_id > 0),
        step_id_NxC=jnp.asarray(step_id),
        sampler_logp_NxC=jnp.full((N, C), -3.0, jnp.float32),
        l_NxK1=jnp.asarray(rng.uniform(-4, -1, (N, K + 1)), jnp.float32),
        step_mask_NxK=jnp.ones((N, K), bool),
        num_steps_N=jnp.full((N,), K, jnp.int32),
        r_correct_N=jnp.asarray(r_correct_N, jnp.float32),
        r_format_N=jnp.asarray([1.0, 1.0, 0.0, 1.0], jnp.float32))


def tiny_model():
    """(graphdef, params) of CFG with random numpy weights (no eager initialisation)."""
    from flax import nnx

    graphdef, shapes = split(nnx.eval_shape(lambda: init_model(CFG, 0)))
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype)
              for k, v in shapes.items()}
    return graphdef, params


def test_update_skips_the_poisoned_step_and_non_finite_batches():
    graphdef, params = tiny_model()
    opt = make_optimizer(lr=1e-2)
    update = make_update(graphdef, opt, UpdateHParams(group_size=G, nan_at_step=1, score_chunk=8))
    batch = train_batch()

    s0 = host(init_state(params, opt))
    state, m = update(jax.tree.map(jnp.asarray, s0), batch, None)  # update 0: applied
    s1 = host(state)
    assert float(m["update/skipped"]) == 0.0 and int(s1.skips) == 0
    assert not np.array_equal(s1.params["wq"], s0.params["wq"])

    state, m = update(state, batch, None)  # update 1: NaN injected -> skipped
    s2 = host(state)
    assert float(m["update/skipped"]) == 1.0
    assert int(s2.step) == 2 and int(s2.skips) == 1
    assert_bitwise(s2.params, s1.params)
    assert_bitwise(s2.opt_state, s1.opt_state)

    # an infinite reward makes the advantages (and so the loss) non-finite: skipped as well
    inf_batch = train_batch(r_correct_N=(np.inf, 0.0, 0.0, 1.0))
    state, m = update(state, inf_batch, None)
    s3 = host(state)
    assert float(m["update/skipped"]) == 1.0 and int(s3.skips) == 2
    assert not np.isfinite(float(m["loss/total"]))
    assert_bitwise(s3.params, s1.params)
    assert_bitwise(s3.opt_state, s1.opt_state)

    state, m = update(state, batch, None)  # update 3: finite again, the count resets
    assert float(m["update/skipped"]) == 0.0 and int(state.skips) == 0
    assert not np.array_equal(np.asarray(state.params["wq"]), s1.params["wq"])


def test_state_of_skipped_updates_is_a_train_state():
    # the guard keeps the pytree structure the checkpointer saves
    state, _ = apply_if_finite(small_state(), {"w": jnp.full((2,), np.nan), "b": jnp.asarray(0.0)},
                               jnp.asarray(1.0), SGD)
    assert isinstance(state, TrainState) and state.skips.dtype == jnp.int32


# ---------------------------------------------------------------------------- end to end


def test_run_stops_after_max_consecutive_skips(tmp_path):
    """NaN in every update: the run stops once `max_consecutive_skips` updates in a row were
    skipped, naming the step and the last checkpoint."""
    c = arith_tiny.get_config()
    c.model.scratch.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=16))
    c.model.init_from_sft = False
    c.rl.steps, c.rl.batch_prompts, c.rl.group_size, c.rl.minibatches = 6, 2, 2, 1
    c.sampler.max_new_tokens = c.eval.max_new_tokens = 8
    c.task.eval_limit, c.eval.batch_size, c.eval.pass_k = 2, 2, 0
    c.task.arith.train_size = 64
    c.checkpoint.every, c.checkpoint.async_save = 1, False
    c.log.progress = c.log.tensorboard = False
    c.log.samples_every = 0
    c.optim.max_consecutive_skips = 3
    c.debug.nan_at_step = NAN_EVERY_UPDATE
    workdir = str(tmp_path / "run")
    with pytest.raises(trainer.NonFiniteError) as info:
        trainer.train(c, workdir)
    msg = str(info.value)
    ckdir = os.path.join(workdir, "checkpoints")
    assert msg.startswith("step 3: 3 consecutive updates had a non-finite loss or gradient")
    assert "optim.max_consecutive_skips=3" in msg
    assert f"last good checkpoint: 2 in {ckdir}" in msg
    assert sorted(os.listdir(ckdir)) == ["1", "2"]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [0, 1, 2]  # evaluation before RL, then the steps
    assert all(r["update/skipped"] == 1.0 for r in lines[1:])
