"""Tests for the supervised warm start's data: the careless teacher's share of demonstrations and
length-grouped batches (every row once, each batch wide enough, the loss unchanged by the
trimmed padding); and a partial saved warm start replaced."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import random_params

from migjax.data import arith
from migjax.models import PRESETS
from migjax.train_state import init_state
from migjax.warmstart import demonstrations, length_grouped_batches, sft_step


def test_demonstrations_follow_the_probability():
    task = arith.ArithTask(arith.arith_spec("train"))
    items = [task[i] for i in range(2000)]
    n_d = sum(bool(it.distractors) for it in items)
    assert demonstrations(items, 0.0, seed=0) == [it.solution for it in items]
    assert demonstrations(items, 1.0, seed=0) == [arith.distracted_solution(it) for it in items]
    half = demonstrations(items, 0.5, seed=0)
    careless = sum(h != it.solution for h, it in zip(half, items, strict=True))
    assert 0.4 * n_d < careless < 0.6 * n_d
    assert half == demonstrations(items, 0.5, seed=0)  # seeded
    assert half != demonstrations(items, 0.5, seed=1)


def test_length_grouped_batches_cover_every_row_once_and_fit():
    lengths = np.random.default_rng(0).integers(20, 128, size=16 * 50 + 5)
    plain = length_grouped_batches(lengths, 16, 0, seed=0, max_width=128)
    assert [list(i) for i, _ in plain] == [list(range(k, k + 16)) for k in range(0, 800, 16)]
    assert {w for _, w in plain} == {128}
    grouped = length_grouped_batches(lengths, 16, 8, seed=0, max_width=128)
    rows = np.concatenate([i for i, _ in grouped])
    assert sorted(rows) == list(range(800))  # the 5 left over do not fill a batch
    for k, (idx, width) in enumerate(grouped):
        assert len(idx) == 16 and width % 16 == 0 and width <= 128
        assert lengths[idx].max() <= width < lengths[idx].max() + 16
        assert set(idx) <= set(range(k // 8 * 128, k // 8 * 128 + 128))  # its own window
    widths = [w for _, w in grouped]
    assert np.mean(widths) < 0.9 * 128 and len(set(widths)) <= 8
    again = length_grouped_batches(lengths, 16, 8, seed=0, max_width=128)
    assert all((a == b).all() and v == w for (a, v), (b, w) in zip(grouped, again, strict=True))
    other = length_grouped_batches(lengths, 16, 8, seed=1, max_width=128)
    assert any((a != b).any() for (a, _), (b, _) in zip(grouped, other, strict=True))


def test_trimmed_padding_leaves_the_step_unchanged():
    graphdef, params = random_params(PRESETS["tiny"])
    # Plain SGD at lr 1: the update is the gradient itself (Adam's first step, g / (|g| + eps),
    # would blow float rounding in near-zero gradients up to a full step of lr).
    opt = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, PRESETS["tiny"].vocab_size, size=(4, 64)).astype(np.int32)
    lengths = np.array([20, 31, 17, 26])
    mask = np.arange(64)[None] < lengths[:, None]
    loss_mask = mask & (np.arange(64)[None] >= 8)
    tokens = np.where(mask, tokens, 0)
    step = jax.jit(lambda s, *b: sft_step(graphdef, opt, s, *b))
    full, m_full = step(init_state(params, opt), *map(jnp.asarray, (tokens, mask, loss_mask)))
    cut = (tokens[:, :32], mask[:, :32], loss_mask[:, :32])
    trim, m_trim = step(init_state(params, opt), *map(jnp.asarray, cut))
    np.testing.assert_allclose(m_full["sft/loss"], m_trim["sft/loss"], rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(full.params[k], trim.params[k], atol=1e-6, err_msg=k)


def test_a_partial_warm_start_folder_is_replaced(tmp_path, caplog, compile_cache):
    """A sft_model folder without config.json (and a leftover sft_model.tmp) is trained again
    and replaced, saying so, rather than failing to rename over it."""
    import helpers

    from migjax import experiment as ex
    from migjax.warmstart import is_complete, run_warmstart

    out = tmp_path / "sft_model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")
    (tmp_path / "sft_model.tmp").mkdir()
    (tmp_path / "sft_model.tmp" / "junk").write_text("x")
    assert not is_complete(str(out))
    c = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny", warmstart__steps=2))
    with caplog.at_level("WARNING", logger="migjax.warmstart"):
        got = run_warmstart(c, str(tmp_path), ex.build_tokenizer(c, str(tmp_path)),
                            ex.build_mesh(c))
    assert got == str(out) and is_complete(got)
    assert f"{out} is incomplete" in caplog.text
    assert not (tmp_path / "sft_model.tmp").exists()
    mtime = os.path.getmtime(out / "config.json")
    caplog.clear()
    assert run_warmstart(c, str(tmp_path), None, None) == got  # complete now: reused as is
    assert os.path.getmtime(out / "config.json") == mtime and "incomplete" not in caplog.text
