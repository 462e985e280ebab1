"""Tests for migjax.checkpointing: round trips, retention, partial checkpoints, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from migjax import checkpointing
from migjax.checkpointing import (
    Checkpointer,
    atomic_write_json,
    atomic_write_text,
    check_manifest,
    tree_manifest,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_state(seed=0, d_model=4):
    """A nested state with an adamw optimizer state whose moments are filled with noise.

    Arrays are built with numpy (no XLA compilations) to keep the tests fast.
    """
    rng = np.random.default_rng(seed)

    def noise(shape, dtype=np.float32):
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    params = {
        "embed": noise((7, d_model)),
        "layers": {
            "w_qkv": noise((2, d_model, 3 * d_model), jnp.bfloat16),
            "norm": noise((2, d_model)),
        },
        "head": [noise((d_model, 7)), noise((7,))],
    }
    opt_state = optax.adamw(1e-2).init(params)
    adam = opt_state[0]
    adam = adam._replace(
        count=jnp.asarray(np.int32(2)),
        mu=jax.tree.map(lambda p: noise(p.shape, p.dtype), params),
        nu=jax.tree.map(lambda p: noise(p.shape, p.dtype), params),
    )
    opt_state = (adam, *opt_state[1:])
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(np.int32(2))}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )


# -- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5, None], "y": "z"})
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5, None], "y": "z"}
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match="c.json"):
        atomic_write_json(path, {"bad": float("nan")})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["c.json"]


# -- manifest --------------------------------------------------------------------------------


def test_tree_manifest_hand_computed():
    tree = {"b": (np.zeros((2, 3), np.float32), None), "a": jnp.ones((), jnp.int32)}
    assert tree_manifest(tree) == [
        ["['a']", [], "int32"],
        ["['b'][0]", [2, 3], "float32"],
    ]


def test_check_manifest_messages():
    saved = [["['w']", [4, 3], "float32"], ["['old']", [2], "float32"]]
    with pytest.raises(
        ValueError,
        match=r"ckpt/5.*\['w'\] has shape \(4, 3\).*expects \(5, 3\)"
        r".*1 more",
    ):
        check_manifest(saved, [["['w']", [5, 3], "float32"]], "ckpt/5")
    with pytest.raises(ValueError, match=r"\['new'\] is missing from the checkpoint"):
        check_manifest(saved[:1], [["['w']", [4, 3], "float32"], ["['new']", [1], "int32"]], "d")
    in_ckpt_only = r"\['old'\] \(shape \(2,\) float32\) is in the checkpoint"
    with pytest.raises(ValueError, match=in_ckpt_only):
        check_manifest(saved, saved[:1], "d")
    check_manifest(saved, list(reversed(saved)), "d")  # order does not matter


# -- checkpointer ----------------------------------------------------------------------------


class _State(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: tuple


@pytest.mark.parametrize("async_save,container", [(True, dict), (False, _State)])
def test_round_trip_bitwise_with_adamw_state(tmp_path, async_save, container):
    state = container(**_train_state())
    extra = {
        "data": {"epoch": 1, "index": [3, 1, 4]},
        "config": {"lr": 1e-2, "name": "tiny ü"},
        "flag": True,
        "none": None,
    }
    with Checkpointer(tmp_path / "ckpt", async_save=async_save) as ck:
        ck.save(2, state, extra)
        ck.wait()
        assert ck.latest_step() == 2
    ck2 = Checkpointer(tmp_path / "ckpt")
    restored, restored_extra = ck2.restore(2, _abstract(state))
    _assert_bitwise_equal(restored, state)
    opt_state = restored["opt_state"] if container is dict else restored.opt_state
    assert isinstance(opt_state[0], optax.ScaleByAdamState)
    assert restored_extra == extra
    restored_latest, _ = ck2.restore(None, _abstract(state))
    _assert_bitwise_equal(restored_latest, state)
    ck2.close()


def test_restore_uses_requested_sharding(tmp_path):
    state = {"w": jnp.arange(12.0).reshape(4, 3)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, {})
        abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=sharding)}
        restored, extra = ck.restore(1, abstract)
    assert restored["w"].sharding == sharding
    assert extra == {}
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_keep_last_k(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ck:
        for step in range(1, 6):
            ck.save(step, {"x": jnp.full((3,), step, jnp.float32)}, {"step": step})
        ck.wait()
        assert ck.all_steps() == [4, 5]
        assert ck.latest_step() == 5
        restored, extra = ck.restore(4, {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    np.testing.assert_array_equal(restored["x"], np.full((3,), 4.0))
    assert extra == {"step": 4}


def test_latest_step_ignores_partial_dirs(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(3, {"x": jnp.ones((2,))}, {})
    # What orbax leaves behind when a save dies before its final rename (current and older
    # naming), plus a bare step directory with none of the items.
    partial = tmp_path / "7.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    partial.mkdir(parents=True)
    (partial / "_METADATA").write_text("{")
    (tmp_path / "9.orbax-checkpoint-tmp-1700000000123").mkdir()
    (tmp_path / "8").mkdir()
    (tmp_path / "notes").mkdir()
    ck = Checkpointer(tmp_path)
    assert ck.all_steps() == [3]
    assert ck.latest_step() == 3
    for bad_step in (7, 8, 9):
        msg = rf"no finalized checkpoint for step {bad_step}.*\[3\]"
        with pytest.raises(ValueError, match=msg):
            ck.restore(bad_step, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    # The next save clears the stale temporary directories.
    ck.save(4, {"x": jnp.ones((2,))}, {})
    ck.close()
    assert sorted(os.listdir(tmp_path)) == ["3", "4", "8", "notes"]
    assert ck.latest_step() == 4


def test_killed_during_async_save_leaves_previous_checkpoint(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        import jax.numpy as jnp
        from migjax.checkpointing import Checkpointer
        ck = Checkpointer(sys.argv[1], keep=3, async_save=True)
        ck.save(1, {"a": jnp.arange(8.0)}, {"it": 1})
        ck.wait()
        real_rename = os.rename
        def dying_rename(src, dst, *args, **kwargs):
            if ".orbax-checkpoint-tmp" in os.fspath(src):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst, *args, **kwargs)
        os.rename = dying_rename
        ck.save(2, {"a": jnp.arange(8.0) + 1}, {"it": 2})
        ck.wait()
        print("finished without being killed")
    """)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 1
    state, extra = ck.restore(None, {"a": jax.ShapeDtypeStruct((8,), jnp.float32)})
    np.testing.assert_array_equal(state["a"], np.arange(8.0))
    assert extra == {"it": 1}
    with pytest.raises(ValueError, match="step 2"):
        ck.restore(2, {"a": jax.ShapeDtypeStruct((8,), jnp.float32)})
    ck.save(2, {"a": jnp.zeros((8,))}, {"it": 2})
    ck.close()
    assert ck.all_steps() == [1, 2]


