"""The Orthrus model in Flax NNX: a frozen Qwen3-family decoder plus the trainable
diffusion view of every layer's attention.

Both views share one decoder-layer body (in ``OrthrusLM._run_layers``); they differ only in the
attention projections (``layers.attn`` vs ``layers.diff_attn``) and in which keys the
queries see (causal over the cache vs cached prefix + own block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from orthrus_jax import cpu_attention
from orthrus_jax.attention import block_attention, causal_cache_attention, over_window
from orthrus_jax.cache import KVCache, layer_kv, stack_cache, unstack_cache, write_block
from orthrus_jax.config import ModelConfig
from orthrus_jax.cpu_attention import supports
from orthrus_jax.heap import release_memory
from orthrus_jax.layers import (
    MLP,
    PROJECTIONS,
    AttentionProjections,
    DiffusionParam,
    _init,
    mlp,
    project_out,
    project_qkv,
    rms_norm,
)
from orthrus_jax.rope import rope_tables

# The two attention views, by the name of their projections in ``DecoderLayers``.
AR_VIEW = "attn"
DIFFUSION_VIEW = "diff_attn"


class DecoderLayers(nnx.Module):
    """All decoder layers, weights stacked on a leading ``layers`` axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        L, D = config.num_hidden_layers, config.hidden_size
        dt = config.jnp_param_dtype
        self.input_norm = nnx.Param(jnp.ones((L, D), dt), logical_axes=("layers", "norm"))
        self.post_attn_norm = nnx.Param(jnp.ones((L, D), dt), logical_axes=("layers", "norm"))
        self.attn = AttentionProjections(config, nnx.Param, rngs=rngs)
        self.diff_attn = AttentionProjections(config, DiffusionParam, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        # Whether the projections are held per layer as ``[out..., in...]`` (static; see
        # :func:`set_out_in`).
        self.out_in = False
        # The diffusion view starts as a copy of the AR view, as in the published recipe.
        for name, var in vars(self.attn).items():
            if isinstance(var, nnx.Variable):
                getattr(self.diff_attn, name).set_value(jnp.array(var.get_value()))


class OrthrusLM(nnx.Module):
    """Embedding, decoder layers, final norm and LM head (tied or not).

    Parameter tree: ``embed_tokens [V, D]``, ``layers.{input_norm, post_attn_norm, attn,
    diff_attn, mlp}``, ``norm [D]``, ``lm_head [D, V]`` (absent when tied). The tensors of
    ``layers.diff_attn`` are :class:`DiffusionParam`; all others are frozen ``nnx.Param``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        dt = config.jnp_param_dtype
        self.embed_tokens = nnx.Param(_init(rngs, (V, D), dt, 1), logical_axes=("vocab", "embed"))
        self.layers = DecoderLayers(config, rngs=rngs)
        self.norm = nnx.Param(jnp.ones((D,), dt), logical_axes=("norm",))
        self.lm_head = (None if config.tie_word_embeddings else
                        nnx.Param(_init(rngs, (D, V), dt, D), logical_axes=("embed", "vocab")))
        # Whether decode passes attend through the CPU kernel (static; see
        # :func:`set_attention_kernel`).
        self.attention_kernel = False

    def _kernel(self, rows: int) -> bool:
        """Whether a pass of ``rows`` query rows per KV head attends through the kernel."""
        c = self.config
        return self.attention_kernel and supports(c.jnp_dtype, c.head_dim, rows)

    # ---------------------------------------------------------------- pieces
    def embed(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T]`` -> ``[B, T, D]`` in the compute dtype."""
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.jnp_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed ``hidden [..., D]`` -> float32 logits ``[..., V]``."""
        h = hidden.astype(self.config.jnp_dtype)
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(h.dtype)
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)

    def _layer_params(self, view: str) -> dict:
        layers = nnx.to_pure_dict(nnx.state(self.layers))
        return {"input_norm": layers["input_norm"], "post_attn_norm": layers["post_attn_norm"],
                "attn": layers[view], "mlp": layers["mlp"]}

    @property
    def per_layer(self) -> bool:
        """Whether the layer weights are per-layer arrays (:func:`unstack_layers`), the
        decoding form; a cache for it is best made with ``init_cache(..., per_layer=True)``."""
        return is_unstacked(self.layers.input_norm.get_value())

    @property
    def out_in(self) -> bool:
        """Whether the per-layer projections are held ``[out..., in...]``
        (:func:`set_out_in`), the decoder's form on CPU."""
        return self.layers.out_in

    # ---------------------------------------------------------------- views
    def ar_hidden(self, tokens: jax.Array, cache: KVCache, num_valid: jax.Array | None = None,
                  remat: bool = False, rows: jax.Array | None = None
                  ) -> tuple[jax.Array, KVCache]:
        """AR view over a chunk ``tokens [B, T]`` placed at each row's ``cache.lengths``.

        Writes the chunk's K/V into the cache, attends causally, and advances each row's
        length by ``num_valid[b]`` (default ``T``; tokens past it are padding whose K/V
        land in the stale region). Returns the final-normed hidden ``[B, T, D]`` and the
        cache in the form it came in (stacked or per layer). ``remat`` recomputes each
        layer in the backward pass. ``rows [B]`` (int32): the cache rows the chunk's rows
        read and write (default: the first ``B``), ``cache.lengths`` being theirs
        (``[B]``); the other rows are neither read nor changed (a prefill into some
        slots of a larger cache, in place).
        """
        c = self.config
        T = tokens.shape[1]
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        per_layer_cache = cache.per_layer
        if per_layer_cache and not self.per_layer:
            cache = stack_cache(cache)  # a traced layer index needs the stack

        need = jnp.max(cache.lengths) + T  # every key a query of the chunk may see

        # the kernel reads the first rows only: rows elsewhere go through XLA's products
        kernel = rows is None and self._kernel(c.num_attention_heads
                                               // c.num_key_value_heads * T)

        def attention(q, k, v, layer, kv):
            kv = (write_block(kv[0], layer, k, positions, rows),
                  write_block(kv[1], layer, v, positions, rows))
            # the kernel reads each row's live keys itself: no window, no row slice
            o = over_window(lambda kc, vc: causal_cache_attention(q, kc, vc, positions,
                                                                  kernel=kernel),
                            layer_kv(kv[0], layer), layer_kv(kv[1], layer),
                            () if kernel else cache.windows, need,
                            tokens.shape[0] if rows is None else rows,
                            slice_rows=not kernel)
            return o, kv

        x, (k, v) = self._run_layers(AR_VIEW, self.embed(tokens), positions, attention,
                                     (cache.k, cache.v), remat)
        step = T if num_valid is None else num_valid.astype(jnp.int32)
        out = dataclasses.replace(cache, k=k, v=v, lengths=cache.lengths + step)
        if per_layer_cache:
            out = unstack_cache(out)
        return rms_norm(x, self.norm[...], c.rms_norm_eps), out

    def tree_hidden(self, tokens: jax.Array, offsets: jax.Array, visible: jax.Array,
                    cache: KVCache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """AR view over a token tree ``tokens [B, T]``, writing nothing.

        Row ``t`` sits at position ``cache.lengths[b] + offsets[b, t]`` (its RoPE position)
        and attends to the committed cache ``[0, lengths[b])`` and to the rows ``s`` with
        ``visible[b, t, s]`` (itself and its ancestors). A causal ``visible`` with
        ``offsets = arange(T)`` is the chain :meth:`ar_hidden` computes. Returns the
        final-normed hidden ``[B, T, D]`` and the rows' K/V ``[layers, B, T, kv_heads,
        head_dim]`` each, for :func:`orthrus_jax.cache.write_rows` to place the accepted
        ones.
        """
        c = self.config
        B, T = tokens.shape
        positions = cache.lengths[:, None] + offsets.astype(jnp.int32)
        if cache.per_layer and not self.per_layer:
            cache = stack_cache(cache)  # a traced layer index needs the stack
        shape = (c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim)
        buffers = (jnp.zeros(shape, c.jnp_dtype), jnp.zeros(shape, c.jnp_dtype))

        need = jnp.max(cache.lengths)

        kernel = self._kernel(c.num_attention_heads // c.num_key_value_heads * T)

        def attention(q, k, v, layer, kv):
            o = over_window(lambda kc, vc: block_attention(
                q[:, None], kc, vc, k[:, None], v[:, None], cache.lengths[:, None],
                visible[:, None], kernel=kernel), layer_kv(cache.k, layer),
                layer_kv(cache.v, layer), () if kernel else cache.windows, need, B,
                slice_rows=not kernel)
            kv = tuple(jax.lax.dynamic_update_index_in_dim(buf, new.astype(buf.dtype), layer, 0)
                       for buf, new in zip(kv, (k, v), strict=True))
            return o[:, 0], kv

        x, kv = self._run_layers(AR_VIEW, self.embed(tokens), positions, attention, buffers)
        return rms_norm(x, self.norm[...], c.rms_norm_eps), kv

    def diffusion_hidden(self, block: jax.Array, cache: KVCache) -> jax.Array:
        """Diffusion view over one block per row, ``block [B, K]`` (``[anchor, MASK, ...]``)
        at positions ``cache.lengths[b] + i``: it attends to the cached prefix
        ``[0, lengths[b])`` and to its whole block, and writes nothing. Returns the
        final-normed hidden ``[B, K, D]``."""
        return self.diffusion_blocks(block[:, None], cache.lengths[:, None], cache)[:, 0]

    def diffusion_blocks(self, blocks: jax.Array, anchors: jax.Array, cache: KVCache,
                         remat: bool = False) -> jax.Array:
        """Diffusion view over ``m`` blocks per row at once (the training form).

        ``blocks [B, m, K]`` sit at positions ``anchors[b, j] + i``; block ``j`` attends to
        the AR K/V of ``cache`` at positions ``< anchors[b, j]`` and to its own block.
        Returns the final-normed hidden ``[B, m, K, D]``.
        """
        c = self.config
        B, m, K = blocks.shape
        positions = (anchors[:, :, None] + jnp.arange(K, dtype=jnp.int32)).reshape(B, m * K)

        if cache.per_layer and not self.per_layer:
            cache = stack_cache(cache)  # a traced layer index needs the stack

        need = jnp.max(anchors)

        kernel = self._kernel(c.num_attention_heads // c.num_key_value_heads * m * K)

        def attention(q, k, v, layer, state):
            split = lambda t: t.reshape(B, m, K, *t.shape[2:])  # noqa: E731
            o = over_window(lambda kc, vc: block_attention(split(q), kc, vc, split(k), split(v),
                                                           anchors, kernel=kernel),
                            layer_kv(cache.k, layer), layer_kv(cache.v, layer),
                            () if kernel else cache.windows, need, B, slice_rows=not kernel)
            return o.reshape(B, m * K, *o.shape[3:]), state

        x, _ = self._run_layers(DIFFUSION_VIEW, self.embed(blocks.reshape(B, m * K)), positions,
                                attention, (), remat)
        return rms_norm(x, self.norm[...], c.rms_norm_eps).reshape(B, m, K, -1)

    def __call__(self, tokens: jax.Array, cache: KVCache,
                 num_valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """AR forward returning float32 logits ``[B, T, V]`` and the updated cache."""
        hidden, cache = self.ar_hidden(tokens, cache, num_valid)
        return self.logits(hidden), cache

    def _run_layers(self, view: str, x: jax.Array, positions: jax.Array,
                    attention: Callable, state, remat: bool = False):
        """Run the shared decoder-layer body over the layers of one view.

        ``attention(q, k, v, layer, state) -> (o, state)`` is the view's attention;
        ``state`` (the cache being written, or ``()``) is threaded through the layers.
        Stacked weights run as one ``lax.scan`` (with ``remat``, each layer is recomputed
        in the backward pass); the per-layer weights of :func:`unstack_layers` run as an
        unrolled loop.
        """
        c = self.config
        params = self._layer_params(view)
        wo = self.out_in
        rope_at = rope_tables(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # all layers

        def body(carry, layer, p):
            x, state = carry
            h = rms_norm(x, p["input_norm"], c.rms_norm_eps)
            q, k, v = project_qkv(p["attn"], h, rope_at, c, wo)
            o, state = attention(q, k, v, layer, state)
            x = x + project_out(p["attn"], o, c, wo)
            x = x + mlp(p["mlp"], rms_norm(x, p["post_attn_norm"], c.rms_norm_eps), wo)
            return x, state

        if is_unstacked(params["input_norm"]):
            for layer in range(c.num_hidden_layers):
                p = jax.tree.map(lambda a: a[layer], params, is_leaf=is_unstacked)  # noqa: B023
                x, state = body((x, state), layer, p)
            return x, state

        def scan_body(carry, layer):
            # Each layer reads its weights as a dynamic slice of the stack. XLA copies that
            # slice before the layer's products (why decoding uses ``unstack_layers``);
            # scanning over the stacks as ``xs`` measured 2.8x slower still on CPU.
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False),
                             params)
            return body(carry, layer, p), None

        if remat:
            scan_body = jax.checkpoint(scan_body)
        layers = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, state), _ = jax.lax.scan(scan_body, (x, state), layers)
        return x, state


def split_trainable(model: OrthrusLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, diffusion, backbone)``: the trainable :class:`DiffusionParam` subtree
    and the frozen rest, separated by variable type; ``nnx.merge`` joins them."""
    return nnx.split(model, DiffusionParam, ...)


def is_unstacked(value) -> bool:
    """Whether a layer weight is held as a tuple of per-layer arrays (see
    :func:`unstack_layers`)."""
    return isinstance(value, tuple)


def unstack_layers(model: OrthrusLM) -> OrthrusLM:
    """A model for decoding whose layer weights are tuples of per-layer arrays.

    With stacked ``[L, ...]`` weights every layer of a step first copies its slice out of
    the stack (XLA does not feed a dynamic slice to a dot in place; the copies cost more
    than the matrix-vector products of a decode step on CPU). Per-layer arrays run as an
    unrolled layer loop with no copy, at the price of compiling every layer. The layer
    weights are new arrays (sharded like the stacked ones minus the ``layers`` axis; both
    forms are in memory until ``model`` is dropped), the other parameters are shared.
    Returns ``model`` itself if already unstacked. Training keeps the stacked form (scan,
    remat).
    """
    if is_unstacked(model.layers.input_norm.get_value()):
        return model
    graphdef, state = nnx.split(model)
    state["layers"] = jax.tree.map(lambda var: var.replace(value=_per_layer(var.get_value())),
                                   state["layers"],
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def decoding_form(model: OrthrusLM, out_in: bool | None = None) -> OrthrusLM:
    """``model`` in the decoder's form: per-layer weights (:func:`unstack_layers`), their
    projections ``[out..., in...]`` where ``out_in`` (default: where the weights live on
    CPU, whose matrix products of a few rows run faster that way; see
    :func:`set_out_in`)."""
    model = unstack_layers(model)
    if out_in is None:
        out_in = weights_platform(model) == "cpu"
    return set_out_in(model, out_in)


def weights_platform(model: OrthrusLM) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of the devices holding ``model``."""
    sharding = model.embed_tokens.get_value().sharding
    if sharding is None:  # abstract, unplaced
        return jax.default_backend()
    return next(iter(sharding.device_set)).platform


def set_layer_form(model: OrthrusLM, per_layer: bool) -> OrthrusLM:
    """Change ``model``'s layer weights to per-layer arrays (the decoder's form) or to
    ``[L, ...]`` stacks (training's), in place, one weight kind at a time: the other form
    of that kind is let go before the next, so the change holds the weights plus one
    kind's copy (where no caller keeps the old arrays). Returns ``model``."""
    if model.per_layer == per_layer:
        return model
    if not per_layer:
        set_out_in(model, False)
    for _, var in nnx.iter_graph(model.layers):
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value()
        if per_layer:
            var.set_value(_per_layer(value))
        else:
            sharding = value[0].sharding
            stacked = jnp.stack(value)
            if isinstance(sharding, NamedSharding):
                stacked = jax.device_put(stacked, NamedSharding(
                    sharding.mesh, PartitionSpec(None, *sharding.spec)))
            var.set_value(stacked)
        del value
    return model


def set_out_in(model: OrthrusLM, out_in: bool) -> OrthrusLM:
    """Hold ``model``'s per-layer projections ``[out..., in...]`` (``out_in``) or in the
    training form ``[in..., out...]``, in place, one layer's weight at a time (its old
    array is let go as soon as the new one is made: at most one layer's weight is held
    twice). A matrix product of a few rows is faster on
    CPU with the weight as its left operand (:func:`orthrus_jax.layers.project`); other
    backends take either form at the same speed. Needs the per-layer form
    (:func:`unstack_layers`); a sharded weight keeps its sharding, its axes moved with
    the weight's. Returns ``model``."""
    if model.out_in == out_in:
        return model
    if not model.per_layer:
        raise ValueError("set_out_in needs per-layer weights (unstack_layers)")
    change = out_in_layer if out_in else in_out_layer
    for kind in (model.layers.attn, model.layers.diff_attn, model.layers.mlp):
        for name, var in vars(kind).items():
            if not (isinstance(var, nnx.Variable) and name in PROJECTIONS):
                continue
            for i in range(model.config.num_hidden_layers):  # one layer's copy at a time
                parts = list(var.get_value())
                parts[i] = change(parts[i], name)
                var.set_value(tuple(parts))
                del parts
                release_memory()
    model.layers.out_in = out_in
    return model


def out_in_layer(a: jax.Array, name: str) -> jax.Array:
    """One layer's projection ``name`` in the ``[out..., in...]`` form, placed like ``a``
    with its axes moved (an abstract ``jax.ShapeDtypeStruct`` stays abstract)."""
    n_in = PROJECTIONS[name]
    return _transposed(a, (*range(n_in, a.ndim), *range(n_in)))


def in_out_layer(a: jax.Array, name: str) -> jax.Array:
    """The inverse of :func:`out_in_layer`."""
    n_out = a.ndim - PROJECTIONS[name]
    return _transposed(a, (*range(n_out, a.ndim), *range(n_out)))


def _transposed(a, perm: tuple[int, ...]):
    sharding = a.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in perm)))
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(a.shape[i] for i in perm), a.dtype, sharding=sharding)
    moved = jnp.transpose(a, perm)
    return jax.device_put(moved, sharding) if isinstance(sharding, NamedSharding) else moved


