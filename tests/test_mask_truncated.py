"""`rl.mask_truncated`: completions that hit the token budget get no weight in any loss term
(process and outcome streams, SFT, KL) but still count in their group's reward statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from migjax.train_state import init_state
from migjax.update import credit, make_update
from tests.test_nonfinite import CFG, tiny_model
from tests.test_variants import batch_with_structure, hparams

TRUNCATED_N = np.array([False, True, False, False, False, False, True, False])


def test_truncated_completions_leave_every_stream():
    batch = batch_with_structure()._replace(truncated_N=jnp.asarray(TRUNCATED_N))
    hp = dataclasses.replace(hparams("mig"), sft_gates=())  # every completion passes the gate
    off, sft_off, _ = credit(batch, hp)
    on, sft_on, _ = credit(batch, dataclasses.replace(hp, mask_truncated=True))
    assert np.asarray(off.mask_process_NxC)[TRUNCATED_N].any()  # there was something to drop
    for field in ("mask_process_NxC", "mask_outcome_NxC", "adv_process_NxC", "adv_outcome_NxC"):
        a, b = np.asarray(getattr(off, field)), np.asarray(getattr(on, field))
        assert not b[TRUNCATED_N].any(), field
        np.testing.assert_array_equal(a[~TRUNCATED_N], b[~TRUNCATED_N])  # same group statistics
    assert np.asarray(sft_off).all() and not np.asarray(sft_on)[TRUNCATED_N].any()
    assert np.asarray(sft_on)[~TRUNCATED_N].all()


def test_truncated_tokens_do_not_reach_the_loss():
    """With the switch on, rewriting the truncated completions' tokens leaves every loss term
    unchanged (KL included); with it off, the loss moves."""
    graphdef, params = tiny_model()
    ref = jax.tree.map(lambda x: x * 0.9, params)
    batch = batch_with_structure()._replace(truncated_N=jnp.asarray(TRUNCATED_N))
    rng = np.random.default_rng(3)
    other = np.where(TRUNCATED_N[:, None], rng.integers(1, CFG.vocab_size, batch.tokens_NxC.shape),
                     np.asarray(batch.tokens_NxC))
    rewritten = batch._replace(tokens_NxC=jnp.asarray(other, jnp.int32))
    opt = optax.sgd(0.1)
    losses = {}
    for flag in (False, True):
        hp = dataclasses.replace(hparams("mig"), kl_coef=0.5, mask_truncated=flag)
        update = make_update(graphdef, opt, hp)
        for name, b in (("same", batch), ("rewritten", rewritten)):
            _, m = update(init_state(jax.tree.map(jnp.copy, params), opt), b, ref)
            losses[flag, name] = {k: float(m[k]) for k in
                                  ("loss/total", "loss/process", "loss/outcome", "loss/sft",
                                   "loss/kl")}
    assert losses[True, "same"] == losses[True, "rewritten"]
    assert losses[False, "same"]["loss/total"] != losses[False, "rewritten"]["loss/total"]
    assert losses[True, "same"]["loss/kl"] > 0
