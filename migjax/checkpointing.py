"""Saving and restoring the train state with orbax, and atomic writes of small text files.

A checkpoint is one orbax step directory `DIR/<step>/` holding three items:

    state/      the train-state pytree (orbax StandardSave: arrays, shardings kept)
    extra/      a JSON dict (data-iterator state, resolved config, ...)
    manifest/   JSON list of [key path, shape, dtype] for every array leaf of `state`

The manifest lets `restore` compare the checkpoint with the model's abstract state and
fail with a readable message before orbax touches the arrays. Orbax writes each step
under a temporary name (`<step>.orbax-checkpoint-tmp...`) and renames it when complete,
so only directories named by a bare step number count as checkpoints; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

try:
    from orbax.checkpoint.path import step as ocp_step
except ImportError:  # layout of a future orbax; the item check below still applies
    ocp_step = None

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
MANIFEST_ITEM = "manifest"
_ITEMS = (STATE_ITEM, EXTRA_ITEM, MANIFEST_ITEM)
TMP_MARKER = ".orbax-checkpoint-tmp"
MANIFEST_VERSION = 1
UNREADABLE_SUFFIX = ".unreadable"  # a damaged checkpoint moved aside by `restore_latest`


class UnreadableCheckpointError(ValueError):
    """A checkpoint whose files cannot be read (as opposed to one of another model)."""


def _create_temp(parent: str, prefix: str) -> tuple[int, str]:
    """A new file `parent/prefix<random>.tmp` opened for writing, with the permissions any other
    new file gets (0666 less the umask; `mkstemp` would make it 0600, unreadable to the
    colleagues, TensorBoard or web server the umask lets read the workdir)."""
    for _ in range(100):
        tmp = os.path.join(parent, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {parent}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a fsynced temp file in the same directory."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = _create_temp(parent, f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as strict JSON (no NaN/Infinity tokens) to `path` atomically."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {os.fspath(path)} as JSON: {e}") from e
    atomic_write_text(path, text + "\n")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tree_manifest(tree: Any) -> list[list]:
    """Lists `[key path, shape, dtype]` for every leaf of `tree`, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        shape = [int(d) for d in np.shape(leaf)]
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        out.append([jax.tree_util.keystr(path), shape, np.dtype(dtype).name])
    return out


