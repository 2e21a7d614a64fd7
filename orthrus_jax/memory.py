"""Memory: what a tree of arrays weighs, what this process has used at its peak, and a
planner that says, without allocating anything, what decoding or training a config needs
per device.

Units are decimal throughout: ``1 GB = 10**9`` bytes (:func:`format_bytes`). The planner
(:func:`plan_decode`, :func:`plan_train`) takes every shape from ``jax.eval_shape`` /
``nnx.eval_shape`` of the real constructors (:func:`~orthrus_jax.checkpoint.abstract_model`,
:func:`~orthrus_jax.cache.init_cache`) and every per-device size from the logical-axis
rules of :mod:`orthrus_jax.sharding`, so weight, cache and optimizer bytes are exact.
Activations are an analytic estimate (formulas in docs/memory.md), checked by the tests
against the temporary bytes XLA reports for the real programs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from orthrus_jax.cache import (
    CACHE_AXES,
    LENGTHS_AXES,
    cache_bucket,
    init_cache,
    prompt_len_bucket,
)
from orthrus_jax.checkpoint import abstract_model
from orthrus_jax.config import ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    logical_to_spec,
    parse_mesh_shape,
)

# Decimal and binary units :func:`parse_bytes` accepts (case-insensitive).
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# The engine's default prefill chunk (infer.engine.Generator).
DEFAULT_CHUNK_SIZE = 512
# Logits arrays ``[b, K, V/tp]`` float32 one decode iteration holds at once (draft and
# verify logits plus their filtered log-probabilities when sampling).
DECODE_LOGIT_ARRAYS = 4
# Logits-sized float32 arrays of one loss chunk, forward and backward (draft logits,
# log q, teacher logits, log p, p, the cotangent).
LOSS_LOGIT_ARRAYS = 6


# ---------------------------------------------------------------------- measuring
def _leaf_bytes(x: Any) -> int:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return 0
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # its key data: uint32 words
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return math.prod(data.shape) * data.dtype.itemsize
    return math.prod(shape) * np.dtype(dtype).itemsize


def tree_bytes(tree: Any) -> int:
    """Bytes of every array or ``ShapeDtypeStruct`` leaf of ``tree`` (a pytree, an
    ``nnx.State`` or an ``nnx.Module``), whatever device holds them; global sizes, not
    per-shard. Leaves without a shape and dtype count 0."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def device_bytes(tree: Any, device: jax.Device | None = None) -> int:
    """Bytes the ``jax.Array`` leaves of ``tree`` hold on ``device`` (default: the first
    device): the sizes of their shards placed there."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    device = jax.devices()[0] if device is None else device
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for s in x.addressable_shards if s.device == device)


def peak_memory(device: jax.Device | None = None) -> dict[str, Any]:
    """The process's peak memory so far, in bytes.

    ``device_peak_bytes``, ``device_bytes_in_use`` and ``device_bytes_limit`` come from
    ``device.memory_stats()`` (default: the first device) and are None where the backend
    keeps no statistics (CPU). ``host_peak_rss_bytes`` is the peak resident set size of
    the process (:func:`host_peak_rss`), which on CPU is where the arrays live.
    """
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):
        stats = {}
    return {"device": str(device),
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "device_bytes_in_use": stats.get("bytes_in_use"),
            "device_bytes_limit": stats.get("bytes_limit"),
            "host_peak_rss_bytes": host_peak_rss()}


def host_peak_rss() -> int:
    """Peak resident set size of this process image in bytes: Linux's ``VmHWM`` (which,
    unlike ``getrusage``'s ``ru_maxrss``, does not include the parent's size at ``fork``),
    else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def format_peak(peak: Mapping[str, Any]) -> str:
    """One line of :func:`peak_memory`'s result, e.g. ``device peak 17.20 GB (in use
    16.90 GB, limit 24.00 GB); host peak RSS 2.10 GB``."""
    host = f"host peak RSS {format_bytes(peak['host_peak_rss_bytes'])}"
    if peak.get("device_peak_bytes") is None:
        return f"device {peak['device']}: no memory statistics; {host}"
    limit = peak.get("device_bytes_limit")
    return (f"device peak {format_bytes(peak['device_peak_bytes'])} (in use "
            f"{format_bytes(peak['device_bytes_in_use'] or 0)}"
            + (f", limit {format_bytes(limit)}" if limit else "") + f"); {host}")


