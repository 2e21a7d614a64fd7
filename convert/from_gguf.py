"""Read a llama.cpp GGUF file as an HF-style config, HF-named float32 tensors and tokenizer files.

Supported architectures: ``llama`` (q/k rows un-permuted back to HF's rotate-half layout),
``qwen2`` (q/k/v biases) and ``qwen3`` (q/k RMS norms). The tokenizer must be GPT-2 style
byte-level BPE (``tokenizer.ggml.model == "gpt2"``). RoPE scaling is read from the
``rope.scaling.*`` keys (``linear`` and ``yarn``, as llama.cpp's converter writes them);
``llama3`` scaling, which llama.cpp stores as a ``rope_freqs.weight`` tensor, is refused.

CLI::

    python -m convert.from_gguf SRC.gguf DST --mask-token-id N [--dtype float32|bfloat16]
        [--block-size N] [--force]

writes the same model folder as ``convert.from_hf``, with ``tokenizer.json`` and
``tokenizer_config.json`` (chat template included) rebuilt from the GGUF vocabulary.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, TokenType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import _type_traits, dequantize

from convert.io import model_cli
from convert.keymap import entries
from convert.model_folder import write_converted
from orthrus_jax.cli import InputError
from orthrus_jax.config import MODEL_TYPES, ModelConfig

__all__ = ["GGUFModel", "SUPPORTED_ARCHS", "SUPPORTED_PRE_TOKENIZERS", "convert", "main",
           "read_gguf"]

_MISSING = object()

# GGUF architecture -> HF model_type, from the project's table of architectures.
_MODEL_TYPE = {a.gguf: name for name, a in MODEL_TYPES.items() if a.gguf}
SUPPORTED_ARCHS = tuple(_MODEL_TYPE)

# `{arch}.*` metadata keys that are read into the config, or are harmless to ignore.
_HONOURED_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "rope.freq_base", "attention.key_length", "attention.value_length", "rope.dimension_count",
    "vocab_size", "tensor_data_layout", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
}
# `{arch}.*` keys that are accepted only with a value that changes nothing.
_NEUTRAL_ARCH_VALUES: dict[str, tuple[Any, ...]] = {
    "rope.scaling.attn_factor": (1.0,),
    "rope.scaling.yarn_ext_factor": (1.0, -1.0),
    "rope.scaling.yarn_log_multiplier": (0.0,),
    "expert_count": (0,),
    "expert_used_count": (0,),
    "attention.causal": (True,),
}

# Per-layer GGUF tensor suffix -> (HF suffix under `model.layers.N.`, the ModelConfig flag a
# layer needs to have it: None for every layer). A layer has exactly the tensors its config
# implies; their shapes come from `convert.keymap`.
_LAYER_TENSORS: dict[str, tuple[str, str | None]] = {
    "attn_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "attn_q.weight": ("self_attn.q_proj.weight", None),
    "attn_k.weight": ("self_attn.k_proj.weight", None),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "attn_q.bias": ("self_attn.q_proj.bias", "qkv_bias"),
    "attn_k.bias": ("self_attn.k_proj.bias", "qkv_bias"),
    "attn_v.bias": ("self_attn.v_proj.bias", "qkv_bias"),
    "attn_output.bias": ("self_attn.o_proj.bias", "o_bias"),
    "attn_q_norm.weight": ("self_attn.q_norm.weight", "qk_norm"),
    "attn_k_norm.weight": ("self_attn.k_norm.weight", "qk_norm"),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d{1,9})\.(.+)")

# Pre-tokenizer split regexes (HF tokenizer.json patterns).
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "qwen2", "llama-bpe")


@dataclass
class _TensorPlan:
    hf_key: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # HF layout ([out, in])
    permute_heads: int | None  # llama q/k: number of heads to un-permute over


@dataclass
class GGUFModel:
    """A GGUF file opened for conversion: HF config, lazy HF-named tensors, tokenizer files."""

    path: Path
    config: dict[str, Any]
    _reader: GGUFReader = field(repr=False)
    _plan: list[_TensorPlan] = field(repr=False)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> HF-layout shape of the tensors ``tensors()`` yields, in order."""
        return {p.hf_key: p.shape for p in self._plan}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_key, float32 array in HF layout)`` one tensor at a time."""
        for p in self._plan:
            yield p.hf_key, _load_tensor(self.path, p)

    def tokenizer_files(self) -> dict[str, str]:
        """``tokenizer.json`` and ``tokenizer_config.json`` rebuilt from metadata ({} if none)."""
        if "tokenizer.ggml.tokens" not in self._reader.fields:
            return {}
        return _build_tokenizer_files(self.path, self._reader, self.config)


def read_gguf(path: str | Path) -> GGUFModel:
    """Open ``path``, validate its metadata and tensor names, and map them to HF conventions.

    A damaged or crafted file is refused with :class:`InputError` naming the file and the
    problem (see ``docs/refusals.md``), before the gguf reader sees it where that can be
    told from the bytes alone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    _check_layout(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the gguf reader raises assorted types
        raise InputError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {_short(str(e))})"
        ) from e
    for key, f in reader.fields.items():  # so that _meta() cannot fail later
        try:
            f.contents()
        except Exception as e:  # noqa: BLE001 - a damaged field; assorted types
            raise InputError(f"{path}: metadata {key} is not readable "
                             f"({type(e).__name__}: {_short(str(e))})") from e
    config = _build_config(path, reader)
    plan = _plan_tensors(path, reader, config)
    if "tokenizer.ggml.tokens" in reader.fields:
        _check_tokenizer_kind(path, reader)
    return GGUFModel(path=path, config=config, _reader=reader, _plan=plan)


