"""``python -m convert.to_hf SRC DST``: export a model folder to the HF layout.

Writes ``model.safetensors`` (or shards with ``model.safetensors.index.json`` past
``--max-shard-size``) with HF key names, the ``*_diff`` diffusion tensors included, and
a ``config.json`` that transformers' ``Qwen3ForCausalLM`` / ``LlamaForCausalLM`` /
``Qwen2ForCausalLM.from_pretrained`` reads (it ignores the extra keys). Tokenizer files
of SRC are copied. DST appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert.io import add_output_args, run_cli
from convert.keymap import entries
from orthrus_jax.checkpoint import read_param_groups
from orthrus_jax.config import ModelConfig, numpy_dtype
from orthrus_jax.folders import copy_tokenizer_files, staging_dir


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def export(src: str | Path, dst: str | Path, *, dtype: str | None = None,
           max_shard_size: int | str = "5GB", force: bool = False) -> Path:
    """Export the model folder ``src`` to the HF checkpoint folder ``dst``."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if Path(dst).exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    limit = _parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    config = ModelConfig.from_json_file(src / "config.json")
    config = config.replace(param_dtype=dtype or config.param_dtype)
    out_dtype = numpy_dtype(config.param_dtype)

    current: dict[str, np.ndarray] = {}
    size = 0
    with staging_dir(dst, force) as tmp:
        names: list[str] = []
        weight_map: dict[str, int] = {}
        total = 0
        for key, value in hf_tensors(src, config):
            value = np.ascontiguousarray(value, dtype=out_dtype)
            if current and size + value.nbytes > limit:
                names.append(_write_shard(tmp, current, len(names)))
                size = 0
            current[key] = value
            weight_map[key] = len(names)
            size += value.nbytes
            total += value.nbytes
        names.append(_write_shard(tmp, current, len(names)))
        if len(names) == 1:
            (tmp / names[0]).rename(tmp / "model.safetensors")
        else:
            final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
                     for i in range(len(names))]
            for old, new in zip(names, final, strict=True):
                (tmp / old).rename(tmp / new)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: final[i] for k, i in weight_map.items()}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save(tmp)
        copy_tokenizer_files(src, tmp)
    return Path(dst)


def hf_tensors(src: Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """HF-layout ``(key, array)`` pairs of model folder ``src``, read a layer at a time."""
    by_layer: dict[int | None, list] = {}
    for e in entries(config):
        by_layer.setdefault(e.layer, []).append(e)
    for layer, group in read_param_groups(src, config.param_dtype):
        for e in by_layer[layer]:
            yield e.hf_key, e.to_hf(np.asarray(group[e.path if layer is None else e.path[1:]]))


def _write_shard(directory: Path, tensors: dict[str, np.ndarray], i: int) -> str:
    """Write ``tensors`` as a numbered shard and empty the dict (frees its memory)."""
    name = f"shard-{i}.safetensors"
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    tensors.clear()
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="model folder written by convert.from_hf / from_gguf")
    add_output_args(parser, None, "as stored in SRC")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file before sharding (default: 5GB)")
    args = parser.parse_args(argv)
    return run_cli(lambda: export(args.src, args.dst, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