def format_bytes(n: int | float) -> str:
    """``n`` bytes in decimal units, two decimals for GB and TB, one for MB and kB:
    ``1.27 GB``, ``512.0 MB``, ``12.0 kB``, ``7 B``."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TB", "GB") else \
                f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``"32GB"``, ``"32 GB"``, ``"24e9"``, ``"80GiB"`` -> bytes. Decimal units ``kB MB GB
    TB`` (and ``k M G T``), binary ``KiB MiB GiB TiB``; case-insensitive; no unit = bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 32GB, 80GiB, 24e9)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1 byte")
    return int(value)


# ---------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device holds, by component, for decoding or training one config.

    ``per_device``: component -> bytes (decode: ``weights``, ``cache``, ``activations``;
    train also ``trainable``, ``gradients``, ``optimizer``); ``details``: the shapes and
    assumptions behind them (cache length, tokens per pass, unsharded totals, ...).
    """

    kind: str  # "decode" or "train"
    mesh: dict[str, int]
    per_device: dict[str, int]
    details: dict[str, Any]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        """Peak bytes on one device: the sum of the components."""
        return sum(self.per_device.values())

    def fits(self, device_memory: int) -> bool:
        """Whether the total is at most ``device_memory`` bytes."""
        return self.total_bytes <= device_memory

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "mesh": self.mesh, "devices": self.devices,
                "per_device": dict(self.per_device), "total_bytes": self.total_bytes,
                "details": self.details}

    def format_table(self, device_memory: int | None = None) -> str:
        """A small table: one line per component, then the total (and the fit)."""
        mesh = ",".join(f"{a}={n}" for a, n in self.mesh.items())
        lines = [f"{self.kind} plan, per device ({self.devices} device(s), mesh {mesh}):"]
        lines += [f"  {name:<12}{format_bytes(n):>12}" for name, n in self.per_device.items()]
        lines.append(f"  {'total':<12}{format_bytes(self.total_bytes):>12}")
        if device_memory is not None:
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            lines.append(f"  {verdict} in {format_bytes(device_memory)} per device")
        return "\n".join(lines)


def mesh_shape(mesh: Mesh | AbstractMesh | Mapping[str, int] | str | None) -> dict[str, int]:
    """The axis sizes of ``mesh`` (a mesh, a mapping or ``"data=2,tensor=4"``; None: one
    device) over :data:`~orthrus_jax.sharding.MESH_AXES`. No device is needed."""
    if mesh is None:
        return dict.fromkeys(MESH_AXES, 1)
    sizes = parse_mesh_shape(mesh) if isinstance(mesh, str) else dict(mesh.shape) \
        if isinstance(mesh, (Mesh, AbstractMesh)) else dict(mesh)
    sizes = dict.fromkeys(MESH_AXES, 1) | sizes
    bad = {a: n for a, n in sizes.items() if a not in MESH_AXES or
           isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"mesh {sizes}: axes must be among {MESH_AXES} with sizes >= 1 "
                         f"(got {bad})")
    return sizes


class _Sharder:
    """Per-device shapes under the logical-axis ``rules`` on a mesh of ``sizes``."""

    def __init__(self, sizes: dict[str, int], rules: Rules | None):
        self.sizes = sizes
        self.rules = DEFAULT_RULES if rules is None else rules
        self.mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))

    def shards(self, logical: str) -> int:
        """Into how many pieces the rules split a dimension named ``logical``."""
        axes = self.rules.get(logical)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return math.prod(self.sizes.get(a, 1) for a in axes)

    def split(self, n: int, logical: str) -> int:
        """Per-device size of a dimension ``n`` named ``logical`` (rounded up: activations
        XLA pads)."""
        return -(-n // self.shards(logical))

    def array_bytes(self, shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...],
                    name: str) -> int:
        """Bytes one device holds of an array sharded by ``axes`` (uneven splits raise, as
        placing the array would)."""
        spec = logical_to_spec(axes, self.mesh, self.rules, shape, name)
        local = NamedSharding(self.mesh, spec).shard_shape(tuple(shape))
        return math.prod(local) * np.dtype(dtype).itemsize


def _variables(tree: Any) -> list[tuple[str, nnx.Variable]]:
    flat = nnx.to_flat_state(tree)
    return [(".".join(map(str, path)), var) for path, var in flat]


