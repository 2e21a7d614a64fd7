"""Write a model folder from HF-named tensors: what ``from_hf`` and ``from_gguf`` share.

:func:`build_params` maps ``(hf_key, array)`` pairs through :mod:`convert.keymap` with a
shape check; :func:`write_converted` adds the config and extra files and writes the folder
atomically (an Orbax checkpoint under ``params/`` and an HF-compatible ``config.json``).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

from convert.keymap import Entry, ar_twin, entries, get_path, set_path
from orthrus_jax.checkpoint import save_params
from orthrus_jax.config import DTYPE_NAMES, DTYPES, ModelConfig, dtype_name, numpy_dtype
from orthrus_jax.folders import staging_dir


class ConversionError(ValueError):
    """A checkpoint that does not match its config (missing key, wrong shape, ...)."""


def stored_dtype(hf_config: dict,
                 tensors: Iterable[tuple[str, np.ndarray]]) -> tuple[str, Iterable]:
    """The dtype a checkpoint is stored in, and ``tensors`` (to iterate from the start).

    The config's ``dtype`` / ``torch_dtype`` when it is one of :data:`DTYPES`, else the
    first tensor's dtype, else float32."""
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if stored in DTYPES:
        return stored, tensors
    it = iter(tensors)
    first = next(it, None)
    if first is None:
        return "float32", it
    return dtype_name(first[1].dtype) or "float32", itertools.chain([first], it)


def build_params(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                 dtype: str = "float32") -> tuple[dict, list[str]]:
    """Map HF tensors onto a parameter pure dict (numpy, stacked over layers).

    Every AR key is required; ``*_diff`` keys must be all present or all absent (then
    the diffusion tensors are copies of the AR ones). Returns the params and the HF keys
    the table does not know (unused).
    """
    np_dtype = numpy_dtype(dtype)
    table = {e.hf_key: e for e in entries(config)}
    params: dict = {}
    for e in table.values():
        shape = e.to_param(np.empty(e.hf_shape, np.bool_)).shape
        full = shape if e.layer is None else (config.num_hidden_layers, *shape)
        try:
            get_path(params, e.path)
        except KeyError:
            set_path(params, e.path, np.empty(full, np_dtype))
    seen: set[str] = set()
    unused: list[str] = []
    for key, value in tensors:
        e = table.get(key)
        if e is None:
            unused.append(key)
            continue
        if key in seen:
            raise ConversionError(f"tensor {key} appears twice")
        if tuple(value.shape) != e.hf_shape:
            raise ConversionError(f"tensor {key} has shape {tuple(value.shape)}, "
                                  f"expected {e.hf_shape} from config.json")
        _fill(params, e, e.to_param(value).astype(np_dtype))
        seen.add(key)
    diff = [k for k, e in table.items() if e.diffusion]
    missing = [k for k, e in table.items() if not e.diffusion and k not in seen]
    if missing:
        raise ConversionError(f"{len(missing)} expected tensor(s) missing: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    present = [k for k in diff if k in seen]
    if present and len(present) < len(diff):
        absent = [k for k in diff if k not in seen]
        raise ConversionError(f"partial diffusion view: {len(absent)} *_diff tensor(s) missing: "
                              f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}")
    if not present:
        for k in diff:
            e = table[k]
            source = get_path(params, ar_twin(e))
            _fill(params, e, source[e.layer] if e.layer is not None else source)
    return params, unused


def _to_device(tree: dict) -> dict:
    """Move numpy leaves to JAX arrays in place, one at a time, dropping each numpy
    buffer as it goes, so the model is never held twice (Orbax would copy them all)."""
    for key, value in tree.items():
        tree[key] = _to_device(value) if isinstance(value, dict) else jax.numpy.asarray(value)
        del value
    return tree


def _fill(params: dict, e: Entry, value: np.ndarray) -> None:
    target = get_path(params, e.path)
    if e.layer is None:
        target[...] = value
    else:
        target[e.layer] = value


def write_converted(
    dst: str | Path,
    hf_config: dict,
    tensors: Iterable[tuple[str, np.ndarray]],
    extra_files: dict[str, str | bytes] | None = None,
    *,
    dtype: str | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    force: bool = False,
    source: str = "config.json",
) -> Path:
    """Convert HF-named tensors and write the model folder ``dst`` atomically.

    ``dtype`` is the parameter dtype to write; None keeps the stored one (see
    :func:`stored_dtype`). ``block_size`` / ``mask_token_id`` override the config's; the
    mask token is required (from the config or the argument). ``extra_files``
    (name -> content) are copied in. With ``force`` an existing ``dst`` is replaced, only
    once the new one is complete.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPE_NAMES)}")
    dst = Path(dst)
    if dst.exists() and not force:  # fail before reading any tensor
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    overrides: dict = {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}
    if block_size is not None:
        overrides["block_size"] = block_size
    if mask_token_id is not None:
        overrides["mask_token_id"] = mask_token_id
    config = ModelConfig.from_hf_dict(hf_config, source=source, **overrides)
    if config.mask_token_id is None:
        raise ValueError(f"{source} has no mask_token_id: pass --mask-token-id with an unused "
                         "token id (for Qwen3's 151936-row vocabulary: 151669)")
    if dtype is None:  # the config is valid: only now look at the tensors for their dtype
        dtype, tensors = stored_dtype(hf_config, tensors)
        config = config.replace(param_dtype=dtype, dtype=dtype)
    params, unused = build_params(config, tensors, dtype)
    if unused:
        print(f"warning: {len(unused)} unused tensor(s) in the checkpoint: "
              f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}", file=sys.stderr)

    with staging_dir(dst, force) as tmp:
        config.save(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        save_params(tmp, _to_device(params))
    return dst
