"""Resuming is exact: a run killed as its 4th step begins and restarted in the same workdir ends
with the parameters, optimizer state, sampled tokens and metrics of an uninterrupted run; a
finished run started again changes nothing."""

from __future__ import annotations

import os

import helpers
import jax
import numpy as np
import pytest

from migjax import trainer
from migjax.checkpointing import Checkpointer
from migjax.config_checks import validate
from migjax.train_state import TrainState

pytestmark = pytest.mark.slow
STEPS = 4


def run_here(workdir, overrides):
    c = helpers.make_config("arith_tiny", overrides)
    validate(c, jax.device_count())
    with helpers.recording() as rec:
        summary = trainer.train(c, str(workdir))
    return summary, rec


def restored_state(workdir, step, c):
    """Every array of checkpoint `step` (step, params, optimizer moments, skip counter)."""
    from migjax.models import load_pretrained, split
    from migjax.train_state import init_state, make_optimizer

    _, params = split(load_pretrained(c.model.path)[0])
    o = c.optim
    template = init_state(params, make_optimizer(
        lr=o.lr, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
        grad_clip=o.grad_clip))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, extra = ckpt.restore(step, template)
    finally:
        ckpt.close()
    assert isinstance(state, TrainState)
    return jax.tree.map(np.asarray, state), extra


def test_resume_matches_an_uninterrupted_run(tmp_path, sft_model, compile_cache):
    # async_save stays on (the default) except in the run that is killed, where a synchronous
    # save makes "checkpoint 2 is on disk when step 4 begins" certain rather than likely.
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=STEPS, eval__every=2)
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref_summary, ref = run_here(ref_dir, ov)
    assert ref["steps"] == [1, 2, 3, 4]
    d = ref["param_digests"]
    assert d[1] != d[2] != d[3]  # the updates of steps 3 and 4 changed the parameters

    killed = {"recipe": "arith_tiny", "workdir": str(cut_dir), "exit_at_step": 4,
              "expect_rc": 17, "overrides": dict(ov, **{"checkpoint.async_save": False})}
    helpers.run_driver(killed, str(tmp_path / "killed.json"),
                       helpers.subprocess_env(compile_cache))
    before = helpers.metrics_lines(cut_dir)
    assert [r["step"] for r in before] == [0, 1, 2, 3]  # step 3 logged, not checkpointed
    ckpts = sorted(d for d in os.listdir(cut_dir / "checkpoints") if d.isdigit())
    assert ckpts == ["2"] and not os.path.exists(cut_dir / "summary.json")

    summary, rec = run_here(cut_dir, ov)
    assert rec["steps"] == [3, 4]  # resumed from checkpoint 2, not restarted
    assert rec["token_digests"] == ref["token_digests"][2:]
    assert rec["param_digests"] == ref["param_digests"][2:]
    for k, v in ref["params"].items():
        np.testing.assert_array_equal(rec["params"][k], v, err_msg=k)
    for k in ("before", "after"):
        assert summary[k] == ref_summary[k]

    lines, ref_lines = helpers.metrics_lines(cut_dir), helpers.metrics_lines(ref_dir)
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 4]  # no step lost or repeated
    assert [r.get("final", False) for r in lines] == [False] * 5 + [True]  # the last: after RL
    assert lines == ref_lines  # every logged value, bit for bit (timings aside)
    assert all("eval/ood/pass_at_1" in lines[i] for i in (0, 2, 5))
    assert lines[:4] == before  # step 3 logged again by the resumed run: the same values

    again, rec = run_here(cut_dir, ov)  # a finished run started again does nothing
    assert rec["steps"] == [] and again["after"] == summary["after"]
    assert helpers.metrics_lines(cut_dir) == lines

    os.remove(cut_dir / "summary.json")  # as if killed between the final evaluation and it
    again, rec = run_here(cut_dir, ov)
    assert rec["steps"] == [] and again["after"] == summary["after"]
    assert helpers.metrics_lines(cut_dir) == lines  # the final evaluation once

    longer, rec = run_here(cut_dir, dict(ov, **{"rl.steps": STEPS + 1}))  # extended by a step
    assert rec["steps"] == [STEPS + 1] and longer["steps"] == STEPS + 1
    ext = helpers.metrics_lines(cut_dir)
    assert [(r["step"], r.get("final", False)) for r in ext] == \
        [(0, False), (1, False), (2, False), (3, False), (4, False), (5, False), (5, True)]
    assert ext[:5] == lines[:5]  # the stale final evaluation of step 4 is gone

    # An unreadable latest checkpoint: the run falls back to the one before and redoes step 5.
    for root, _, files in os.walk(cut_dir / "checkpoints" / "5" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00")
    os.remove(cut_dir / "summary.json")
    redone, rec5 = run_here(cut_dir, dict(ov, **{"rl.steps": STEPS + 1}))
    assert rec5["steps"] == [STEPS + 1] and redone["after"] == longer["after"]
    for k, v in rec["params"].items():
        np.testing.assert_array_equal(rec5["params"][k], v, err_msg=k)
    assert helpers.metrics_lines(cut_dir) == ext
    assert os.path.isdir(cut_dir / "checkpoints" / "5.unreadable")

    c = helpers.make_config("arith_tiny", ov)
    for step in (2, 4):  # the checkpoints themselves: parameters and optimizer state
        a, extra_a = restored_state(ref_dir, step, c)
        b, extra_b = restored_state(cut_dir, step, c)
        assert int(a.step) == int(b.step) == step
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
        assert extra_a["data"] == extra_b["data"]