def _state_bytes(sharder: _Sharder, state: nnx.State, dtype: Any = None,
                 per_layer: bool = False) -> int:
    """Per-device bytes of every variable of ``state`` (cast to ``dtype`` if given).
    ``per_layer``: ``layers.*`` variables as the decoder holds them, ``L`` arrays each
    sharded like the stack minus its ``layers`` axis (``model.unstack_layers``)."""
    total = 0
    for name, var in _variables(state):
        value, axes = var.get_value(), tuple(var.get_metadata()["logical_axes"])
        dt = value.dtype if dtype is None else dtype
        if per_layer and name.startswith("layers."):
            total += value.shape[0] * sharder.array_bytes(value.shape[1:], dt, axes[1:], name)
        else:
            total += sharder.array_bytes(value.shape, dt, axes, name)
    return total


def _cache_bytes(sharder: _Sharder, config: ModelConfig, batch: int, length: int) -> int:
    """Per-device bytes of ``init_cache(config, batch, length)`` (stacked; the per-layer
    form holds the same bytes): K, V and the lengths."""
    cache = jax.eval_shape(lambda: init_cache(config, batch, length))
    kv = 2 * sharder.array_bytes(cache.k.shape, cache.k.dtype, CACHE_AXES, "kv_cache")
    return kv + sharder.array_bytes(cache.lengths.shape, cache.lengths.dtype, LENGTHS_AXES,
                                    "kv_cache.lengths")


def _planning_config(config: ModelConfig, dtype: str, block_size: int | None,
                     compute_dtype: str | None = None) -> ModelConfig:
    changes: dict[str, Any] = {"dtype": compute_dtype or dtype, "param_dtype": dtype}
    if block_size is not None:
        changes["block_size"] = block_size
    if config.mask_token_id is None:  # an HF config has none; any id plans the same
        changes["mask_token_id"] = 0
    return config.replace(**changes)


# ---------------------------------------------------------------------- activations
def _layer_pass_bytes(c: ModelConfig, sh: _Sharder, b: int, tokens: int, keys: int,
                      diffusion: bool, training: bool = False) -> int:
    """Live bytes of one decoder layer over ``tokens`` queries per row (``b`` rows on this
    device) attending to ``keys`` cached positions (the diffusion view: and to their own
    block of ``K``): the residual stream and projections, plus the larger of the attention
    scores and the MLP intermediates (they are never live together). See docs/memory.md
    for the formula."""
    e = np.dtype(c.jnp_dtype).itemsize
    hq, hkv = sh.split(c.num_attention_heads, "q_heads"), sh.split(c.num_key_value_heads,
                                                                      "kv_heads")
    f = sh.split(c.intermediate_size, "mlp")
    stream = b * tokens * e * (4 * c.hidden_size + 2 * (hq + 2 * hkv) * c.head_dim)
    mlp = 3 * b * tokens * f * e
    # Bytes per score. Decoding: the float32 scores (masked in place) and their
    # exponentials in the compute dtype; XLA keeps both or fuses the second into the
    # product with V (then half of this), so the estimate errs high. Training keeps what
    # the backward pass needs: the float32 scores and softmax (and, for the diffusion
    # view's two key sets, their combination) and the probabilities in the compute dtype.
    per_score = (3 * 4 + e if diffusion else 2 * 4 + e) if training else 4 + e
    scored = keys + c.block_size if diffusion else keys
    scores = b * hq * tokens * scored * per_score + b * tokens * keys  # + the mask
    return stream + max(mlp, scores)


def _gathered_layer_bytes(c: ModelConfig, sh: _Sharder, view_weights: int) -> int:
    """With ``fsdp > 1`` each layer's weights are all-gathered over ``fsdp`` before use:
    one layer's attention view and MLP, split only over ``tensor``."""
    if sh.shards("embed") == 1:
        return 0
    return view_weights // c.num_hidden_layers // sh.shards("mlp")


def _view_weight_bytes(c: ModelConfig) -> int:
    """Unsharded bytes of one view's attention projections and the MLP, all layers."""
    D, F, hd = c.hidden_size, c.intermediate_size, c.head_dim
    attn = D * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return c.num_hidden_layers * (attn + 3 * D * F) * np.dtype(c.jnp_param_dtype).itemsize


