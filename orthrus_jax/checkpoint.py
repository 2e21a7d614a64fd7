"""Saving and loading a model folder: ``config.json`` plus an Orbax checkpoint of the
parameters under ``params/``, optionally restored straight onto a mesh.

Also the split of a model into its frozen backbone and trainable diffusion subtree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from orthrus_jax.config import ModelConfig
from orthrus_jax.model import OrthrusLM
from orthrus_jax.sharding import Rules, param_shardings

PARAMS_DIR = "params"
# A head's measured acceptance (written by infer.calibrate and training evaluation).
ACCEPTANCE_FILE = "acceptance.json"


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(config: ModelConfig) -> OrthrusLM:
    """The model with ``ShapeDtypeStruct`` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: OrthrusLM(config, rngs=nnx.Rngs(0)))


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
