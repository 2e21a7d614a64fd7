"""``python -m convert.head``: a diffusion head as one small safetensors file.

A head is the trained diffusion tensors of a model (the HF ``*_diff`` keys, ``[out, in]``
layout) without the frozen backbone they attach to. It is what a training run ships: a
few tens of MB instead of a whole model folder.

- ``int8`` (default): each 2-D weight is stored as int8 with one float32 scale per output
  row (``<key>_scale``, symmetric, ``w ~ q * scale``); 1-D tensors (q/k norms, biases)
  stay float32. Decoding stays lossless whatever the head's precision: only the drafts
  change, and every draft is verified by the unchanged AR view.
- ``bfloat16`` / ``float32``: the tensors as they are, cast.

The file's metadata records the format, the block size and mask token the head was
trained with, and the backbone's shape (checked when the head is applied), the model
folder's acceptance profile (``acceptance.json``, which ``--block-size auto`` needs; it is
written back when the head is applied), plus any extra fields given at export (e.g. the
training command).

    python -m convert.head export MODEL_DIR HEAD.safetensors [--dtype int8]
    python -m convert.head apply MODEL_DIR HEAD.safetensors DST [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.from_hf import check_safetensors, safe_read
from convert.io import run_cli
from convert.keymap import entries, get_path
from orthrus_jax.checkpoint import (
    ACCEPTANCE_FILE,
    load_model,
    model_from_params,
    save_model,
)
from orthrus_jax.cli import InputError
from orthrus_jax.config import ModelConfig, numpy_dtype
from orthrus_jax.folders import copy_tokenizer_files, staging_dir
from orthrus_jax.model import OrthrusLM

HEAD_FORMAT = "orthrus-head/1"
NOT_READABLE = "not a readable safetensors file"
HEAD_DTYPES = ("int8", "bfloat16", "float32")
SCALE_SUFFIX = "_scale"
# Config fields a head must agree with: the backbone it was trained on.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def backbone_shape(config: ModelConfig) -> dict:
    """The backbone fields a head depends on (compared when it is applied)."""
    hf = config.to_hf_dict()
    return {k: hf.get(k) for k in SHAPE_FIELDS}


def diffusion_tensors(model: OrthrusLM) -> Iterator[tuple[str, np.ndarray]]:
    """The model's diffusion tensors as HF ``(key, float32 array)`` pairs."""
    params = nnx.to_pure_dict(nnx.state(model))
    for e in entries(model.config):
        if e.diffusion:
            value = np.asarray(get_path(params, e.path), np.float32)
            yield e.hf_key, e.to_hf(value[e.layer] if e.layer is not None else value)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``w [out, in]`` -> ``(q int8 [out, in], scale float32 [out])``."""
    peak = np.max(np.abs(w), axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def save_head(model: OrthrusLM, path: str | Path, *, dtype: str = "int8",
              metadata: dict | None = None) -> Path:
    """Write the model's diffusion tensors to ``path`` (written whole or not at all).

    ``metadata``: extra JSON-serialisable fields stored in the file's header."""
    if dtype not in HEAD_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(HEAD_DTYPES)}")
    c = model.config
    tensors: dict[str, np.ndarray] = {}
    for key, w in diffusion_tensors(model):
        if dtype == "int8" and w.ndim == 2:
            tensors[key], tensors[key + SCALE_SUFFIX] = quantize_int8(w)
        elif dtype == "bfloat16":
            tensors[key] = w.astype(numpy_dtype("bfloat16"))
        else:
            tensors[key] = w
    meta = {"format": HEAD_FORMAT, "dtype": dtype, "block_size": c.block_size,
            "mask_token_id": c.mask_token_id, "backbone": backbone_shape(c),
            **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_head_metadata(path: str | Path) -> dict:
    """The JSON fields of a head file's header; a clear error for anything else (the whole
    header is checked first: :func:`convert.from_hf.check_safetensors`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head file not found: {path}")
    raw = check_safetensors(path, NOT_READABLE).get("__metadata__", {})
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: header metadata is not JSON ({e})") from e
    if meta.get("format") != HEAD_FORMAT:
        raise InputError(f"{path}: not an Orthrus head (format {meta.get('format')!r}, "
                         f"expected {HEAD_FORMAT!r})")
    return meta


def _check_head_fields(path: Path, meta: dict) -> None:
    if not isinstance(meta.get("backbone"), dict):
        raise InputError(f"{path}: header field backbone must be an object, got "
                         f"{meta.get('backbone')!r}")
    for field, low in (("block_size", 1), ("mask_token_id", 0)):
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{path}: header field {field}={value!r} must be an integer "
                             f">= {low}")


def read_head(path: str | Path, config: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, metadata)``: the head's float32 tensors by HF key, checked against
    ``config`` (backbone shape, every key present once, shapes)."""
    path = Path(path)
    meta = read_head_metadata(path)
    _check_head_fields(path, meta)
    want = backbone_shape(config)
    for k, v in want.items():
        if meta["backbone"].get(k) != v:
            raise InputError(f"{path}: head was trained on a backbone with {k}="
                             f"{meta['backbone'].get(k)!r}, this model has {v!r}")
    raw = safe_read(path, NOT_READABLE, lambda: load_file(str(path)))
    out: dict[str, np.ndarray] = {}
    expected = {e.hf_key: e.hf_shape for e in entries(config) if e.diffusion}
    for key, shape in expected.items():
        if key not in raw:
            raise InputError(f"{path}: tensor {key} is missing")
        w = raw.pop(key)
        if tuple(w.shape) != tuple(shape):
            raise InputError(f"{path}: tensor {key} has shape {tuple(w.shape)}, expected "
                             f"{tuple(shape)}")
        if key + SCALE_SUFFIX in raw:
            scale = raw.pop(key + SCALE_SUFFIX)
            if w.dtype != np.int8 or scale.shape != (shape[0],) or \
                    scale.dtype not in (np.float32, np.float16):
                raise InputError(f"{path}: {key}{SCALE_SUFFIX} has shape {scale.shape} "
                                 f"({scale.dtype}) for an {w.dtype} tensor; expected int8 with "
                                 f"float32 ({shape[0]},)")
            with np.errstate(over="ignore", invalid="ignore"):
                w = w.astype(np.float32) * scale.astype(np.float32)[:, None]
        if w.dtype == np.bool_ or np.iscomplexobj(w):
            raise InputError(f"{path}: tensor {key} has dtype {w.dtype}, expected a float or "
                             "int8 tensor")
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.asarray(w, np.float32)
        if not np.isfinite(w).all():
            raise InputError(f"{path}: tensor {key} has {int((~np.isfinite(w)).sum())} "
                             "non-finite value(s)")
        out[key] = w
    if raw:
        raise InputError(f"{path}: unexpected tensor(s) {sorted(raw)[:5]}")
    return out, meta


def apply_head(model: OrthrusLM, path: str | Path) -> OrthrusLM:
    """A copy of ``model`` with the head's diffusion tensors, block size and mask token."""
    tensors, meta = read_head(path, model.config)
    config = model.config.replace(block_size=int(meta["block_size"]),
                                  mask_token_id=int(meta["mask_token_id"]))
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    for e in entries(config):
        if e.diffusion:
            target = get_path(params, e.path)
            value = e.to_param(tensors[e.hf_key])
            if e.layer is None:
                target[...] = value
            else:
                target[e.layer] = value
    return model_from_params(config, params)


def write_model_folder(model: OrthrusLM, head: str | Path, tokenizer_src: str | Path,
                       folder: str | Path) -> None:
    """Save ``model`` (a head applied) into the existing ``folder`` with the tokenizer of
    ``tokenizer_src`` and the head's acceptance profile, if it records one."""
    save_model(model, folder)
    copy_tokenizer_files(tokenizer_src, folder)
    profile = read_head_metadata(head).get("acceptance")
    if profile:
        (Path(folder) / ACCEPTANCE_FILE).write_text(json.dumps(profile, indent=1) + "\n")


def apply_to_folder(src: str | Path, head: str | Path, dst: str | Path, *,
                    force: bool = False) -> Path:
    """Write model folder ``dst``: ``src`` with the head applied (tokenizer copied, and the
    head's acceptance profile as ``acceptance.json``)."""
    src = Path(src)
    model = apply_head(load_model(src), head)
    with staging_dir(dst, force) as tmp:
        write_model_folder(model, head, src, tmp)
    return Path(dst)


def folder_metadata(model_dir: str | Path) -> dict:
    """Header fields a model folder contributes to its exported head: its acceptance
    profile, when it has one."""
    path = Path(model_dir) / ACCEPTANCE_FILE
    if not path.is_file():
        return {}
    try:
        return {"acceptance": json.loads(path.read_text())}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a model folder's diffusion tensors as a head")
    ex.add_argument("model", help="model folder")
    ex.add_argument("head", help="output .safetensors file")
    ex.add_argument("--dtype", choices=HEAD_DTYPES, default="int8")
    ex.add_argument("--metadata", default=None,
                    help="JSON object of extra header fields (or @file.json)")
    ap = sub.add_parser("apply", help="write a model folder with a head's diffusion tensors")
    ap.add_argument("model", help="model folder (the backbone)")
    ap.add_argument("head", help="head .safetensors file")
    ap.add_argument("dst", help="output model folder")
    ap.add_argument("--force", action="store_true", help="replace an existing DST")
    args = p.parse_args(argv)
    if args.command == "export":
        def export() -> Path:
            meta = folder_metadata(args.model) | _parse_metadata(args.metadata)
            return save_head(load_model(args.model), args.head, dtype=args.dtype, metadata=meta)
        return run_cli(export)
    return run_cli(lambda: apply_to_folder(args.model, args.head, args.dst, force=args.force))


def _parse_metadata(text: str | None) -> dict:
    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--metadata: not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError("--metadata: expected a JSON object")
    return meta


if __name__ == "__main__":
    sys.exit(main())
