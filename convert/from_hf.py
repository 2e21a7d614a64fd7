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
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from convert.io import model_cli
from convert.model_folder import write_converted
from orthrus_jax.folders import TOKENIZER_FILES

INDEX_FILE = "model.safetensors.index.json"


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


def main(argv: list[str] | None = None) -> int:
    return model_cli(convert, argv, prog="python -m convert.from_hf", doc=__doc__,
                     src_help="HF checkpoint folder (config.json + *.safetensors)",
                     as_stored="as stored: the config's dtype/torch_dtype, else the "
                               "tensors' own")


if __name__ == "__main__":
    sys.exit(main())
