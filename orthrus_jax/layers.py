"""Building blocks: the variable types, RMSNorm, the MLP and the attention projections of
both views (RoPE is :mod:`orthrus_jax.rope`).

Weights are stacked over layers (leading ``layers`` axis) so the layers run as one
``lax.scan``; the decoder splits them per layer (``model.unstack_layers``). Every weight
carries ``logical_axes`` metadata for sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from orthrus_jax.config import ModelConfig
from orthrus_jax.rope import rope


class DiffusionParam(nnx.Param):
    """A trainable tensor of the diffusion view; everything else is the frozen backbone.

    ``nnx.split(model, DiffusionParam, ...)`` separates the two trees.
    """


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, fan_in: int) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5).astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * w`` in float32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class AttentionProjections(nnx.Module):
    """q/k/v/o projections (and q/k norms, biases) of one attention view, stacked over
    layers. ``kind`` is :class:`nnx.Param` for the AR view, :class:`DiffusionParam` for
    the diffusion view.

    Shapes: ``q_proj [L, D, Hq, hd]``, ``k_proj``/``v_proj [L, D, Hkv, hd]``,
    ``o_proj [L, Hq, hd, D]``, ``q_norm``/``k_norm [L, hd]``.
    """

    def __init__(self, config: ModelConfig, kind: type[nnx.Param], *, rngs: nnx.Rngs):
        c = config
        L, D, Hq, Hkv, hd = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                             c.num_key_value_heads, c.head_dim)
        dt = c.jnp_param_dtype
        self.q_proj = kind(_init(rngs, (L, D, Hq, hd), dt, D),
                           logical_axes=("layers", "embed", "q_heads", "head_dim"))
        self.k_proj = kind(_init(rngs, (L, D, Hkv, hd), dt, D),
                           logical_axes=("layers", "embed", "kv_heads", "head_dim"))
        self.v_proj = kind(_init(rngs, (L, D, Hkv, hd), dt, D),
                           logical_axes=("layers", "embed", "kv_heads", "head_dim"))
        self.o_proj = kind(_init(rngs, (L, Hq, hd, D), dt, Hq * hd),
                           logical_axes=("layers", "q_heads", "head_dim", "embed"))
        if c.qk_norm:
            self.q_norm = kind(jnp.ones((L, hd), dt), logical_axes=("layers", "head_dim"))
            self.k_norm = kind(jnp.ones((L, hd), dt), logical_axes=("layers", "head_dim"))
        if c.qkv_bias:
            self.q_bias = kind(jnp.zeros((L, Hq, hd), dt),
                               logical_axes=("layers", "q_heads", "head_dim"))
            self.k_bias = kind(jnp.zeros((L, Hkv, hd), dt),
                               logical_axes=("layers", "kv_heads", "head_dim"))
            self.v_bias = kind(jnp.zeros((L, Hkv, hd), dt),
                               logical_axes=("layers", "kv_heads", "head_dim"))
        if c.o_bias:
            self.o_bias = kind(jnp.zeros((L, D), dt), logical_axes=("layers", "embed"))


class MLP(nnx.Module):
    """SwiGLU MLP stacked over layers: ``gate_proj``/``up_proj [L, D, F]``,
    ``down_proj [L, F, D]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        L, D, F = config.num_hidden_layers, config.hidden_size, config.intermediate_size
        dt = config.jnp_param_dtype
        self.gate_proj = nnx.Param(_init(rngs, (L, D, F), dt, D),
                                   logical_axes=("layers", "embed", "mlp"))
        self.up_proj = nnx.Param(_init(rngs, (L, D, F), dt, D),
                                 logical_axes=("layers", "embed", "mlp"))
        self.down_proj = nnx.Param(_init(rngs, (L, F, D), dt, F),
                                   logical_axes=("layers", "mlp", "embed"))


# The projections by name, with how many leading input axes each has in the training form
# (``[in..., out...]``); the decoder may hold them ``[out..., in...]``
# (``model.set_out_in``).
PROJECTIONS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
               "gate_proj": 1, "up_proj": 1, "down_proj": 1}

# Rows up to which an ``[out, in]`` weight is applied as ``W @ x^T`` (see :func:`project`).
_WEIGHT_FIRST_ROWS = 8


def project(x: jax.Array, w: jax.Array, n_in: int, weights_out_in: bool = False) -> jax.Array:
    """``x [..., in...]`` times one layer's weight -> ``[..., out...]`` in ``x.dtype``.

    ``w`` is ``[in..., out...]`` (``n_in`` input axes), or with ``weights_out_in``
    ``[out..., in...]``, the decoder's form on CPU. There, a pass of 2 to 8 rows runs as
    ``(W @ x^T)^T``: XLA's CPU matrix product reads a weight about 20 % faster as its left
    operand than in ``x @ W`` (SmolLM2's 30 layers: 4 rows 32 -> 26 ms, 8 rows 37 -> 30;
    2 rows 24.8 -> 25.6, the one count that loses a little). The optimization barriers
    keep XLA from folding the transposes back into ``x @ W``. One row, or more than 8,
    take the plain product, as fast in either form.
    """
    w = w.astype(x.dtype)
    n_out = w.ndim - n_in
    if not weights_out_in:
        ins, outs = "ijk"[:n_in], "uvw"[:n_out]
        return jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x, w)
    lead, out_shape = x.shape[:x.ndim - n_in], w.shape[:n_out]
    rows = math.prod(lead)
    x2 = x.reshape(rows, -1)
    w2 = w.reshape(math.prod(out_shape), -1)
    if 1 < rows <= _WEIGHT_FIRST_ROWS:
        y = jax.lax.dot_general(w2, jax.lax.optimization_barrier(x2), (((1,), (1,)), ((), ())))
        y = jax.lax.optimization_barrier(y).T
    else:
        y = jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())))
    return y.reshape(*lead, *out_shape)


def mlp(p: dict, x: jax.Array, weights_out_in: bool = False) -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` for one layer's weights ``p``; ``x``: ``[..., D]``."""
    gate = project(x, p["gate_proj"], 1, weights_out_in)
    up = project(x, p["up_proj"], 1, weights_out_in)
    return project(jax.nn.silu(gate) * up, p["down_proj"], 1, weights_out_in)


def project_qkv(p: dict, x: jax.Array, rope_at: tuple[jax.Array, jax.Array],
                config: ModelConfig, weights_out_in: bool = False):
    """q ``[B, T, Hq, hd]``, k and v ``[B, T, Hkv, hd]`` for one layer's projections
    ``p`` (in the form :func:`project` names by ``weights_out_in``): projection, bias,
    per-head norm, RoPE with the tables ``rope_at`` of the tokens' positions
    (:func:`orthrus_jax.rope.rope_tables`)."""
    dt = x.dtype
    q = project(x, p["q_proj"], 1, weights_out_in)
    k = project(x, p["k_proj"], 1, weights_out_in)
    v = project(x, p["v_proj"], 1, weights_out_in)
    if config.qkv_bias:
        q = q + p["q_bias"].astype(dt)
        k = k + p["k_bias"].astype(dt)
        v = v + p["v_bias"].astype(dt)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    q = rope(q, rope_at)
    k = rope(k, rope_at)
    return q, k, v


def project_out(p: dict, o: jax.Array, config: ModelConfig,
                weights_out_in: bool = False) -> jax.Array:
    """Output projection of attention heads ``o [B, T, Hq, hd]`` -> ``[B, T, D]``."""
    out = project(o, p["o_proj"], 2, weights_out_in)
    if config.o_bias:
        out = out + p["o_bias"].astype(o.dtype)
    return out
