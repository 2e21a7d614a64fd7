"""Saving and loading a model folder: ``config.json`` plus an Orbax checkpoint of the
parameters under ``params/``, restored straight onto a mesh and into the form its consumer
runs (per-layer arrays for decoding, ``[L, ...]`` stacks for training).

The folder's format version is ``config.json``'s ``orthrus_format`` field:

- **2** (written now): the layer weights are stored per layer, ``layers.<i>.<name>``, so
  a writer emits a layer at a time (:class:`ParamWriter`, an Orbax partial save) and a
  reader restores them without ever holding a second copy: the decoder takes the layers as
  stored, training stacks one weight kind at a time.
- **1** (absent field; folders of earlier versions): stacked ``[L, ...]`` weights, read
  whole; still loaded.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from orthrus_jax.checksum import array_checksum
from orthrus_jax.cli import InputError, first_line
from orthrus_jax.config import ModelConfig
from orthrus_jax.heap import release_memory
from orthrus_jax.layers import PROJECTIONS
from orthrus_jax.model import (
    OrthrusLM,
    in_out_layer,
    is_unstacked,
    layer_sharding,
    unstack_layers,
)
from orthrus_jax.sharding import Rules, param_shardings

PARAMS_DIR = "params"
# Each stored parameter's dtype and checksum (orthrus_jax.checksum), written beside params/:
# Orbax reads a flipped byte inside array data back as a different number, silently.
CHECKSUMS_FILE = "checksums.json"
# A head's measured acceptance (written by infer.calibrate and training evaluation).
ACCEPTANCE_FILE = "acceptance.json"
FORMAT_FIELD = "orthrus_format"
FORMAT_VERSION = 2  # per-layer parameter groups (format 1: stacked, no field)
LAYERS = "layers"
# Bytes read from a checkpoint in one go: the memory a load needs beyond the weights.
READ_BYTES = 64 * 2**20


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(config: ModelConfig) -> OrthrusLM:
    """The model with ``ShapeDtypeStruct`` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: OrthrusLM(config, rngs=nnx.Rngs(0)))


def save_config(config: ModelConfig, directory: str | Path) -> Path:
    """Write ``config.json`` of a model folder: the HF config plus ``orthrus_format``."""
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(config.to_hf_dict() | {FORMAT_FIELD: FORMAT_VERSION}, indent=2)
                    + "\n")
    return path


