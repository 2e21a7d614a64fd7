"""Model configuration, read from and written to a Hugging Face ``config.json``.

One dataclass covers the Qwen3 family this project supports (the table :data:`MODEL_TYPES`):

- ``qwen3`` / ``orthrus``: per-head q/k RMSNorm, no biases (``attention_bias`` adds them);
- ``llama``: no q/k norm (e.g. SmolLM2);
- ``qwen2``: no q/k norm, biases on the q/k/v projections.

RoPE is the default or one of the scaled types of :mod:`orthrus_jax.rope` (``linear``,
``llama3``, ``yarn``), read from ``rope_parameters`` (transformers 5) or ``rope_scaling``
(older; it wins when both are given, as in transformers). Fields a config may carry that
this implementation does not compute (other RoPE types, partial rotary, sliding-window
layers, mixture of experts, ...) raise :class:`UnsupportedConfigError`
naming the field and its value, rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from orthrus_jax.cli import InputError
from orthrus_jax.rope import ROPE_TYPES, RopeScaling, inverse_frequencies


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What one supported ``model_type`` computes, and its names elsewhere."""

    hf_class: str  # the HF ``architectures`` entry transformers loads it with
    qk_norm: bool  # per-head RMSNorm on q and k
    qkv_bias: bool = False  # q/k/v biases whatever ``attention_bias`` says (and none on o)
    export_as: str | None = None  # the model_type written to config.json (default: its own)
    gguf: str | None = None  # llama.cpp's ``general.architecture`` for it, if it has one


# The one table of supported architectures, by HF ``model_type``.
MODEL_TYPES: dict[str, Architecture] = {
    "qwen3": Architecture("Qwen3ForCausalLM", qk_norm=True, gguf="qwen3"),
    "orthrus": Architecture("Qwen3ForCausalLM", qk_norm=True, export_as="qwen3"),
    "llama": Architecture("LlamaForCausalLM", qk_norm=False, gguf="llama"),
    "qwen2": Architecture("Qwen2ForCausalLM", qk_norm=False, qkv_bias=True, gguf="qwen2"),
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)