def _decode_activation_bytes(c: ModelConfig, sh: _Sharder, batch: int, cache_len: int,
                            prefill_tokens: int) -> dict[str, int]:
    """Estimated temporaries of decoding, per device: the larger of a prefill chunk
    (``prefill_tokens`` through the AR view over ``cache_len`` positions) and one Orthrus
    iteration (block ``K`` through the diffusion view, then the verify pass, and their
    logits), plus the gathered layer weights under FSDP and the token buffers. The
    per-layer cache feeds the attention products as it is: no pass copies K/V."""
    b = sh.split(batch, "batch")
    K = c.block_size
    v = sh.split(c.vocab_size, "vocab")
    prefill = _layer_pass_bytes(c, sh, b, prefill_tokens, cache_len, False)
    iteration = max(_layer_pass_bytes(c, sh, b, K, cache_len, True),
                    _layer_pass_bytes(c, sh, b, K, cache_len, False)) \
        + DECODE_LOGIT_ARRAYS * b * K * v * 4
    buffers = 2 * b * cache_len * 4  # int32 prompt and output token buffers
    gathered = _gathered_layer_bytes(c, sh, _view_weight_bytes(c))
    # Weights held in a narrower dtype than the compute dtype are converted before their
    # products; counted as if XLA does not fuse the conversion: the largest one, the LM
    # head, in the compute dtype.
    converted = 0
    if c.jnp_dtype != c.jnp_param_dtype:
        converted = v * sh.split(c.hidden_size, "embed") * np.dtype(c.jnp_dtype).itemsize
    return {"prefill": prefill, "iteration": iteration, "converted_weights": converted,
            "total": max(prefill, iteration) + buffers + gathered + converted}


def _train_activation_bytes(c: ModelConfig, sh: _Sharder, batch: int, seq_len: int,
                           anchors: int, loss_chunk: int, remat: bool) -> dict[str, int]:
    """Estimated activations of one train micro-step, per device (the teacher's K/V
    cache is counted apart): the hidden states held throughout, plus the larger of the
    teacher layer (before the diffusion pass) and what the diffusion pass saves for its
    backward plus the larger of a layer's backward and one loss chunk."""
    b = sh.split(batch, "batch")
    e = np.dtype(c.jnp_dtype).itemsize
    K, D, L = c.block_size, c.hidden_size, c.num_hidden_layers
    N = anchors * K  # diffusion tokens per row
    v = sh.split(c.vocab_size, "vocab")
    teacher_layer = _layer_pass_bytes(c, sh, b, seq_len, seq_len, False, training=True)
    diff_layer = _layer_pass_bytes(c, sh, b, N, seq_len, True, training=True)
    # teacher hidden [b, S, D]; draft and gathered teacher hidden, each also padded into
    # loss chunks: 4 x [b, m, K, D]
    held = b * seq_len * D * e + 4 * b * N * D * e
    if remat:  # the scan saves each layer's input; a layer's backward recomputes its
        saved = L * b * N * D * e  # forward and adds the scores' cotangents (~1.25x)
        backward = diff_layer * 5 // 4
    else:  # every layer saves its forward temporaries (scores, softmax, stream, MLP)
        saved = L * diff_layer
        backward = diff_layer // 2  # the scores' float32 cotangents, on top of them
    chunk = min(loss_chunk, anchors)
    loss = LOSS_LOGIT_ARRAYS * b * chunk * (K - 1) * v * 4
    gathered = _gathered_layer_bytes(c, sh, 2 * _view_weight_bytes(c))
    return {"teacher_layer": teacher_layer, "diffusion_backward": backward, "loss_chunk": loss,
            "saved": saved + held,
            "total": held + max(teacher_layer, saved + max(backward, loss)) + gathered}


# ---------------------------------------------------------------------- planners
def decode_cache_len(config: ModelConfig, context: int, *, max_new_tokens: int | None = None,
                     max_len: int | None = None) -> int:
    """Cache positions per row that :class:`infer.engine.Generator` allocates, at most
    ``max_len`` (default: ``max_position_embeddings``), with ``K = config.block_size``.

    Without ``max_new_tokens``, ``context`` is the tokens a row holds (prompt + output)
    and the cache is the smallest cache length (:func:`orthrus_jax.cache.cache_bucket`)
    holding them and a verify block: ``context + K``. With it, ``context`` is the prompt
    length and the cache is exactly the engine's: the cache length holding the prompt and
    ``max_new_tokens - 1`` generated tokens (the newest is not cached).
    """
    K = config.block_size
    cap = max_len or config.max_position_embeddings
    if max_new_tokens is None:
        return min(cache_bucket(context + K), cap)
    return min(cache_bucket(context + max_new_tokens - 1), cap)