def check_manifest(saved: list[list], wanted: list[list], where: str) -> None:
    """Raises ValueError naming the first key whose presence or shape differs."""
    saved_by_key = {key: (tuple(shape), dtype) for key, shape, dtype in saved}
    wanted_keys = set()
    problems = []
    for key, shape, dtype in wanted:
        wanted_keys.add(key)
        if key not in saved_by_key:
            problems.append(f"{key} is missing from the checkpoint (expected shape "
                            f"{tuple(shape)} {dtype})")
        elif saved_by_key[key][0] != tuple(shape):
            got_shape, got_dtype = saved_by_key[key]
            problems.append(f"{key} has shape {got_shape} {got_dtype} in the checkpoint but "
                            f"the model expects {tuple(shape)} {dtype}")
    for key, shape, dtype in saved:
        if key not in wanted_keys:
            problems.append(f"{key} (shape {tuple(shape)} {dtype}) is in the checkpoint but "
                            "not in the model's state")
    if problems:
        more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise ValueError(f"checkpoint {where} does not match the model's state: "
                         f"{problems[0]}{more}")


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a train state plus a JSON `extra` dict."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self._stale_tmp_removed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=_ITEMS,
        )

    # -- listing -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalized checkpoint steps on disk, ascending; in-flight and partial ones excluded."""
        if not os.path.isdir(self.directory):
            return []
        steps = set()
        for name in os.listdir(self.directory):
            if not name.isdigit():
                continue
            step_dir = os.path.join(self.directory, name)
            if all(os.path.isdir(os.path.join(step_dir, item)) for item in _ITEMS):
                steps.add(int(name))
        # Orbax's own finalization test as well (it matters on storage without atomic rename).
        finalized = getattr(ocp_step, "checkpoint_steps", None)
        if finalized is not None and steps:
            steps &= set(finalized(self.directory))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest finalized checkpoint step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, state: Any, extra: Mapping[str, Any]) -> None:
        """Starts saving `state` and `extra` as checkpoint `step` (async unless disabled)."""
        step = int(step)
        try:
            extra = json.loads(json.dumps(dict(extra), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint extra for step {step} is not JSON-serialisable: {e}") \
                from e
        if step in self.all_steps() or step in self._manager.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.directory}")
        if not self._stale_tmp_removed:
            os.makedirs(self.directory, exist_ok=True)
            if jax.process_index() == 0:
                self._remove_stale_tmp_dirs()
            self._manager.reload()
            self._stale_tmp_removed = True
        manifest = {"version": MANIFEST_VERSION, "leaves": tree_manifest(state)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                EXTRA_ITEM: ocp.args.JsonSave(extra),
                MANIFEST_ITEM: ocp.args.JsonSave(manifest),
            }),
            force=True,
        )
        if saved is False:
            raise ValueError(f"orbax declined to save step {step} in {self.directory}")

    def _remove_stale_tmp_dirs(self) -> None:
        """Deletes temporary step directories left by an interrupted earlier run."""
        for name in os.listdir(self.directory):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def wait(self) -> None:
        """Blocks until every pending async save is finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring -----------------------------------------------------------------------

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint `step` (None: the latest) onto `abstract_state`'s shapes,
        dtypes and shardings; returns `(state, extra)`.

        Leaves of `abstract_state` are jax.ShapeDtypeStruct (or arrays); one without a
        sharding lands on the first device. Key paths and shapes must match the checkpoint
        (ValueError naming the first difference); dtypes may differ and are cast.
        """
        if not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint directory {self.directory} does not exist")
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"no finalized checkpoint in {self.directory}")
            step = steps[-1]
        step = int(step)
        where = os.path.join(self.directory, str(step))
        if step not in steps:
            raise ValueError(f"no finalized checkpoint for step {step} in {self.directory} "
                             f"(available steps: {steps})")
        if step not in self._manager.all_steps():
            self._manager.reload()
        try:
            manifest = self._manager.restore(step, args=ocp.args.Composite(**{
                MANIFEST_ITEM: ocp.args.JsonRestore()}))[MANIFEST_ITEM]
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise UnreadableCheckpointError(
                f"cannot read the manifest of checkpoint {where}: {_first_line(e)}") from e
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        check_manifest(manifest["leaves"], tree_manifest(abstract), where)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract),
                EXTRA_ITEM: ocp.args.JsonRestore(),
            }))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise UnreadableCheckpointError(
                f"cannot restore checkpoint {where}: {_first_line(e)}") from e
        return restored[STATE_ITEM], dict(restored[EXTRA_ITEM])

    def restore_latest(self, abstract_state: Any, warn=print) -> tuple[int, Any, dict]:
        """`(step, state, extra)` of the newest checkpoint that can be read. One that cannot
        (damaged or missing files) is passed over, saying so through `warn`, and once an older
        one restores it is moved aside to `<step>.unreadable` (so later saves do not collide
        with it). Raises UnreadableCheckpointError naming the folders to delete when none can
        be read; a checkpoint of another model raises ValueError as `restore` does."""
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no finalized checkpoint in {self.directory}")
        broken = []
        for step in reversed(steps):
            try:
                state, extra = self.restore(step, abstract_state)
            except UnreadableCheckpointError as e:
                broken.append(step)
                warn(f"{e}; trying the checkpoint before it")
                continue
            for b in broken:
                self._move_aside(b, warn)
            if broken:
                warn(f"resuming from checkpoint {step}, the newest that can be read")
            return step, state, extra
        folders = " ".join(os.path.join(self.directory, str(b)) for b in broken)
        raise UnreadableCheckpointError(f"no checkpoint in {self.directory} can be read; delete "
                                        f"{folders} to start over")

    def _move_aside(self, step: int, warn) -> None:
        src = os.path.join(self.directory, str(step))
        dst, n = src + UNREADABLE_SUFFIX, 1
        while os.path.exists(dst):
            dst, n = f"{src}{UNREADABLE_SUFFIX}.{n}", n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
            warn(f"moved the unreadable checkpoint {src} to {dst}")
        self._manager.reload()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