# The one table of parameter/compute dtypes: name -> jnp dtype (jnp.bfloat16 is
# ml_dtypes' bfloat16 as a numpy dtype). ``DTYPE_NAMES`` are the ``--dtype`` choices.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
NP_DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in DTYPES.items()}
DEFAULT_BLOCK_SIZE = 32
# Largest size a config may give any dimension (sizes index int32 arrays).
MAX_DIM = 2**31 - 1


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name (``bfloat16`` is ml_dtypes')."""
    if name not in NP_DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {list(DTYPE_NAMES)}")
    return NP_DTYPES[name]


def dtype_name(dtype: Any) -> str | None:
    """The name in :data:`DTYPES` of a numpy/jnp dtype, or None if it is not one of them."""
    d = np.dtype(dtype)
    return next((name for name, t in NP_DTYPES.items() if t == d), None)


class UnsupportedConfigError(InputError):
    """A ``config.json`` field whose value this implementation does not compute."""


def _unsupported(field: str, value: Any, source: str, why: str = "is not supported") -> None:
    raise UnsupportedConfigError(f"{source}: {field}={value!r} {why}")


def _int_tuple(value: Any) -> tuple[int, ...]:
    """``eos_token_id``: null, one id or a list of ids."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"eos_token_id={value!r:.60} must be a token id or a list of them")
    return tuple(values)


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    """``d[key]`` as an integer in ``[1, MAX_DIM]`` (a float with an integer value, as some
    exporters write, is accepted)."""
    value = d.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
        raise ValueError(f"{key}={value!r:.60} must be an integer in [1, {MAX_DIM}]")
    return value


def _float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < math.inf:
        raise ValueError(f"{key}={value!r:.60} must be a positive finite number")
    return float(value)


def _bool(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r:.60} must be true or false")
    return value


def _token_id(d: dict[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ValueError(f"{key}={value!r:.60} must be a token id (an integer >= 0) or null")
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3-family decoder plus the Orthrus fields.

    ``dtype`` is the compute dtype of matmuls and the KV cache, ``param_dtype`` the storage
    dtype of the weights; norms, softmax and logits are always computed in float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    model_type: str = "qwen3"
    block_size: int = DEFAULT_BLOCK_SIZE
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
                    not 1 <= value <= MAX_DIM:
                raise ValueError(f"{name}={value!r} must be an integer in [1, {MAX_DIM}]")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        for name in ("mask_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Integral) or value < 0):
                raise ValueError(f"{name}={value!r} must be a token id (an integer >= 0)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; "
                                 f"choose one of {list(DTYPE_NAMES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise ValueError(f"rope_scaling={self.rope_scaling!r:.60} must be a RopeScaling")
            inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
            if not (np.isfinite(inv_freq).all() and (inv_freq > 0).all()):
                raise ValueError(f"rope_scaling={self.rope_scaling} gives frequencies that are "
                                 "not positive and finite")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    # ------------------------------------------------------------------ derived
    @property
    def jnp_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any):
        """Build from a parsed HF ``config.json``; ``overrides`` replace fields afterwards.

        A field of the wrong type or out of range is an :class:`InputError` naming
        ``source`` and the field."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls._from_hf_dict(d, source, overrides)
        except InputError:
            raise
        except (ValueError, TypeError, OverflowError) as e:
            raise InputError(f"{source}: {e}") from e

    @classmethod
    def _from_hf_dict(cls, d: dict[str, Any], source: str, overrides: dict[str, Any]):
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            _unsupported("model_type", model_type, source,
                         f"is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        _check_unsupported(d, source)

        n_heads = _int(d, "num_attention_heads")
        head_dim = _int(d, "head_dim") if d.get("head_dim") is not None else \
            _int(d, "hidden_size") // n_heads
        rope_theta, rope_scaling = _rope(d, source)
        attention_bias = _bool(d, "attention_bias", False)
        arch = MODEL_TYPES[model_type]
        fields = dict(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=_int(d, "num_key_value_heads")
            if d.get("num_key_value_heads") is not None else n_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_int(d, "max_position_embeddings", 32768),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            qk_norm=arch.qk_norm,
            qkv_bias=arch.qkv_bias or attention_bias,
            o_bias=attention_bias and not arch.qkv_bias,
            model_type=model_type,
            block_size=_int(d, "block_size") if d.get("block_size") is not None
            else DEFAULT_BLOCK_SIZE,
            mask_token_id=_token_id(d, "mask_token_id"),
            bos_token_id=_token_id(d, "bos_token_id"),
            eos_token_id=_int_tuple(d.get("eos_token_id")),
            pad_token_id=_token_id(d, "pad_token_id"),
        )
        stored = d.get("dtype") or d.get("torch_dtype")
        if stored in DTYPES:  # the dtype the weights are stored in; compute in the same
            fields.update(param_dtype=stored, dtype=stored)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that transformers and :meth:`from_hf_dict` both read."""
        arch = MODEL_TYPES[self.model_type]
        model_type = arch.export_as or self.model_type
        eos = list(self.eos_token_id)
        d: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": _rope_parameters(self.rope_theta, self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
        }
        if model_type == "qwen3":
            d["attention_bias"] = self.qkv_bias
        elif model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        return d

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path


# ``rope_parameters`` keys this implementation reads, by RoPE type (besides ``rope_type``,
# ``type`` and ``rope_theta``); any other key is refused rather than ignored.
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


def _rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from ``rope_scaling`` (older transformers; it wins when both are
    given, as transformers 5 reads them) or ``rope_parameters`` (transformers 5), the base
    from the chosen dict or the top-level ``rope_theta``."""
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(field)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        _unsupported(field, params, source, "must be an object")
    if params.get("rope_theta") is not None:
        theta = _float(params, "rope_theta", 10_000.0)
    elif d.get("rope_theta") is not None:
        theta = _float(d, "rope_theta", 10_000.0)
    else:
        theta = 10_000.0
    for where, value in ((f"{field}.partial_rotary_factor", params.get("partial_rotary_factor")),
                         ("partial_rotary_factor", d.get("partial_rotary_factor"))):
        if value not in (None, 1, 1.0):
            _unsupported(where, value, source, "is not supported (partial rotary)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        _unsupported(f"{field}.rope_type", rope_type, source,
                     f"is not implemented (implemented: default, {', '.join(ROPE_TYPES)})")
    known = set(_ROPE_KEYS[rope_type]) | {"rope_type", "type", "rope_theta",
                                           "partial_rotary_factor",
                                           "original_max_position_embeddings"}
    for key in params:
        if key not in known:
            _unsupported(f"{field}.{key}", params[key], source,
                         f"is not supported for rope_type={rope_type!r}")
    values = {k: params[k] for k in _ROPE_KEYS[rope_type] if params.get(k) is not None}
    for key, value in values.items():  # numbers as floats (a JSON 4 is the factor 4.0)
        if key not in ("original_max_position_embeddings", "truncate") and \
                isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
    if "factor" not in values:
        raise ValueError(f"{field}.factor is required for rope_type={rope_type!r}")
    if rope_type != "linear":
        # A top-level window wins, as transformers reads it; else the context length.
        window = d.get("original_max_position_embeddings") or values.get(
            "original_max_position_embeddings") or d.get("max_position_embeddings", 32768)
        if isinstance(window, float) and window.is_integer():
            window = int(window)
        values["original_max_position_embeddings"] = window
    try:
        return theta, RopeScaling(rope_type=rope_type, **values)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from e


def _rope_parameters(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """The transformers 5 ``rope_parameters`` of a RoPE base and scaling."""
    if scaling is None:
        return {"rope_theta": theta, "rope_type": "default"}
    d: dict[str, Any] = {"rope_theta": theta, "rope_type": scaling.rope_type}
    for key in _ROPE_KEYS[scaling.rope_type]:
        value = getattr(scaling, key)
        if value is not None:
            d[key] = value
    return d


def _check_unsupported(d: dict[str, Any], source: str) -> None:
    if d.get("hidden_act", "silu") != "silu":
        _unsupported("hidden_act", d["hidden_act"], source, "is not supported (only silu)")
    if d.get("use_sliding_window"):
        _unsupported("use_sliding_window", d["use_sliding_window"], source,
                     "is not supported (sliding-window attention)")
    layer_types = d.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        _unsupported("layer_types", layer_types, source, "must be a list")
    if layer_types:
        for i, t in enumerate(layer_types):
            if t != "full_attention":
                _unsupported(f"layer_types[{i}]", t, source,
                             "is not supported (only full_attention)")
    if d.get("mlp_bias"):
        _unsupported("mlp_bias", d["mlp_bias"], source)
    for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
        if d.get(moe):
            _unsupported(moe, d[moe], source, "is not supported (mixture of experts)")
    if d.get("pretraining_tp", 1) not in (1, None):
        _unsupported("pretraining_tp", d["pretraining_tp"], source)
