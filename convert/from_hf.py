"""``python -m convert.from_hf SRC DST``: import an HF Qwen3-family or Orthrus checkpoint.

Reads ``SRC/config.json`` and ``SRC/*.safetensors`` (one file, or shards listed in
``model.safetensors.index.json``) one tensor at a time, maps every key through
:mod:`convert.keymap` with a shape check (:mod:`convert.model_folder`), and writes ``DST``:
an Orbax checkpoint under ``params/``, an HF-compatible ``config.json`` with ``block_size``
and ``mask_token_id``, and the tokenizer files of SRC. A checkpoint without ``*_diff``
tensors gets diffusion tensors copied from the AR ones. DST appears whole or not at all.

The weights keep the dtype they are stored in (config.json's ``dtype``/``torch_dtype``,
else the tensors' own) unless ``--dtype`` says otherwise.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from convert.io import model_cli
from convert.model_folder import write_converted
from orthrus_jax.cli import InputError
from orthrus_jax.folders import TOKENIZER_FILES

INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of the safetensors dtypes the numpy reader returns.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                      "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8}
# safetensors dtypes the numpy reader cannot return (numpy has no such type).
UNSUPPORTED_DTYPES = ("F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3",
                      "F6_E3M2", "F4")
# The safetensors library's own cap on the JSON header.
MAX_HEADER_BYTES = 100_000_000
# Library failures on a file that passed check_safetensors: a clear error, not a traceback.
READ_ERRORS = (SafetensorError, OSError, ValueError, TypeError, KeyError, AttributeError,
               OverflowError, MemoryError)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise InputError(f"key {_brief(key)} appears twice")
        out[key] = value
    return out


def _brief(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a crafted header's names and lists can
    be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """Bytes of a tensor of ``shape``, or the first partial product past ``limit`` (a crafted
    shape of many huge dimensions is not multiplied out)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return n
    return n


def check_safetensors(path: str | Path, label: str = "unreadable safetensors file") -> dict:
    """The JSON header of safetensors file ``path``, checked against the file before any
    library reads it: header length, JSON object, every tensor's dtype, shape and data
    offsets inside the data section, consistent with its shape and dtype, not overlapping.
    Reads the first ``8 + header length`` bytes only (the length checked against the file's
    size first). Anything wrong: :class:`InputError` ``"PATH: <label>: <problem>"``."""
    path = Path(path)

    def bad(problem: str) -> InputError:
        return InputError(f"{path}: {label}: {problem}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise bad(f"header length {n} is larger than the {size - 8} bytes after it"
                          ": truncated or not a safetensors file")
            if n > MAX_HEADER_BYTES:
                raise bad(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: {label} ({type(e).__name__}: {e})") from e
    if len(raw) < n:
        raise bad(f"header cut off at {len(raw)} of {n} bytes")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise bad(f"header is not UTF-8 ({e.reason} at byte {8 + e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON ({e})") from e
    except InputError as e:
        raise bad(f"header {e}") from e
    if not isinstance(header, dict):
        raise bad(f"header is not a JSON object (a {type(header).__name__})")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must be an object of strings")
    data_size = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"tensor {_brief(key)}"
        if not isinstance(info, dict):
            raise bad(f"{where} is not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise bad(f"{where} has no {field!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype in UNSUPPORTED_DTYPES:
            raise bad(f"{where} has dtype {dtype}, which this reader cannot load (supported: "
                      f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{where} has unknown dtype {_brief(dtype)} (known: "
                      f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"{where} has shape {_brief(shape)}: not a list of non-negative "
                      "integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise bad(f"{where} has data_offsets {_brief(offsets)}: not [begin, end] with "
                      "0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise bad(f"{where} data_offsets [{begin}, {end}] run past the end of the data "
                      f"section ({data_size} bytes): truncated or damaged")
        nbytes = _nbytes(shape, SAFETENSORS_DTYPES[dtype], data_size)
        if nbytes > data_size:
            raise bad(f"{where} ({dtype}, shape {_brief(shape)}) needs more bytes than the "
                      f"data section's {data_size}")
        if end - begin != nbytes:
            raise bad(f"{where} ({dtype}, shape {_brief(shape)}) needs {nbytes} bytes, its "
                      f"data_offsets [{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, key))
    spans.sort()
    reach, owner = 0, ""  # the furthest end so far, and its tensor
    for begin, end, key in spans:
        if begin < reach:
            raise bad(f"tensor {_brief(key)} data overlaps tensor {_brief(owner)}")
        if end > reach:
            reach, owner = end, key
    return header


def safe_read(path: Path, label: str, read):
    """``read()`` of the checked safetensors file ``path``, its failures as InputError."""
    try:
        return read()
    except READ_ERRORS as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: {label} ({type(e).__name__}: {e})") from e


def safetensors_files(src: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    src = Path(src)
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index)
        if isinstance(weight_map, dict):
            weight_map = weight_map.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
            raise InputError(f"{index}: not a safetensors index (expected \"weight_map\": "
                             "an object of tensor names to file names in the folder)")
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    return files


def read_headers(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of the checkpoint: name -> (file, shape), from the checked headers
    (no tensor data read). A name in two files is refused."""
    label = "unreadable safetensors file"
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        for key, info in check_safetensors(path, label).items():
            if key == "__metadata__":
                continue
            if key in out:
                raise InputError(f"tensor {key} is in both {out[key][0]} and {path}")
            out[key] = (path, tuple(info["shape"]))
    return out


def _layer_order(key: str) -> tuple[int, str]:
    """Sort key: non-layer tensors first, then layer by layer (numerically)."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return (-1 if m is None else int(m.group(1)), key)


def iter_safetensors(files: Iterable[Path],
                     headers: dict[str, tuple[Path, tuple[int, ...]]] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, array)`` for every tensor, read one at a time, layer by layer.

    Each tensor is read through its own ``safe_open`` (a memory map closed after the
    tensor is copied out), so the process never keeps the file's pages mapped: the
    resident memory is the tensors in hand, not the checkpoint."""
    label = "unreadable safetensors file"
    headers = read_headers(files) if headers is None else headers
    for key in sorted(headers, key=_layer_order):
        path = headers[key][0]
        with safe_read(path, label, lambda p=path: safe_open(str(p), framework="numpy")) as f:
            value = safe_read(path, label, lambda k=key, f=f: f.get_tensor(k))
        yield key, value


def convert(src: str | Path, dst: str | Path, **kwargs) -> Path:
    """Convert the HF checkpoint folder ``src`` into the model folder ``dst``."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    hf_config = read_hf_config(src)
    files = safetensors_files(src)
    headers = read_headers(files)
    extra = {name: (src / name).read_bytes() for name in TOKENIZER_FILES
             if (src / name).is_file()}
    return write_converted(dst, hf_config, iter_safetensors(files, headers), extra,
                           keys={k: shape for k, (_, shape) in headers.items()},
                           source=str(src / "config.json"), checkpoint=str(src),
                           **kwargs)


def main(argv: list[str] | None = None) -> int:
    return model_cli(convert, argv, prog="python -m convert.from_hf", doc=__doc__,
                     src_help="HF checkpoint folder (config.json + *.safetensors)",
                     as_stored="as stored: the config's dtype/torch_dtype, else the "
                               "tensors' own")


if __name__ == "__main__":
    sys.exit(main())
