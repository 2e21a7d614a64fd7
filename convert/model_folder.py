"""Write a model folder from HF-named tensors: what ``from_hf`` and ``from_gguf`` share.

:func:`check_keys` checks a checkpoint's tensor names and shapes against its config before
any tensor is read; :func:`stream_groups` maps ``(hf_key, array)`` pairs through
:mod:`convert.keymap` and yields each layer's parameters as soon as the layer is complete;
:func:`write_converted` writes them group by group (the peak is about one layer, not the
model) with the config and extra files, into a folder that appears whole or not at all.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from flax.traverse_util import unflatten_dict

from convert.keymap import Entry, ar_twin, entries
from orthrus_jax.checkpoint import LAYERS, ParamWriter, save_config
from orthrus_jax.cli import InputError
from orthrus_jax.config import DTYPE_NAMES, DTYPES, ModelConfig, dtype_name, numpy_dtype
from orthrus_jax.folders import staging_dir


class ConversionError(InputError):
    """A checkpoint that does not match its config (missing key, wrong shape, ...).
    :func:`write_converted` puts the checkpoint's path in front of the message."""


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


def _listing(keys: list[str]) -> str:
    return f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"


def check_keys(config: ModelConfig, keys: Mapping[str, tuple[int, ...]]) -> tuple[bool, list[str]]:
    """Check a checkpoint's tensor names -> shapes against ``config`` (no data read).

    Every AR key is required; ``*_diff`` keys must be all present or all absent.
    Returns whether the diffusion tensors are present and the keys the table does not
    know (unused)."""
    table = {e.hf_key: e for e in entries(config)}
    for key, shape in keys.items():
        e = table.get(key)
        if e is not None and tuple(shape) != e.hf_shape:
            raise ConversionError(f"tensor {key} has shape {tuple(shape)}, "
                                  f"expected {e.hf_shape} from config.json")
    missing = [k for k, e in table.items() if not e.diffusion and k not in keys]
    if missing:
        raise ConversionError(f"{len(missing)} expected tensor(s) missing: {_listing(missing)}")
    diff = [k for k, e in table.items() if e.diffusion]
    present = [k for k in diff if k in keys]
    if present and len(present) < len(diff):
        absent = [k for k in diff if k not in keys]
        raise ConversionError(f"partial diffusion view: {len(absent)} *_diff tensor(s) "
                              f"missing: {_listing(absent)}")
    return bool(present), [k for k in keys if k not in table]


def stream_groups(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                  keys: Mapping[str, tuple[int, ...]], dtype: str = "float32"
                  ) -> Iterator[dict]:
    """Parameter groups of the model folder format (see :class:`ParamWriter`) from HF
    tensors: each non-layer tensor at once, each layer as soon as its last tensor is read
    (with diffusion tensors copied from the AR ones when the checkpoint has none).

    ``keys`` (HF name -> shape, from the checkpoint's headers) is checked first
    (:func:`check_keys`); ``tensors`` must then yield exactly those tensors, each once.
    Only the layers not yet complete are held.
    """
    has_diff, _ = check_keys(config, keys)
    np_dtype = numpy_dtype(dtype)
    table = entries(config)
    wanted = {e.hf_key: e for e in table if e.hf_key in keys}
    copies: dict[int, list[Entry]] = {}  # diffusion tensors to copy from the AR ones
    if not has_diff:
        for e in table:
            if e.diffusion:
                copies.setdefault(e.layer, []).append(e)
    remaining: dict[int | None, set[str]] = {}
    for key, e in wanted.items():
        remaining.setdefault(e.layer, set()).add(key)
    pending: dict[int, dict[tuple[str, ...], np.ndarray]] = {}
    for key, value in tensors:
        e = wanted.get(key)
        if e is None:
            continue
        if key not in remaining.get(e.layer, ()):
            raise ConversionError(f"tensor {key} appears twice")
        if tuple(value.shape) != e.hf_shape:
            raise ConversionError(f"tensor {key} has shape {tuple(value.shape)}, "
                                  f"expected {e.hf_shape} from config.json")
        param = e.to_param(value).astype(np_dtype)
        del value
        remaining[e.layer].discard(key)
        if e.layer is None:
            yield unflatten_dict({e.path: param})
            continue
        group = pending.setdefault(e.layer, {})
        group[e.path[1:]] = param
        if not remaining[e.layer]:
            for d in copies.get(e.layer, ()):
                group[d.path[1:]] = group[ar_twin(d)[1:]]
            yield {LAYERS: {str(e.layer): unflatten_dict(pending.pop(e.layer))}}
    unread = sorted(k for left in remaining.values() for k in left)
    if unread:
        raise ConversionError(f"{len(unread)} tensor(s) listed but never read: "
                              f"{_listing(unread)}")