def folder_format(directory: str | Path) -> int:
    """The format version of model folder ``directory`` (1 when config.json has none)."""
    path = Path(directory) / "config.json"
    try:
        version = json.loads(path.read_text(encoding="utf-8")).get(FORMAT_FIELD, 1)
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path}: {FORMAT_FIELD}={version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise InputError(f"{path}: model folder format {version} is newer than this "
                         f"orthrus-jax reads ({FORMAT_VERSION}): upgrade orthrus-jax")
    return version


class ParamWriter:
    """Writes a parameter checkpoint ``DIR/params`` one group at a time.

    Each :meth:`write` adds a pure-dict fragment (``{"embed_tokens": a}``,
    ``{"layers": {"3": {...}}}``) to an Orbax partial save; :meth:`close` finalizes it.
    Memory holds one group at a time (freed pages are handed back after each write). Use as
    a context manager; an exception leaves only
    Orbax's staging folder behind (inside the caller's staging folder).
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory).absolute() / PARAMS_DIR
        self._checksums: dict[str, dict[str, str]] = {}

    def write(self, group: dict) -> None:
        for path, value in flatten_dict(group).items():
            self._checksums[".".join(path)] = {"dtype": str(value.dtype),
                                                "checksum": array_checksum(value)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ocp_v1.partial.save(self.path, group)
        release_memory()

    def close(self) -> None:
        if not self._checksums:
            raise ValueError("no parameters were written")
        ocp_v1.partial.finalize(self.path)
        if jax.process_index() == 0:
            (self.path.parent / CHECKSUMS_FILE).write_text(
                json.dumps(self._checksums, indent=0, sort_keys=True) + "\n")

    def __enter__(self) -> ParamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def param_groups(model: OrthrusLM) -> Iterator[dict]:
    """The parameters of ``model`` (stacked or per layer) as format-2 groups: the
    non-layer tensors, then one group per layer (a stacked weight is sliced one layer at a
    time, so at most one layer is copied)."""
    params = nnx.to_pure_dict(nnx.state(model))
    layers = params.pop(LAYERS)
    yield params
    for i in range(model.config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], layers, is_leaf=is_unstacked)  # noqa: B023
        if model.out_in:  # stored in the training form
            layer = {kind: ({name: in_out_layer(a, name) if name in PROJECTIONS else a
                             for name, a in part.items()} if isinstance(part, dict) else part)
                     for kind, part in layer.items()}
        yield {LAYERS: {str(i): layer}}


def save_model(model: OrthrusLM, directory: str | Path) -> Path:
    """Write ``config.json`` and ``params/`` into an existing folder ``directory``.

    With several processes every one must call it (the Orbax save is collective); only
    process 0 writes ``config.json``."""
    directory = Path(directory)
    if jax.process_index() == 0:
        save_config(model.config, directory)
    with ParamWriter(directory) as writer:
        for group in param_groups(model):
            writer.write(group)
    return directory


def load_model(
    directory: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    per_layer: bool = False,
) -> OrthrusLM:
    """Load a model folder written by ``convert.from_hf`` / :func:`save_model`.

    Each tensor is read straight onto its shard of ``mesh`` (by the logical-axis
    ``rules``) or onto the default device, and cast to ``param_dtype`` (default: as
    stored). ``dtype`` sets the compute dtype (default: ``param_dtype``). ``per_layer``:
    the layer weights as tuples of per-layer arrays (the decoder's form,
    :func:`orthrus_jax.model.unstack_layers`) instead of ``[L, ...]`` stacks (training's).
    """
    directory = Path(directory)
    params_path = directory.absolute() / PARAMS_DIR
    if not params_path.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint at {params_path}")
    config = ModelConfig.from_json_file(directory / "config.json")
    version = folder_format(directory)
    param_dtype = param_dtype or config.param_dtype
    config = config.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    graphdef, state, target = param_targets(config, mesh, rules)
    if version == 1:
        values = _restore_stacked(params_path, target)
    else:
        values = _restore_groups(params_path, target, config.num_hidden_layers, per_layer)
    model = merge_values(graphdef, state, values)
    return unstack_layers(model) if version == 1 and per_layer else model


def merge_values(graphdef: nnx.GraphDef, state: nnx.State,
                 values: dict[tuple[str, ...], Any]) -> OrthrusLM:
    """The model of :func:`param_targets`' ``(graphdef, state)`` with each parameter's
    value taken from ``values`` by its path (as in ``target``): an array, a tuple of
    per-layer arrays, or a ``ShapeDtypeStruct``."""
    state = jax.tree.map_with_path(lambda path, var: var.replace(value=values[_key(path)]),
                                   state, is_leaf=_is_var)
    return nnx.merge(graphdef, state)


def read_param_groups(directory: str | Path, param_dtype: str | None = None
                      ) -> Iterator[tuple[int | None, dict[tuple[str, ...], jax.Array]]]:
    """The parameters of a model folder a group at a time, on the default device:
    ``(None, {path: array})`` for the non-layer tensors, then ``(i, {path within the
    layer: array})`` for each layer ``i``. Holds one group (format 1: the whole model)."""
    directory = Path(directory)
    config = ModelConfig.from_json_file(directory / "config.json")
    param_dtype = param_dtype or config.param_dtype
    if folder_format(directory) == 1:
        model = load_model(directory, param_dtype=param_dtype)
        params = flatten_dict(nnx.to_pure_dict(nnx.state(model)))
        yield None, {p: a for p, a in params.items() if p[0] != LAYERS}
        for i in range(config.num_hidden_layers):
            yield i, {p[1:]: a[i] for p, a in params.items() if p[0] == LAYERS}
        return
    _, _, target = param_targets(config.replace(param_dtype=param_dtype))
    params_path = directory.absolute() / PARAMS_DIR
    if not params_path.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint at {params_path}")
    top, layers = _split_layers(target, config.num_hidden_layers)
    _check_stored(params_path, top, layers)
    checksums = read_checksums(directory)
    yield None, _load(params_path, top, checksums)
    for i, layer in enumerate(layers):
        yield i, {p[2:]: a for p, a in _load(params_path, layer, checksums).items()}


def param_targets(config: ModelConfig, mesh: Mesh | None = None, rules: Rules | None = None
             ) -> tuple[nnx.GraphDef, nnx.State, dict[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """The abstract model of ``config`` split as ``(graphdef, state)``, and each
    parameter's ``ShapeDtypeStruct`` by path, placed on its shard of ``mesh`` (by
    ``rules``) or on the default device."""
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state, is_leaf=_is_var)
    else:
        shardings = param_shardings(model, mesh, rules)
    target = {_key(path): jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                               sharding=sharding)
              for (path, var), sharding in zip(_flat_vars(state), jax.tree.leaves(shardings),
                                               strict=True)}
    return graphdef, state, target


def _split_layers(target: dict, num_layers: int) -> tuple[dict, list[dict]]:
    """The stacked ``target``'s non-layer leaves, and each layer's leaves at their stored
    paths (``layers.<i>.<name>``, per-layer shapes and shardings)."""
    top = {p: s for p, s in target.items() if p[0] != LAYERS}
    layers = [{(LAYERS, str(i), *p[1:]): _drop_layer_axis(s)
               for p, s in target.items() if p[0] == LAYERS} for i in range(num_layers)]
    return top, layers


def _flat_vars(state: nnx.State) -> list[tuple[tuple, nnx.Variable]]:
    return jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _restore_stacked(params_path: Path, target: dict) -> dict:
    """A format-1 checkpoint (stacked ``[L, ...]`` leaves), restored whole."""
    with ocp.StandardCheckpointer() as ckpt:
        stored = _read(params_path, lambda: ckpt.metadata(params_path).item_metadata.tree)
        _check_tree(stored, unflatten_dict(target), params_path)
        return flatten_dict(_read(params_path,
                                  lambda: ckpt.restore(params_path, unflatten_dict(target))))


def _read(params_path: Path, read: Callable[[], Any]) -> Any:
    """``read()`` of the checkpoint at ``params_path``; its failures as one InputError
    naming the folder. Orbax and TensorStore raise anything from ``ValueError`` to a bare
    ``Exception`` for a damaged or partial checkpoint, so every exception of the read is
    one of these; the original is chained."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return read()
    except Exception as e:
        raise InputError(f"{params_path}: unreadable parameter checkpoint "
                         f"({type(e).__name__}: {first_line(e)}); convert or save the model "
                         "again") from e


def _load(path: Path, target: dict[tuple[str, ...], Any],
          checksums: dict | None) -> dict[tuple[str, ...], Any]:
    """Orbax partial load of the leaves named in ``target`` (path -> ShapeDtypeStruct),
    each checked against ``checksums`` (:func:`read_checksums`) when read in its stored
    dtype."""
    ctx = ocp_v1.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        values = flatten_dict(_read(path,
                                    lambda: ocp_v1.load_pytree(path, unflatten_dict(target))))
    if checksums is not None:
        for key, value in values.items():
            name = ".".join(key)
            saved = checksums.get(name)
            if not isinstance(saved, dict):
                raise InputError(f"{path.parent / CHECKSUMS_FILE}: no checksum of parameter "
                                 f"{name}; convert or save the model again")
            if saved.get("dtype") == str(value.dtype) \
                    and saved.get("checksum") != array_checksum(value):
                raise InputError(f"{path}: parameter {name} does not match its checksum "
                                 f"(the checkpoint is damaged); convert or save the model "
                                 "again")
    return values


def read_checksums(directory: str | Path) -> dict | None:
    """The parameter checksums of model folder ``directory`` (None for folders written
    before they existed)."""
    path = Path(directory) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        checksums = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); convert or save the model again") from e
    if not isinstance(checksums, dict):
        raise InputError(f"{path}: not an object of parameter checksums; convert or save "
                         "the model again")
    return checksums


