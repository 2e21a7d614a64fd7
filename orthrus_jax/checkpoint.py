"""Saving and loading a model folder: ``config.json`` plus an Orbax checkpoint of the
parameters under ``params/``, optionally restored straight onto a mesh.

Also the split of a model into its frozen backbone and trainable diffusion subtree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from orthrus_jax.config import ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.model import OrthrusLM
from orthrus_jax.sharding import Rules, logical_to_spec

PARAMS_DIR = "params"
# A head's measured acceptance (written by infer.calibrate and training evaluation).
ACCEPTANCE_FILE = "acceptance.json"
# Files of an HF folder that travel with a model folder (tokenizer, chat template, ...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def abstract_model(config: ModelConfig) -> OrthrusLM:
    """The model with ``ShapeDtypeStruct`` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: OrthrusLM(config, rngs=nnx.Rngs(0)))


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


def param_shardings(model: OrthrusLM, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A state of ``NamedSharding`` per parameter of ``model``."""
    return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: OrthrusLM, mesh: Mesh, rules: Rules | None = None) -> OrthrusLM:
    """Place every parameter of ``model`` on ``mesh`` (in place) and return it."""
    shardings = param_shardings(model, mesh, rules)
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda v, s: jax.device_put(v, s), state, shardings,
                                   is_leaf=_is_var))
    return model


def save_params(directory: str | Path, params: dict) -> Path:
    """Write a parameter pure dict (nested dict of arrays) as an Orbax checkpoint."""
    path = Path(directory).absolute() / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)
        ckpt.wait_until_finished()
    return path


def save_model(model: OrthrusLM, directory: str | Path) -> Path:
    """Write ``config.json`` and ``params/`` into an existing folder ``directory``.

    With several processes every one must call it (the Orbax save is collective); only
    process 0 writes ``config.json``."""
    directory = Path(directory)
    if jax.process_index() == 0:
        model.config.save(directory)
    save_params(directory, nnx.to_pure_dict(nnx.state(model)))
    return directory


def load_model(
    directory: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
) -> OrthrusLM:
    """Load a model folder written by ``convert.from_hf`` / :func:`save_model`.

    Each tensor is read straight onto its shard of ``mesh`` (by the logical-axis
    ``rules``) or onto the default device, and cast to ``param_dtype`` (default: as
    stored). ``dtype`` sets the compute dtype (default: ``param_dtype``).
    """
    directory = Path(directory)
    params_path = directory.absolute() / PARAMS_DIR
    if not params_path.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint at {params_path}")
    config = ModelConfig.from_json_file(directory / "config.json")
    param_dtype = param_dtype or config.param_dtype
    config = config.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    model = abstract_model(config)
    state = nnx.state(model)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state, is_leaf=_is_var)
    else:
        shardings = param_shardings(model, mesh, rules)
    target = nnx.to_pure_dict(jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s),
        state, shardings, is_leaf=_is_var))
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(params_path).item_metadata.tree
        _check_tree(stored, target, params_path)
        restored = ckpt.restore(params_path, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


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


def split_trainable(model: OrthrusLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, diffusion, backbone)``: the trainable :class:`DiffusionParam` subtree
    and the frozen rest, separated by variable type; ``nnx.merge`` joins them."""
    return nnx.split(model, DiffusionParam, ...)


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


@contextlib.contextmanager
def staging_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dst``; on success it becomes ``dst``.

    On any error the temporary folder is removed and an existing ``dst`` is untouched.
    Without ``force`` an existing ``dst`` is an error before any work is done.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: str | Path, dst: str | Path) -> None:
    """Rename the complete folder ``new`` to ``dst``. An existing ``dst`` is moved aside
    first and removed only after the rename, so some complete ``dst`` exists throughout."""
    new, dst = Path(new), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of folder ``src`` into ``dst``; returns their names."""
    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names
