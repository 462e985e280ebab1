"""`model.remat` and `model.remat_policy`: the same gradients, less memory kept for the backward
pass, and the run config reaching the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from migjax.configs.base import get_config
from migjax.experiment import scratch_config
from migjax.models import PRESETS, merge
from migjax.models.config import ModelConfig
from migjax.models.scoring import token_logprobs

CFG = PRESETS["tiny"].replace(num_layers=4)
TOKENS = jax.random.randint(jax.random.key(0), (4, 128), 0, CFG.vocab_size)
MASK = jnp.ones_like(TOKENS, bool)


def grad_and_temp_bytes(remat: bool, policy: str):
    graphdef, params = random_params(CFG.replace(remat=remat, remat_policy=policy))
    loss = lambda p: -token_logprobs(merge(graphdef, p), TOKENS, MASK)[0].mean()
    f = jax.jit(jax.grad(loss))
    return f(params), f.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_policies_change_memory_not_gradients():
    ref, full_bytes = grad_and_temp_bytes(False, "nothing")
    got = {p: grad_and_temp_bytes(True, p) for p in ("nothing", "dots")}
    for grads, _ in got.values():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads, ref)
    # recomputing everything keeps least; keeping the projections sits between
    assert got["nothing"][1] < got["dots"][1] < full_bytes


def test_policy_is_checked_and_stays_out_of_config_json():
    with pytest.raises(ValueError, match="remat_policy='some'; expected one of"):
        CFG.replace(remat_policy="some")
    hf = CFG.replace(remat=True, remat_policy="dots").to_hf()
    assert not any("remat" in k for k in hf)
    assert ModelConfig.from_hf(hf).remat_policy == "nothing"


def test_the_run_config_sets_it():
    class Tokenizer:  # what scratch_config reads of a tokenizer
        eos_token_id, pad_token_id, bos_token_id = 1, 0, None

        def __len__(self):
            return 64

    c = get_config()
    c.model.remat, c.model.remat_policy = True, "dots"
    mcfg = scratch_config(c, Tokenizer())
    assert mcfg.remat and mcfg.remat_policy == "dots"