def layer_sharding(sharding):
    """The sharding of one layer of a stacked ``[L, ...]`` array placed on ``sharding``:
    a ``NamedSharding``'s spec minus its ``layers`` axis; any other sharding as is."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding


def _per_layer(a: jax.Array) -> tuple[jax.Array, ...]:
    """A stacked ``[L, ...]`` weight as ``L`` arrays, each sharded like ``a`` minus its
    ``layers`` axis."""
    if isinstance(a.sharding, NamedSharding):
        sharding = layer_sharding(a.sharding)
        return tuple(jax.device_put(a[i], sharding) for i in range(a.shape[0]))
    return tuple(a[i] for i in range(a.shape[0]))


def copy_diffusion(source: OrthrusLM, target: OrthrusLM) -> None:
    """Set ``target``'s diffusion tensors to ``source``'s, in place, in ``target``'s form
    (stacked or per layer, projections either way round: :func:`set_out_in`) and dtype;
    every other tensor of ``target`` stays.

    Shapes must match (same config); a compiled program that takes ``target`` runs on the
    new values without recompiling.
    """
    for name, var in vars(target.layers.diff_attn).items():
        if not isinstance(var, nnx.Variable):
            continue
        src = getattr(source.layers.diff_attn, name, None)
        if not isinstance(src, nnx.Variable):
            raise ValueError(f"diffusion tensor {name} missing from the source model")
        value, old = src.get_value(), var.get_value()
        projection = name in PROJECTIONS
        if source.out_in and projection:  # compared and converted in the training form
            value = tuple(in_out_layer(a, name) for a in value)
        if is_unstacked(value) and not is_unstacked(old):
            value = jnp.stack(value)
        elif is_unstacked(old) and not is_unstacked(value):
            value = _per_layer(value)
        new_parts = value if is_unstacked(value) else (value,)
        old_parts = old if is_unstacked(old) else (old,)
        old_shapes = [in_out_layer(jax.ShapeDtypeStruct(o.shape, o.dtype), name).shape
                      if target.out_in and projection else o.shape for o in old_parts]
        if len(new_parts) != len(old_parts) or any(
                n.shape != o for n, o in zip(new_parts, old_shapes, strict=True)):
            old_shape = (f"{len(old_shapes)} x {tuple(old_shapes[0])}" if is_unstacked(old)
                         else str(tuple(old_shapes[0])))
            raise ValueError(f"diffusion tensor {name}: shape {_shape(value)} does not match "
                             f"the model's {old_shape}")
        if target.out_in and projection:
            new_parts = tuple(out_in_layer(a, name) for a in new_parts)
        cast = tuple(n.astype(o.dtype) for n, o in zip(new_parts, old_parts, strict=True))
        var.set_value(cast if is_unstacked(old) else cast[0])


def _shape(value) -> str:
    if is_unstacked(value):
        return f"{len(value)} x {tuple(value[0].shape)}"
    return str(tuple(value.shape))


def prefill(model: OrthrusLM, tokens: jax.Array, cache: KVCache, prompt_lengths: jax.Array,
            chunk_size: int | None = None,
            progress: Callable[[jax.Array, jax.Array], None] | None = None,
            rows: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Run the AR view over right-padded prompts ``tokens [B, P]`` in chunks.

    Row ``b`` has ``prompt_lengths[b]`` valid tokens, appended at its current cache length.
    Chunks of ``chunk_size`` tokens (``P`` must be a multiple; default: one chunk) go
    through one ``lax.scan``, so the compiled size does not grow with the prompt. Returns
    the float32 logits ``[B, V]`` of each row's last prompt token and the updated cache.
    ``progress(done, total)``: called on the host after each chunk with the prompt tokens
    prefilled so far and in all (of the longest row), through ``jax.debug.callback``.
    ``rows [B]``: the cache rows the prompts go to, ``cache.lengths`` being theirs (see
    :meth:`OrthrusLM.ar_hidden`; default: the first ``B``).
    """
    B, P = tokens.shape
    C = P if chunk_size is None else chunk_size
    if P % C:
        raise ValueError(f"prompt buffer length {P} is not a multiple of chunk_size {C}")
    n_chunks = P // C
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    chunks = tokens.reshape(B, n_chunks, C).swapaxes(0, 1)  # [n, B, C]

    def body(carry, xs):
        cache, last = carry
        chunk, i = xs
        remaining = prompt_lengths - i * C
        num_valid = jnp.clip(remaining, 0, C)
        hidden, cache = model.ar_hidden(chunk, cache, num_valid, rows=rows)
        idx = jnp.clip(num_valid - 1, 0, C - 1)
        here = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
        ends_here = (remaining > 0) & (remaining <= C)
        if progress is not None:
            total = jnp.max(prompt_lengths)
            jax.debug.callback(progress, jnp.minimum((i + 1) * C, total), total)
        return (cache, jnp.where(ends_here[:, None], here, last)), None

    last = jnp.zeros((B, model.config.hidden_size), model.config.jnp_dtype)
    (cache, last), _ = jax.lax.scan(body, (cache, last), (chunks, jnp.arange(n_chunks)))
    return model.logits(last), cache



def set_attention_kernel(model: OrthrusLM, on: bool) -> OrthrusLM:
    """Route ``model``'s decode passes (a few query rows per KV head: AR steps, draft,
    verify and tree passes; not prefill chunks) through the CPU attention kernel
    (:mod:`orthrus_jax.cpu_attention`, which must be available), in place; returns it.
    Float32 only: other dtypes keep XLA's attention either way."""
    model.attention_kernel = bool(on)
    return model


def default_attention_kernel(model: OrthrusLM) -> bool:
    """Whether ``model``'s decode passes should attend through the CPU kernel: its weights
    live on one CPU device, its compute dtype is float32, and the kernel builds here."""
    sharding = model.embed_tokens.get_value().sharding
    one_device = sharding is None or len(sharding.device_set) == 1
    return (weights_platform(model) == "cpu" and one_device
            and model.config.jnp_dtype == jnp.float32 and cpu_attention.available())