def _restore_groups(params_path: Path, target: dict, num_layers: int,
                    per_layer: bool) -> dict:
    """A format-2 checkpoint: the non-layer leaves in one read, then the layer weights in
    reads of about :data:`READ_BYTES` (each onto its per-layer sharding; the read buffers
    released after each, so the peak is the weights plus one read's buffers); each weight
    kind kept per layer or stacked over the layers."""
    top, layers = _split_layers(target, num_layers)
    _check_stored(params_path, top, layers)
    checksums = read_checksums(params_path.parent)
    values = _load(params_path, top, checksums)
    kinds = {p[1:]: s for p, s in target.items() if p[0] == LAYERS}
    parts: dict[tuple[str, ...], list[jax.Array]] = {kind: [None] * num_layers
                                                     for kind in kinds}
    for read in _batched(layers):
        # placed by the layer number in the path: a read comes back in key order, where
        # layer "10" sorts before layer "2"
        for path, value in _load(params_path, read, checksums).items():
            parts[path[2:]][int(path[1])] = value
        release_memory()
    for kind, stacked in kinds.items():
        layer_parts = parts.pop(kind)
        values[(LAYERS, *kind)] = (tuple(layer_parts) if per_layer
                                   else _stack(layer_parts, stacked.sharding))
    return values