def plan_decode(config: ModelConfig, *, dtype: str, batch: int, context: int,
                block_size: int | None = None, mesh: Any = None, rules: Rules | None = None,
                max_new_tokens: int | None = None, max_len: int | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                compute_dtype: str | None = None) -> MemoryPlan:
    """Per-device memory of decoding ``batch`` rows with :class:`infer.engine.Generator`:
    ``context`` tokens per row (prompt + output), or, with ``max_new_tokens``, a prompt of
    ``context`` tokens plus that many new ones (:func:`decode_cache_len`).

    Weights are held once, in per-layer form, cast to ``dtype``; the KV cache and the
    activations are in ``compute_dtype`` (default ``dtype``: the engine's
    ``compute_dtype``, e.g. bfloat16 weights with float32 compute); ``block_size``
    overrides the config's ``K``; ``mesh`` (a mesh, a mapping of axis sizes or
    ``"data=1,tensor=8"``) and ``rules`` shard them as
    :func:`orthrus_jax.sharding.shard_model` would.
    """
    c = _planning_config(config, dtype, block_size, compute_dtype)
    sh = _Sharder(mesh_shape(mesh), rules)
    cache_len = decode_cache_len(c, context, max_new_tokens=max_new_tokens, max_len=max_len)
    if context >= cache_len:
        raise ValueError(f"context {context} leaves no room in a cache of {cache_len} "
                         f"positions (max_len {max_len or c.max_position_embeddings})")
    prefill_tokens = min(prompt_len_bucket(context), chunk_size)
    state = nnx.state(abstract_model(c))
    cache = _cache_bytes(sh, c, batch, cache_len)
    acts = _decode_activation_bytes(c, sh, batch, cache_len, prefill_tokens)
    per_device = {"weights": _state_bytes(sh, state, per_layer=True), "cache": cache,
                  "activations": acts["total"]}
    details = {"dtype": dtype, "compute_dtype": c.dtype, "batch": batch, "context": context,
               "max_new_tokens": max_new_tokens, "cache_len": cache_len,
               "block_size": c.block_size, "prefill_tokens": prefill_tokens,
               "unsharded_weights": tree_bytes(state),
               "unsharded_cache": tree_bytes(jax.eval_shape(
                   lambda: init_cache(c, batch, cache_len))),
               "activation_terms": acts}
    return MemoryPlan("decode", sh.sizes, per_device, details)


def plan_train(config: ModelConfig, *, dtype: str, batch: int, seq_len: int,
               anchors_per_seq: int, block_size: int, mesh: Any = None,
               rules: Rules | None = None, remat: bool = True,
               loss_chunk: int = 16) -> MemoryPlan:
    """Per-device memory of one train step (:class:`train.step.Trainer`, ``grad_accum=1``)
    on ``batch`` sequences of ``seq_len`` tokens with ``anchors_per_seq`` blocks of
    ``block_size``.

    Components: the frozen backbone in ``dtype`` (``weights``); the diffusion tensors in
    float32 (``trainable``), their gradients (float32) and AdamW's two float32 moments
    (``optimizer``), all sharded like the tensors; the teacher's K/V cache of the batch
    (``cache``); and the activation estimate for ``remat`` (per-layer recomputation,
    ``train.main --remat``).
    """
    c = _planning_config(config, dtype, block_size)
    if seq_len < c.block_size + 1:
        raise ValueError(f"seq_len {seq_len} is below block size + 1 ({c.block_size + 1})")
    sh = _Sharder(mesh_shape(mesh), rules)
    _, diffusion, backbone = nnx.split(abstract_model(c), DiffusionParam, ...)
    trainable = _state_bytes(sh, diffusion, jnp.float32)
    acts = _train_activation_bytes(c, sh, batch, seq_len, anchors_per_seq, loss_chunk, remat)
    per_device = {"weights": _state_bytes(sh, backbone), "trainable": trainable,
                  "gradients": trainable, "optimizer": 2 * trainable,
                  "cache": _cache_bytes(sh, c, batch, seq_len), "activations": acts["total"]}
    details = {"dtype": dtype, "batch": batch, "seq_len": seq_len,
               "anchors_per_seq": anchors_per_seq, "block_size": c.block_size,
               "remat": remat, "loss_chunk": loss_chunk,
               "unsharded_weights": tree_bytes(backbone),
               "unsharded_trainable_f32": tree_bytes(diffusion) * 4
               // np.dtype(c.jnp_param_dtype).itemsize,
               "activation_terms": acts}
    return MemoryPlan("train", sh.sizes, per_device, details)
