"""Device meshes and the rules that map logical parameter/activation axes onto them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from migjax.models.transformer import PARAM_AXES

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated). Data, so that a config
# can pass its own rules.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes of `shape` (e.g. {"data": 2, "fsdp": 2, "tensor": 2}), in that
    order, over `devices` (default: all devices). Axes are of the automatic (GSPMD) kind."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = tuple(shape), tuple(int(s) for s in shape.values())
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh shape {dict(shape)}: every axis size must be >= 1")
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(shape)} needs {math.prod(sizes)} devices, but {len(devices)} "
            f"devices are available"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(sizes, names, axis_types, devices=devices)


def _rule_table(rules) -> dict:
    table = dict(rules)
    if len(table) != len(tuple(rules)):
        raise ValueError(f"sharding rules name a logical axis twice: {rules}")
    return table


def logical_to_spec(axes: Sequence[str | None], rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have logical names `axes`.

    A mesh axis already used by an earlier dimension is dropped (one mesh axis cannot shard two
    dimensions), as are mesh axes missing from `mesh` and, when `shape` is given, mesh axes whose
    size does not divide what is left of the dimension (that dimension stays less sharded).
    Logical axes without a rule are replicated.
    """
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept, prod = [], 1
        for m in targets:
            if m in used or m not in mesh.shape:
                continue
            size = mesh.shape[m]
            if shape is not None and shape[i] % (prod * size):
                continue
            kept.append(m)
            prod *= size
            used.add(m)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(params_shapes: Mapping[str, Sequence[int]], mesh: Mesh,
                    rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    """{name: NamedSharding} for the decoder's parameters, from their logical axes."""
    out = {}
    for name, shape in params_shapes.items():
        shape = tuple(getattr(shape, "shape", shape))
        if name not in PARAM_AXES:
            raise KeyError(f"parameter {name!r} has no logical axes in PARAM_AXES")
        out[name] = NamedSharding(mesh, logical_to_spec(PARAM_AXES[name], rules, mesh, shape))
    return out


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of an [N, ...] array with `ndim` dimensions: N over the batch axes, the rest
    replicated. N must be a multiple of the product of the batch mesh axes."""
    axes = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


def batch_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """The number of shards along N under `batch_sharding` (N must be a multiple of it)."""
    spec = logical_to_spec(("batch",), rules, mesh)
    entry = spec[0] if len(spec) else None
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))


def gather(x) -> np.ndarray:
    """The full value of an array on this host: one that spans processes is gathered; a
    host-local one (numpy, or on this process's devices) is already whole."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
