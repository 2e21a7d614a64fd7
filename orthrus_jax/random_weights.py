"""Models of random weights for a config's shape, built a tensor at a time.

Timing and memory checks (``python -m train.device_check``, ``python -m infer.passes
--config``) need a model of the real shape, not real weights. Building it as
``OrthrusLM(config, rngs)`` inside one jitted program asks the compiler for every random
draw at once: at the Qwen3-8B shape in bfloat16 one buffer of 73 GB, for 19 GB of
parameters. Here each tensor is its own small program that writes its values directly in
the parameter dtype and on its sharding (the layer weights directly in the form asked
for: per-layer arrays for decoding, ``[L, ...]`` stacks for training), largest tensors
first, so the build holds the parameters and one tensor's draw at most.

The values: norms are ones, biases zeros, every other weight uniform with the standard
deviation ``fan_in ** -0.5`` of :class:`orthrus_jax.layers` (the embedding 1); the
diffusion view equals the AR view, as in the published recipe. The draws use JAX's
``rbg`` generator (one pass over the output, no temporaries), so the values depend on the
seed and the backend: they are for measuring, not for reproducing a model.
"""

from __future__ import annotations

import zlib
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, Sharding

from orthrus_jax.checkpoint import LAYERS, merge_values, param_targets
from orthrus_jax.config import ModelConfig
from orthrus_jax.memory import tree_bytes
from orthrus_jax.model import AR_VIEW, DIFFUSION_VIEW, OrthrusLM, layer_sharding
from orthrus_jax.sharding import Rules

# Parameter names (the last part of a path) whose values are constant.
ONES = frozenset({"input_norm", "post_attn_norm", "norm", "q_norm", "k_norm"})
ZEROS = frozenset({"q_bias", "k_bias", "v_bias", "o_bias"})


def fan_in(config: ModelConfig, name: str) -> int:
    """The fan-in that sets the scale of weight ``name`` (the embedding's is 1)."""
    c = config
    table = {"embed_tokens": 1, "lm_head": c.hidden_size, "q_proj": c.hidden_size,
             "k_proj": c.hidden_size, "v_proj": c.hidden_size,
             "o_proj": c.num_attention_heads * c.head_dim, "gate_proj": c.hidden_size,
             "up_proj": c.hidden_size, "down_proj": c.intermediate_size}
    if name not in table:
        raise ValueError(f"parameter {name}: no random initialisation is defined for it")
    return table[name]


def abstract_params(config: ModelConfig, *, per_layer: bool = False, mesh: Mesh | None = None,
                    rules: Rules | None = None) -> OrthrusLM:
    """The model of ``config`` with ``ShapeDtypeStruct`` leaves carrying their shardings
    (on ``mesh`` by ``rules``, or the default device), the layer weights per layer or
    stacked: what :func:`random_model` and a model folder load would hold, without memory.
    Programs lowered with it compile exactly as with the real model."""
    return _build(config, per_layer, mesh, rules, seed=None)


def random_model(config: ModelConfig, *, seed: int = 0, per_layer: bool = True,
                 mesh: Mesh | None = None, rules: Rules | None = None) -> OrthrusLM:
    """A model of random weights (see the module doc), in ``config.param_dtype``; layer
    weights per layer (the decoder's form, the default) or stacked. The same seed gives
    the same values in either form on one backend."""
    return _build(config, per_layer, mesh, rules, seed=seed)


def _build(config: ModelConfig, per_layer: bool, mesh: Mesh | None, rules: Rules | None,
           seed: int | None) -> OrthrusLM:
    """The model's leaves drawn with ``seed``, or left abstract (``seed=None``)."""
    graphdef, state, target = param_targets(config, mesh, rules)
    values: dict[tuple[str, ...], object] = {}
    for path in sorted(target, key=lambda p: -tree_bytes(target[p])):  # largest first
        s = target[path]
        if path[0] != LAYERS:
            values[path] = s if seed is None else _value(config, path, s, seed)
            continue
        one = jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=layer_sharding(s.sharding))
        layers = range(s.shape[0])
        if per_layer:
            values[path] = tuple(one if seed is None else
                                 _value(config, (*path, str(i)), one, seed) for i in layers)
        elif seed is None:
            values[path] = s
        else:
            stack = _constant(s.shape, s.dtype, 0.0, s.sharding)
            for i in layers:  # in place: the stack and one layer's draw are held
                stack = _put_layer(stack, _value(config, (*path, str(i)), one, seed), i)
            values[path] = stack
    return merge_values(graphdef, state, values)


def _value(config: ModelConfig, path: tuple[str, ...], s: jax.ShapeDtypeStruct,
           seed: int) -> jax.Array:
    """One tensor (one layer's part of a layer weight: ``path`` ends in its layer)."""
    layer = int(path[-1]) if path[0] == LAYERS else 0
    name = path[-2] if path[0] == LAYERS else path[-1]
    if name in ONES or name in ZEROS:
        return _constant(s.shape, s.dtype, 1.0 if name in ONES else 0.0, s.sharding)
    # The diffusion view draws with the AR view's keys: the two start equal.
    stem = ".".join(AR_VIEW if part == DIFFUSION_VIEW else part
                    for part in (path[:-1] if path[0] == LAYERS else path))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl="rbg"),
                                                zlib.crc32(stem.encode())), layer)
    return _uniform(key, s.shape, s.dtype, fan_in(config, name) ** -0.5, s.sharding)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _constant_fn(shape, dtype, value, sharding):
    return jax.lax.with_sharding_constraint(jnp.full(shape, value, dtype), sharding)


def _constant(shape, dtype, value: float, sharding: Sharding) -> jax.Array:
    return _constant_fn(tuple(shape), jnp.dtype(dtype), value, sharding)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _uniform_fn(key, shape, dtype, std, sharding):
    limit = std * 3**0.5  # the standard deviation of U(-a, a) is a / sqrt(3)
    out = jax.random.uniform(key, shape, dtype, -limit, limit)
    return jax.lax.with_sharding_constraint(out, sharding)


def _uniform(key: jax.Array, shape, dtype, std: float, sharding: Sharding) -> jax.Array:
    return _uniform_fn(key, tuple(shape), jnp.dtype(dtype), float(std), sharding)


@partial(jax.jit, donate_argnums=0)
def _put_layer(stack: jax.Array, part: jax.Array, i: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, part, i, 0)