# --------------------------------------------------------------------------- file layout

_SUPPORTED_VERSIONS = (2, 3)
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4  # arrays of arrays of ... (llama.cpp writes none)
# GGUF value type -> struct code of the scalar types; 8 is a string, 9 an array.
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# Fewest bytes one value of a type takes (an array: its element type and count).
_MIN_VALUE_BYTES = {**{t: struct.calcsize(c) for t, c in _SCALAR_CODES.items()},
                    _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
# Tensor types whose data the converter can dequantize.
_SUPPORTED_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits})
_READER_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Layout:
    """A bounds-checked walk over a GGUF file's header, metadata and tensor infos."""

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path, self.buf, self.size = path, buf, size
        self.pos = 0
        self.order = "<"

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.size - start:
            raise self.fail(f"{what} at offset {start} runs past the end of the file "
                            f"({self.size} bytes): truncated or damaged")
        self.pos = start + n
        return start

    def scalar(self, code: str, what: str) -> Any:
        start = self.take(struct.calcsize(code), what)
        return struct.unpack_from(self.order + code, self.buf, start)[0]

    def unique(self, label: str, seen: set[str], kind: str) -> str:
        """A string (see :meth:`string`) not in ``seen``, which it joins."""
        name = self.string(label)
        if name in seen:
            raise self.fail(f"{kind} {name!r} appears twice")
        seen.add(name)
        return name

    def string(self, what: str) -> str:
        at = self.pos
        n = self.scalar("Q", f"length of {what}")
        start = self.take(n, f"{what} ({n} bytes)")
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at offset {at} is not UTF-8 ({e.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_CODES:
            return self.scalar(_SCALAR_CODES[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        at = self.pos
        itype = self.scalar("I", f"{what} element type")
        count = self.scalar("Q", f"{what} length")
        if itype not in _MIN_VALUE_BYTES:
            raise self.fail(f"{what} is an array of unknown value type {itype}")
        if count * _MIN_VALUE_BYTES[itype] > self.size - self.pos:
            raise self.fail(f"{what} at offset {at} claims {count} elements, more than the "
                            f"{self.size - self.pos} bytes left in the file hold")
        if itype in _SCALAR_CODES:
            self.take(count * _MIN_VALUE_BYTES[itype], what)
        else:
            for i in range(count):
                self.value(itype, f"{what}[{i}]", depth + 1)
        return None

    def walk(self) -> None:
        size = self.size
        if size < _HEADER_BYTES:
            magic = self.buf[:4]
            if len(magic) == 4 and magic != b"GGUF":
                raise self.fail(f"bad magic {magic!r} (expected b'GGUF'): not a GGUF file")
            raise self.fail(f"truncated header ({size} bytes, a GGUF header needs "
                            f"{_HEADER_BYTES})")
        magic = self.buf[:4]
        if magic != b"GGUF":
            raise self.fail(f"bad magic {magic!r} (expected b'GGUF'): not a GGUF file")
        version = struct.unpack_from("<I", self.buf, 4)[0]
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack_from(">I", self.buf, 4)[0]
        if version not in _SUPPORTED_VERSIONS:
            raise self.fail(f"unsupported GGUF version {version} (supported: "
                            f"{', '.join(map(str, _SUPPORTED_VERSIONS))})")
        self.pos = 8
        n_tensors = self.scalar("Q", "tensor count")
        n_kv = self.scalar("Q", "metadata count")
        if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size - self.pos:
            raise self.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                f"the file's {size} bytes can hold: truncated or damaged")

        alignment = 32
        seen: set[str] = set(_READER_KEYS)
        for i in range(n_kv):
            key = self.unique(f"metadata key #{i}", seen, "metadata key")
            vtype = self.scalar("I", f"type of metadata {key}")
            value = self.value(vtype, f"metadata {key}")
            if key == "general.alignment":
                if vtype != _UINT32 or value == 0 or value & (value - 1):
                    raise self.fail(f"metadata general.alignment={_short(repr(value))} is not "
                                    "a uint32 power of two")
                alignment = value

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = self.unique(f"name of tensor #{i}", names, "tensor")
            n_dims = self.scalar("I", f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} "
                                "supported)")
            dims = [self.scalar("Q", f"tensor {name!r} dimensions") for _ in range(n_dims)]
            if any(d == 0 for d in dims):
                raise self.fail(f"tensor {name!r} has dims {dims}: every dimension must be "
                                "positive")
            raw_type = self.scalar("I", f"tensor {name!r} type")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise self.fail(f"tensor {name!r} has unknown type {raw_type}") from None
            if qtype not in _SUPPORTED_TYPES:
                raise self.fail(f"tensor {name!r} has unsupported type {qtype.name}")
            offset = self.scalar("Q", f"tensor {name!r} data offset")
            infos.append((name, dims, qtype, offset))

        data_start = -(-self.pos // alignment) * alignment
        ranges = []
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise self.fail(f"tensor {name!r} has dims {dims}: rows of {dims[0]} are not a "
                                f"multiple of the {qtype.name} block size {block}")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * type_size
            if offset % alignment:
                raise self.fail(f"tensor {name!r} data offset {offset} is not a multiple of the "
                                f"alignment {alignment}")
            start = data_start + offset
            if start + n_bytes > size:
                raise self.fail(
                    f"tensor {name!r} ({qtype.name}, dims {dims}) data at offset {start} needs "
                    f"{n_bytes} bytes, past the end of the file ({size} bytes): truncated or "
                    "damaged")
            ranges.append((start, start + n_bytes, name))
        ranges.sort()
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:], strict=False):
            if start < end:  # tensors sharing bytes: a crafted file that loads more than it holds
                raise self.fail(f"tensor {second!r} data overlaps tensor {first!r}")


def _check_layout(path: Path) -> None:
    """Refuse a file whose header, metadata or tensor table is not a well-formed GGUF that
    fits in the file, without allocating more than the file holds."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise InputError(f"{path}: empty file, not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _Layout(path, buf, size).walk()


# --------------------------------------------------------------------------- metadata


def _meta(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise KeyError(key)
        return default
    value = f.contents()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    return value


def _token_id(path: Path, reader: GGUFReader, key: str) -> int | None:
    """A token id from the metadata (None if absent); refused unless a non-negative int."""
    value = _meta(reader, key, None)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 0):
        raise InputError(f"{path}: metadata {key}={_short(repr(value))} must be a token id "
                         "(an integer >= 0)")
    return value


def _meta_list(path: Path, reader: GGUFReader, key: str, kind: type, default: Any) -> Any:
    """A metadata array of ``kind`` (str or int) values, or ``default`` if absent."""
    value = _meta(reader, key, default)
    if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise InputError(f"{path}: metadata {key} must be an array of "
                         f"{'strings' if kind is str else 'integers'}")
    return value


def _clean_float(x: float) -> float:
    """float32 metadata as the short decimal it was written from (9.99e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _build_config(path: Path, reader: GGUFReader) -> dict[str, Any]:
    arch = _meta(reader, "general.architecture", None)
    if not isinstance(arch, str) or arch not in _MODEL_TYPE:
        raise InputError(
            f"{path}: unsupported general.architecture={_short(repr(arch))} "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    prefix = f"{arch}."

    for key in reader.fields:
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):]
        value = _meta(reader, key)
        if sub in _NEUTRAL_ARCH_VALUES:
            if value not in _NEUTRAL_ARCH_VALUES[sub]:
                raise InputError(f"{path}: unsupported metadata {key}={value!r}")
        elif sub not in _HONOURED_ARCH_KEYS:
            raise InputError(f"{path}: unsupported metadata {key}={value!r}")

    def req(sub: str, default: Any = _MISSING, kind: type = int) -> Any:
        key = prefix + sub
        if key not in reader.fields and default is _MISSING:
            raise InputError(f"{path}: required metadata key {key} is missing")
        value = _meta(reader, key, default)
        if isinstance(value, list):
            raise InputError(
                f"{path}: per-layer metadata {key}={_short(repr(value))} is not supported")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{path}: metadata {key}={_short(repr(value))} must be a positive "
                             "integer")
        if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise InputError(f"{path}: metadata {key}={_short(repr(value))} must be a number")
        return value

    hidden = req("embedding_length")
    n_heads = req("attention.head_count")
    n_kv = req("attention.head_count_kv", n_heads)
    head_dim = req("attention.key_length", max(hidden // n_heads, 1))
    n_layers = req("block_count")
    if n_layers > len(reader.tensors):
        raise InputError(f"{path}: metadata {prefix}block_count={n_layers} but the file has "
                         f"only {len(reader.tensors)} tensors")
    value_len = req("attention.value_length", head_dim)
    if value_len != head_dim:
        raise InputError(
            f"{path}: unsupported metadata {prefix}attention.value_length={value_len!r} "
            f"(differs from key_length {head_dim})"
        )
    rope_dims = req("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise InputError(
            f"{path}: unsupported metadata {prefix}rope.dimension_count={rope_dims!r} "
            f"(partial rotary; head_dim is {head_dim})"
        )
    tensor_names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise InputError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = int(embd.shape[1]) if len(embd.shape) == 2 else -1
    meta_vocab = _meta(reader, prefix + "vocab_size", vocab_size)
    if meta_vocab != vocab_size:
        raise InputError(
            f"{path}: metadata {prefix}vocab_size={meta_vocab!r} does not match "
            f"token_embd.weight rows {vocab_size}"
        )

    model_type = _MODEL_TYPE[arch]
    context_length = req("context_length")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [MODEL_TYPES[model_type].hf_class],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": req("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _clean_float(req("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": _clean_float(req("rope.freq_base", 10000.0, kind=float)),
        "max_position_embeddings": context_length,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _token_id(path, reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _token_id(path, reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _token_id(path, reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
    }
    scaling = _rope_scaling(path, reader, prefix, context_length)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    elif model_type == "qwen2":
        config["use_sliding_window"] = False
    else:
        config["attention_bias"] = False
    return config


def _rope_scaling(path: Path, reader: GGUFReader, prefix: str,
                  context_length: int) -> dict[str, Any] | None:
    """The HF ``rope_scaling`` of the ``rope.scaling.*`` keys (None: no scaling)."""
    kind = _meta(reader, prefix + "rope.scaling.type", "none")
    factor = _meta(reader, prefix + "rope.scaling.factor", None)
    if kind == "none":
        if factor not in (None, 0.0, 1.0):
            raise InputError(f"{path}: unsupported metadata {prefix}rope.scaling.factor="
                             f"{factor!r} with {prefix}rope.scaling.type='none'")
        return None
    if kind not in ("linear", "yarn"):
        raise InputError(f"{path}: unsupported metadata {prefix}rope.scaling.type={kind!r} "
                         "(supported: none, linear, yarn)")
    if factor is None:
        raise InputError(f"{path}: metadata {prefix}rope.scaling.factor is missing for "
                         f"{prefix}rope.scaling.type={kind!r}")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = _meta(
            reader, prefix + "rope.scaling.original_context_length", context_length)
        for sub, name in (("yarn_attn_factor", "attention_factor"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = _meta(reader, prefix + "rope.scaling." + sub, None)
            if value is not None:
                scaling[name] = _clean_float(value) if isinstance(value, float) else value
    if isinstance(factor, float):
        scaling["factor"] = _clean_float(factor)
    return scaling


# --------------------------------------------------------------------------- tensors


def _plan_tensors(path: Path, reader: GGUFReader, config: dict[str, Any]) -> list[_TensorPlan]:
    arch = _meta(reader, "general.architecture")
    try:
        model = ModelConfig.from_hf_dict(config, source=str(path))
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise InputError(str(e)) from e
        raise InputError(f"{path}: {e}") from e
    n_layers = model.num_hidden_layers
    nh, nkv = model.num_attention_heads, model.num_key_value_heads
    # HF key -> (GGUF name, HF shape) of every tensor this config has
    expected = {e.hf_key: e.hf_shape for e in entries(model) if not e.diffusion}
    want: dict[str, tuple[str, tuple[int, ...]]] = {
        hf: (name, expected[hf]) for name, hf in _GLOBAL_TENSORS.items() if hf in expected}
    for i in range(n_layers):
        for suffix, (hf_suffix, flag) in _LAYER_TENSORS.items():
            if flag is None or getattr(model, flag):
                hf = f"model.layers.{i}.{hf_suffix}"
                want[hf] = (f"blk.{i}.{suffix}", expected[hf])
    by_name = {name: hf for hf, (name, _) in want.items()}
    plan: list[_TensorPlan] = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        hf_key = by_name.get(t.name)
        m = _LAYER_RE.fullmatch(t.name)
        if hf_key is None:
            if m is not None and m.group(2) in _LAYER_TENSORS and int(m.group(1)) >= n_layers:
                raise InputError(
                    f"{path}: tensor {t.name!r} is beyond {arch}.block_count={n_layers}"
                )
            if t.name == "rope_freqs.weight":
                raise InputError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE "
                                 "factors, as llama.cpp stores llama3 scaling) is not "
                                 "supported: convert the Hugging Face checkpoint instead")
            raise InputError(f"{path}: unknown tensor {t.name!r} for architecture {arch!r}")
        permute: int | None = None
        if arch == "llama" and m is not None and m.group(2).startswith(("attn_q.", "attn_k.")):
            permute = nh if m.group(2).startswith("attn_q.") else nkv
        if shape != want[hf_key][1]:
            raise InputError(
                f"{path}: tensor {t.name!r} has shape {list(shape)} (HF layout), expected "
                f"{list(want[hf_key][1])} from the metadata"
            )
        plan.append(_TensorPlan(hf_key, t, shape, permute))
    planned = {p.hf_key for p in plan}
    if missing := [name for hf, (name, _) in want.items() if hf not in planned]:
        raise InputError(f"{path}: tensor {missing[0]} is missing")
    return plan


def _load_tensor(path: Path, p: _TensorPlan) -> np.ndarray:
    t = p.tensor
    qtype = GGMLQuantizationType(t.tensor_type)
    try:
        w = dequantize(t.data, qtype)
    except NotImplementedError as e:
        raise InputError(
            f"{path}: tensor {t.name!r} has unsupported type {qtype.name} ({e})"
        ) from e
    w = np.array(w, dtype=np.float32, copy=True).reshape(p.shape)
    if p.permute_heads is not None:
        w = _unpermute(w, p.permute_heads)
    return w


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of q/k (weights or biases)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


# --------------------------------------------------------------------------- tokenizer


def _check_tokenizer_kind(path: Path, reader: GGUFReader) -> None:
    model = _meta(reader, "tokenizer.ggml.model", None)
    if model != "gpt2":
        raise InputError(
            f"{path}: unsupported tokenizer.ggml.model={model!r} (only 'gpt2' byte-level BPE)"
        )
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise InputError(
            f"{path}: unsupported tokenizer.ggml.pre={pre!r} "
            f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})"
        )


def _build_tokenizer_files(
    path: Path, reader: GGUFReader, config: dict[str, Any]
) -> dict[str, str]:
    try:
        return _tokenizer_files(path, reader, config)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise InputError(f"{path}: the tokenizer metadata does not make a tokenizer "
                         f"({type(e).__name__}: {_short(str(e))})") from e


def _tokenizer_files(
    path: Path, reader: GGUFReader, config: dict[str, Any]
) -> dict[str, str]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pt

    _check_tokenizer_kind(path, reader)
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    tokens: list[str] = _meta_list(path, reader, "tokenizer.ggml.tokens", str, None)
    merges_raw: list[str] = _meta_list(path, reader, "tokenizer.ggml.merges", str, [])
    types: list[int] = _meta_list(path, reader, "tokenizer.ggml.token_type", int,
                                  [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise InputError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, "
            f"tokenizer.ggml.tokens has {len(tokens)}"
        )

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        pos = m.find(" ", 1)  # as llama.cpp: a token may start with a space
        if pos < 0:
            raise InputError(f"{path}: malformed tokenizer.ggml.merges entry {m!r}")
        merges.append((m[:pos], m[pos + 1:]))

    bpe = models.BPE(
        vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
        ignore_merges=(pre == "llama-bpe"),
    )
    tok = Tokenizer(bpe)
    if pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        tok.pre_tokenizer = pt.Sequence([
            pt.Digits(individual_digits=True),
            pt.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # qwen2, llama-bpe
        pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
        tok.pre_tokenizer = pt.Sequence([
            pt.Split(Regex(pattern), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()

    added = []
    for i, (text, ttype) in enumerate(zip(tokens, types, strict=True)):
        if ttype in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
            added.append((i, AddedToken(
                text, special=ttype != TokenType.USER_DEFINED, normalized=False,
                lstrip=False, rstrip=False, single_word=False,
            )))
    tok.add_special_tokens([a for _, a in added if a.special])
    tok.add_tokens([a for _, a in added if not a.special])
    for i, a in added:
        got = tok.token_to_id(a.content)
        if got != i:
            raise InputError(f"{path}: added token {a.content!r} maps to id {got}, expected {i}")

    def token_str(key: str) -> str | None:
        idx = _token_id(path, reader, key)
        if idx is None:
            return None
        if not 0 <= idx < len(tokens):
            raise InputError(f"{path}: metadata {key}={idx} is outside the vocabulary")
        return tokens[idx]

    bos, eos = token_str("tokenizer.ggml.bos_token_id"), token_str("tokenizer.ggml.eos_token_id")
    pad = token_str("tokenizer.ggml.padding_token_id")
    unk = token_str("tokenizer.ggml.unknown_token_id")
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos or add_eos:
        def seq(piece: str, type_id: str) -> list[str]:
            return ([bos + type_id] if add_bos else []) + [piece] + (
                [eos + type_id] if add_eos else [])

        template = processors.TemplateProcessing(
            single=seq("$A", ""),
            pair=seq("$A", "") + seq("$B:1", ":1"),
            special_tokens=[(s, vocab[s]) for s, on in ((bos, add_bos), (eos, add_eos)) if on],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
    }
    extra_specials = [a.content for _, a in added if a.special and a.content not in
                      (bos, eos, pad, unk)]
    if extra_specials:
        tok_config["additional_special_tokens"] = extra_specials
    template_str = _meta(reader, "tokenizer.chat_template", None)
    if template_str is not None and not isinstance(template_str, str):
        raise InputError(f"{path}: metadata tokenizer.chat_template must be a string")
    if template_str is not None:
        tok_config["chat_template"] = template_str
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
    }


# --------------------------------------------------------------------------- CLI


def convert(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """Convert the GGUF file ``src`` into the model folder ``dst`` (see ``write_converted``)."""
    model = read_gguf(src)
    return write_converted(dst, model.config, model.tensors(), model.tokenizer_files(),
                           keys=model.tensor_shapes(), source=str(src), **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, or 2 after a one-line error (bad input, DST exists)."""
    return model_cli(convert, argv, prog="python -m convert.from_gguf", doc=__doc__,
                     src_help="source .gguf file", dtype_default="float32")


if __name__ == "__main__":
    sys.exit(main())
