"""Logical axis names, the rules table that maps them to mesh axes, and mesh construction.

Every weight and cache dimension carries a logical name (``vocab``, ``embed``, ``q_heads``,
...). A rules table maps each name to zero, one or several mesh axes (``data``, ``fsdp``,
``tensor``); :func:`logical_to_spec` turns a tuple of names into a ``PartitionSpec`` and
rejects a spec that would use one mesh axis twice or split a dimension unevenly.
:func:`state_shardings` / :func:`shard_model` apply it to every variable of a model state
(each ``nnx.Variable`` carries its ``logical_axes`` as metadata).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]
ModuleT = TypeVar("ModuleT", bound=nnx.Module)

# Logical axis -> mesh axes. Weights shard their "embed" dimension over fsdp and their
# head / MLP / vocab dimension over tensor; activations and caches shard batch over data
# and fsdp. Names absent from the table are replicated.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "cache_seq": None,
    "seq": None,
}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
    name: str = "array",
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names.

    Mesh axes that the mesh lacks are ignored. Raises ``ValueError`` when one mesh axis
    would shard two dimensions, or (with ``shape``) when a dimension is not divisible by
    the number of shards it would be split into.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: dict[str, str] = {}
    spec: list[MeshAxes] = []
    for dim, logical in enumerate(logical_axes):
        mesh_axes = tuple(a for a in _as_tuple(rules.get(logical)) if a in mesh.shape)
        for axis in mesh_axes:
            if axis in used:
                raise ValueError(
                    f"{name}: mesh axis {axis!r} is used by logical axes {used[axis]!r} and "
                    f"{logical!r}; a mesh axis may shard only one dimension"
                )
            used[axis] = str(logical)
        if shape is not None and mesh_axes:
            shards = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % shards:
                raise ValueError(
                    f"{name}: dimension {dim} ({logical!r}, size {shape[dim]}) is not divisible "
                    f"by {shards} shards of mesh axes {mesh_axes}"
                )
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
    name: str = "array",
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape, name))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None,
                      name: str = "parameter") -> NamedSharding:
    """The ``NamedSharding`` of one variable, from its ``logical_axes`` and ``rules``."""
    spec = logical_to_spec(var.get_metadata()["logical_axes"], mesh, rules,
                           var.get_value().shape, name)
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A ``NamedSharding`` in place of every variable of ``state`` (a prefix tree of it,
    usable with ``jax.device_put`` and as ``jax.jit`` shardings)."""
    return jax.tree.map_with_path(
        lambda path, var: variable_sharding(var, mesh, rules, _path_name(path)),
        state, is_leaf=_is_var)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A state of ``NamedSharding`` per parameter of ``model``."""
    return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: ModuleT, mesh: Mesh, rules: Rules | None = None) -> ModuleT:
    """Place every parameter of ``model`` on ``mesh`` (in place) and return it."""
    shardings = param_shardings(model, mesh, rules)
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda v, s: jax.device_put(v, s), state, shardings,
                                   is_leaf=_is_var))
    return model


def parse_mesh_shape(text: str) -> dict[str, int]:
    """Parse ``"data=2,fsdp=1,tensor=4"``; omitted axes get size 1, one axis may be -1."""
    shape = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in MESH_AXES:
            raise ValueError(
                f"mesh {text!r}: expected AXIS=N with AXIS in {MESH_AXES}, got {part!r}"
            )
        try:
            shape[key] = int(value)
        except ValueError as e:
            raise ValueError(f"mesh {text!r}: size of {key!r} is not an integer: {value!r}") from e
    return shape


def make_mesh(shape: Mapping[str, int] | str | None = None, devices=None) -> Mesh:
    """A ``Mesh`` over ``MESH_AXES`` on the first devices it needs. ``shape`` sizes may
    include one -1 (all remaining devices); by default every device goes on ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    sizes = {a: 1 for a in MESH_AXES} | dict(shape or {"data": -1})
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by {known}")
        sizes[free[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total > len(devices):
        raise ValueError(
            f"mesh {sizes} needs {total} devices, but {len(devices)} are available"
        )
    grid = np.asarray(devices[:total]).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)
