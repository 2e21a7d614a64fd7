"""Building blocks: the variable types, RMSNorm, the MLP and the attention projections of
both views (RoPE is :mod:`orthrus_jax.rope`).

Weights are stacked over layers (leading ``layers`` axis) so the layers run as one
``lax.scan``; the decoder splits them per layer (``model.unstack_layers``). Every weight
carries ``logical_axes`` metadata for sharding.
"""

from __future__ import annotations

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


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` for one layer's weights ``p``; ``x``: ``[..., D]``."""
    dt = x.dtype
    gate = jnp.einsum("btd,df->btf", x, p["gate_proj"].astype(dt))
    up = jnp.einsum("btd,df->btf", x, p["up_proj"].astype(dt))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down_proj"].astype(dt))


def project_qkv(p: dict, x: jax.Array, rope_at: tuple[jax.Array, jax.Array],
                config: ModelConfig):
    """q ``[B, T, Hq, hd]``, k and v ``[B, T, Hkv, hd]`` for one layer's projections
    ``p``: projection, bias, per-head norm, RoPE with the tables ``rope_at`` of the
    tokens' positions (:func:`orthrus_jax.rope.rope_tables`)."""
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, p["q_proj"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, p["k_proj"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, p["v_proj"].astype(dt))
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


def project_out(p: dict, o: jax.Array, config: ModelConfig) -> jax.Array:
    """Output projection of attention heads ``o [B, T, Hq, hd]`` -> ``[B, T, D]``."""
    out = jnp.einsum("bthk,hkd->btd", o, p["o_proj"].astype(o.dtype))
    if config.o_bias:
        out = out + p["o_bias"].astype(o.dtype)
    return out
