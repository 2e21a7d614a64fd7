"""``python -m convert.from_hf SRC DST``: import an HF Qwen3-family or Orthrus checkpoint.

Reads ``SRC/config.json`` and ``SRC/*.safetensors`` (one file, or shards listed in
``model.safetensors.index.json``) one tensor at a time, maps every key through
:mod:`convert.keymap` with a shape check, and writes ``DST``: an Orbax checkpoint under
``params/``, an HF-compatible ``config.json`` with ``block_size`` and ``mask_token_id``,
and the tokenizer files of SRC. A checkpoint without ``*_diff`` tensors gets diffusion
tensors copied from the AR ones. DST appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.io import add_output_args, run_cli
from convert.keymap import Entry, ar_twin, entries, get_path, set_path
from orthrus_jax.checkpoint import TOKENIZER_FILES, save_params, staging_dir
from orthrus_jax.config import ModelConfig

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
INDEX_FILE = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A checkpoint that does not match its config (missing key, wrong shape, ...)."""


def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def safetensors_files(src: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    src = Path(src)
    index = src / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    return files


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, array)`` for every tensor, read one at a time."""
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from e


def build_params(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                 dtype: str = "float32") -> tuple[dict, list[str]]:
    """Map HF tensors onto a parameter pure dict (numpy, stacked over layers).

    Every AR key is required; ``*_diff`` keys must be all present or all absent (then
    the diffusion tensors are copies of the AR ones). Returns the params and the HF keys
    the table does not know (unused).
    """
    np_dtype = NP_DTYPES[dtype]
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
    dtype: str = "float32",
    block_size: int | None = None,
    mask_token_id: int | None = None,
    force: bool = False,
    source: str = "config.json",
) -> Path:
    """Convert HF-named tensors and write the model folder ``dst`` atomically.

    ``block_size`` / ``mask_token_id`` override the config's; the mask token is required
    (from the config or the argument). ``extra_files`` (name -> content) are copied in.
    With ``force`` an existing ``dst`` is replaced, only once the new one is complete.
    """
    if dtype not in NP_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(NP_DTYPES)}")
    dst = Path(dst)
    if dst.exists() and not force:  # fail before reading any tensor
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    overrides: dict = {"param_dtype": dtype, "dtype": dtype}
    if block_size is not None:
        overrides["block_size"] = block_size
    if mask_token_id is not None:
        overrides["mask_token_id"] = mask_token_id
    config = ModelConfig.from_hf_dict(hf_config, source=source, **overrides)
    if config.mask_token_id is None:
        raise ValueError(f"{source} has no mask_token_id: pass --mask-token-id with an unused "
                         "token id (for Qwen3's 151936-row vocabulary: 151669)")
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


def convert(src: str | Path, dst: str | Path, **kwargs) -> Path:
    """Convert the HF checkpoint folder ``src`` into the model folder ``dst``."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    hf_config = read_hf_config(src)
    files = safetensors_files(src)
    extra = {name: (src / name).read_bytes() for name in TOKENIZER_FILES
             if (src / name).is_file()}
    return write_converted(dst, hf_config, iter_safetensors(files), extra,
                           source=str(src / "config.json"), **kwargs)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """DST, --dtype, --force and the Orthrus fields, shared with ``convert.from_gguf``."""
    add_output_args(parser, "float32")
    parser.add_argument("--block-size", type=int, default=None,
                        help="diffusion block size K (default: the config's, else 32)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="id of the MASK token (default: the config's mask_token_id)")


def model_cli(convert_fn, argv, *, prog: str, doc: str | None, src_help: str) -> int:
    """The CLI of a converter into a model folder: SRC DST and the shared options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help=src_help)
    add_model_args(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_fn(args.src, args.dst, dtype=args.dtype,
                                      block_size=args.block_size,
                                      mask_token_id=args.mask_token_id, force=args.force))


def main(argv: list[str] | None = None) -> int:
    return model_cli(convert, argv, prog="python -m convert.from_hf", doc=__doc__,
                     src_help="HF checkpoint folder (config.json + *.safetensors)")


if __name__ == "__main__":
    sys.exit(main())