def _batched(groups: list[dict]) -> Iterator[dict]:
    """The leaves of ``groups``, in order, as reads of at most :data:`READ_BYTES` each (a
    leaf larger than that is a read of its own)."""
    read: dict = {}
    size = 0
    for group in groups:
        for path, s in group.items():
            n = math.prod(s.shape) * s.dtype.itemsize
            if read and size + n > READ_BYTES:
                yield read
                read, size = {}, 0
            read[path] = s
            size += n
    if read:
        yield read


def _check_stored(params_path: Path, top: dict, layers: list[dict]) -> None:
    """Check a format-2 checkpoint's names and shapes against the expected leaves (see
    :func:`_split_layers`)."""
    stored = _read(params_path, lambda: ocp_v1.pytree_metadata(params_path).metadata)
    if not isinstance(stored, dict):
        raise InputError(f"{params_path}: unreadable parameter checkpoint (its metadata "
                         "holds no parameter tree); convert or save the model again")
    expected = dict(top)
    for layer in layers:
        expected |= layer
    _check_tree(stored, unflatten_dict(expected), params_path)


def _stack(parts: list[jax.Array], sharding: Sharding) -> jax.Array:
    """``[L, ...]`` from ``L`` arrays, placed on ``sharding``; the parts are let go."""
    out = jax.device_put(jnp.stack(parts), sharding)
    parts.clear()
    return out


def _drop_layer_axis(s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """A stacked weight's per-layer ShapeDtypeStruct (its sharding minus the layers axis)."""
    return jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=layer_sharding(s.sharding))


def _check_tree(stored: Any, target: Any, where: Path, prefix: str = "") -> None:
    """Name the first parameter whose presence or shape differs from the config."""
    if isinstance(target, dict):
        if not isinstance(stored, dict):
            raise ValueError(f"{where}: {prefix or 'root'} should be a subtree")
        for key in sorted(set(target) | set(stored)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                raise ValueError(f"{where}: parameter {name} is missing from the checkpoint")
            if key not in target:
                raise ValueError(f"{where}: parameter {name} is not part of this config")
            _check_tree(stored[key], target[key], where, name)
    elif tuple(stored.shape) != tuple(target.shape):
        raise ValueError(f"{where}: parameter {prefix} has shape {tuple(stored.shape)}, "
                         f"config.json implies {tuple(target.shape)}")


def model_from_params(config: ModelConfig, params: dict) -> OrthrusLM:
    """Build a model whose parameters are the given pure dict (arrays are cast to
    ``config.param_dtype``); every parameter of the config must be present."""
    model = abstract_model(config)
    state = nnx.state(model)
    target = nnx.to_pure_dict(state)
    _check_tree(params, target, Path("params"))
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda t, a: jax.numpy.asarray(a, dtype=t.dtype), target, params))
    nnx.update(model, state)
    return model