def test_restore_from_other_architecture_names_key_and_shapes(tmp_path):
    state = _train_state(d_model=4)
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(5, state, {})
        wider = _abstract(_train_state(d_model=8))
        with pytest.raises(ValueError) as info:
            ck.restore(5, wider)
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "5") in msg
    # The first leaf in flattening order is the first Adam moment of params/embed.
    assert "['opt_state'][0].mu['embed'] has shape (7, 4) float32" in msg
    assert "expects (7, 8) float32" in msg

    other = _abstract(state)
    other["params"]["extra_layer"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(ValueError, match=r"\['params'\]\['extra_layer'\] is missing"):
            ck.restore(5, other)


def test_restore_errors_missing_directory_and_step(tmp_path):
    missing = tmp_path / "nope"
    ck = Checkpointer(missing)
    assert ck.latest_step() is None
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        ck.restore(1, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert not missing.exists()
    missing.mkdir()
    with pytest.raises(ValueError, match=f"no finalized checkpoint in {missing}"):
        ck.restore(None, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_save_rejects_bad_extra_and_duplicate_step(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ck:
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            ck.save(1, {"x": jnp.ones(2)}, {"arr": np.ones(2)})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            ck.save(1, {"x": jnp.ones(2)}, {"lr": float("inf")})
        ck.save(1, {"x": jnp.ones(2)}, {})
        with pytest.raises(ValueError, match="step 1 already exists"):
            ck.save(1, {"x": jnp.ones(2)}, {})
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path, keep=0)


def _corrupt(step_dir):
    """Overwrites every file of a checkpoint's state item with garbage, as a bad disk would."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    states = {s: {"x": jnp.full((3,), float(s))} for s in (1, 2, 3)}
    abstract = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        for s, state in states.items():
            ck.save(s, state, {"step": s})
    _corrupt(tmp_path / "3")
    said = []
    with Checkpointer(tmp_path, async_save=False) as ck:
        with pytest.raises(checkpointing.UnreadableCheckpointError, match=str(tmp_path / "3")):
            ck.restore(3, abstract)
        step, restored, extra = ck.restore_latest(abstract, warn=said.append)
        assert (step, extra) == (2, {"step": 2})
        np.testing.assert_array_equal(restored["x"], states[2]["x"])
        assert ck.all_steps() == [1, 2]  # moved aside, so the resumed run can save step 3
        ck.save(3, states[3], {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "3.unreadable"]
    assert any(f"cannot restore checkpoint {tmp_path / '3'}" in m for m in said)
    assert any("resuming from checkpoint 2" in m for m in said)
    assert all("\n" not in m for m in said)

    for s in ("1", "2", "3"):
        _corrupt(tmp_path / s)
    with Checkpointer(tmp_path, async_save=False) as ck:
        with pytest.raises(checkpointing.UnreadableCheckpointError,
                           match=f"delete {tmp_path / '3'} {tmp_path / '2'} {tmp_path / '1'}"):
            ck.restore_latest(abstract, warn=said.append)
        assert ck.all_steps() == [1, 2, 3]  # nothing moved when nothing can be read


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Outputs get 0666 less the umask, like any new file, not mkstemp's 0600: a colleague,
    TensorBoard or a web server running as another user can read what the umask allows."""
    from migjax.metrics import MetricsWriter
    from migjax.viz import write_html

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "summary.json", {"x": 1})
        write_html(tmp_path / "samples" / "s.html", "<p>x</p>")
        with MetricsWriter(tmp_path, tensorboard=False) as w:
            w.write(1, {"x": 1.0})
        with Checkpointer(tmp_path / "checkpoints", async_save=False) as ck:
            ck.save(1, {"x": jnp.ones((2,))}, {"step": 1})
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path) for f in names]
    assert len(files) > 5
    modes = {os.path.relpath(f, tmp_path): oct(os.stat(f).st_mode & 0o777) for f in files}
    assert set(modes.values()) == {oct(want)}, modes