def build_params(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                 dtype: str = "float32") -> tuple[dict, list[str]]:
    """Map HF tensors onto a parameter pure dict in memory (numpy, stacked over layers),
    with the checks of :func:`stream_groups`. Returns the params and the unused HF keys."""
    tensors = list(tensors)
    keys: dict[str, tuple[int, ...]] = {}
    for key, value in tensors:
        if key in keys:
            raise ConversionError(f"tensor {key} appears twice")
        keys[key] = tuple(value.shape)
    _, unused = check_keys(config, keys)
    params: dict = {}
    layers: list[dict] = [{} for _ in range(config.num_hidden_layers)]
    for group in stream_groups(config, tensors, keys, dtype):
        if LAYERS in group:
            (i, layer), = group[LAYERS].items()
            layers[int(i)] = layer
        else:
            params |= group
    params[LAYERS] = _stack_layers(layers)
    return params, unused


def _stack_layers(layers: list[dict]) -> dict:
    return {k: _stack_layers([layer[k] for layer in layers]) if isinstance(v, dict)
            else np.stack([layer[k] for layer in layers]) for k, v in layers[0].items()}


def write_converted(
    dst: str | Path,
    hf_config: dict,
    tensors: Iterable[tuple[str, np.ndarray]],
    extra_files: dict[str, str | bytes] | None = None,
    *,
    keys: Mapping[str, tuple[int, ...]],
    dtype: str | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    force: bool = False,
    source: str = "config.json",
    checkpoint: str | None = None,
) -> Path:
    """Convert HF-named tensors and write the model folder ``dst`` atomically, one layer
    at a time.

    ``keys``: every tensor name ``tensors`` yields, with its shape (from the checkpoint's
    headers): checked against the config before any tensor is read.

    ``dtype`` is the parameter dtype to write; None keeps the stored one (see
    :func:`stored_dtype`). ``block_size`` / ``mask_token_id`` override the config's; the
    mask token is required (from the config or the argument). ``extra_files``
    (name -> content) are copied in. With ``force`` an existing ``dst`` is replaced, only
    once the new one is complete. ``source`` names the config in errors, ``checkpoint``
    (default: ``source``) the tensors' file or folder.
    """
    try:
        return _write_converted(dst, hf_config, tensors, extra_files, keys=keys, dtype=dtype,
                                block_size=block_size, mask_token_id=mask_token_id,
                                force=force, source=source)
    except ConversionError as e:
        raise ConversionError(f"{checkpoint or source}: {e}") from None


def _write_converted(dst, hf_config, tensors, extra_files, *, keys, dtype, block_size,
                     mask_token_id, force, source) -> Path:
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
    _, unused = check_keys(config, keys)
    if unused:
        print(f"warning: {len(unused)} unused tensor(s) in the checkpoint: "
              f"{_listing(unused)}", file=sys.stderr)

    with staging_dir(dst, force) as tmp:
        save_config(config, tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        with ParamWriter(tmp) as writer:
            for group in stream_groups(config, tensors, keys, dtype):
                writer.write(group)
    return dst
