"""``python -m infer.passes``: the three passes of decoding timed alone, against the memory
floor, beside an iteration of the compiled decode loop that runs them.

For a model folder (``--model DIR``) or a model of random weights built from an HF
``config.json`` (``--config FILE``: no checkpoint needed, e.g. a Qwen3-8B shape on a GPU),
with a cache holding ``--context`` positions per row, it times (median of ``--repeats``
calls, compile excluded; the passes take turns, one call each per round, so a slow spell
of a shared machine falls on all of them):

- ``ar_step``: one token through the AR view, writing its K/V, plus its logits;
- ``diffusion_pass``: the block ``[anchor, MASK x (K-1)]`` through the diffusion view,
  plus the logits of the K-1 drafted positions (writes nothing);
- ``verify_pass``: K tokens through the AR view, writing their K/V, plus their logits;
- ``tree_verify_pass``: with ``--tree-budgets``, a draft tree of ``N`` nodes (``N + 1``
  rows, each seeing the cache and its ancestors) through the AR view, plus their logits;
- the decode loop (the engine's own greedy ``lax.while_loop``) at each block size
  ``K`` of ``--blocks`` and at ``K = 1`` (plain AR), ``--loop-steps`` iterations per call
  over a cache of the same size: its cost per iteration beside its two passes
  (``iteration_to_passes``: what the loop adds to them) and beside the AR loop's step;
  with ``--tree-budgets``, also the loop verifying trees of each budget at the largest
  block (``K/treeN``).

Each pass reads at least its view's weights, the final norm and LM head, and the cache's
K/V of ``--context`` positions; the memory floor is those bytes over the device's copy
bandwidth (measured here: a jitted copy of ``--copy-mib`` MiB, read plus write). The ratio
time / floor is 1 for a pass that only streams memory; compute-bound passes (long blocks
on a CPU) sit far above it. The model runs as the decoder runs it (per-layer weights).

Several contexts (``--context 256,2048``) are timed in the same rounds, each with its own
cache, and the report adds each pass's time at every context relative to the first
(``relative_to_first_context``): the cost of a longer context measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from infer import tree as trees
from infer.buckets import DecodeSpec
from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.decode import RUNNING, DecodeInputs, DecodeState, run
from infer.options import add_projections_arg, projections_arg, tree_budgets_arg
from infer.sampling import SamplingParams
from orthrus_jax.cache import KVCache, attention_windows, init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.cli import non_negative_int, positive_int, run_command
from orthrus_jax.config import DTYPE_NAMES, ModelConfig
from orthrus_jax.model import (
    AR_VIEW,
    DIFFUSION_VIEW,
    OrthrusLM,
    decoding_form,
    default_attention_kernel,
    set_attention_kernel,
    unstack_layers,
)
from orthrus_jax.random_weights import random_model

# Iterations of the decode loop per timed call (the loop's cost per iteration is the call's
# time over them).
LOOP_STEPS = 8


def _interleaved_medians(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median wall time of each ``calls[name]()`` (awaited) over ``repeats`` rounds in
    which every call runs once, in turn, after one warm-up call each (compiles)."""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[Any, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


@partial(jax.jit, donate_argnums=0)
def copy_pass(a: jax.Array) -> jax.Array:
    """The bandwidth probe: ``a + 1`` in place (``a`` donated)."""
    return a + 1.0


# the K/V write is in place, as in decoding
@partial(jax.jit, donate_argnums=(2, 3), static_argnames="windows")
def ar_pass(model: OrthrusLM, tokens: jax.Array, k, v, lengths: jax.Array,
            windows: tuple[int, ...] = ()):
    """``tokens [B, T]`` through the AR view at ``lengths``, writing their K/V: returns
    their float32 logits ``[B, T, V]`` and the new ``k``, ``v`` (donated in). The lengths
    stay put, so every call writes the same positions: the AR step (``T = 1``) and the
    verify pass (``T = K``). ``windows``: the cache's attention windows."""
    hidden, cache = model.ar_hidden(tokens, KVCache(k, v, lengths, windows))
    return model.logits(hidden), cache.k, cache.v


@jax.jit
def diffusion_pass(model: OrthrusLM, block: jax.Array, cache: KVCache) -> jax.Array:
    """The block ``[B, K]`` (``[anchor, MASK x (K-1)]``) through the diffusion view plus
    the float32 logits ``[B, K-1, V]`` of its drafted positions; writes nothing."""
    return model.logits(model.diffusion_hidden(block, cache)[:, :-1])


@jax.jit
def tree_verify_pass(model: OrthrusLM, tokens: jax.Array, offsets: jax.Array,
                     visible: jax.Array, cache: KVCache) -> jax.Array:
    """A draft tree's verify pass: ``tokens [B, N + 1]`` (anchor, nodes) at
    ``cache.lengths + offsets``, each row seeing the cache and the rows ``visible`` marks,
    plus their float32 logits ``[B, N + 1, V]``. Writes nothing (the decode loop then
    places the accepted path's K/V)."""
    hidden, _ = model.tree_hidden(tokens, offsets, visible, cache)
    return model.logits(hidden)


def on_device(tree):
    """``tree``'s arrays committed to the first device, or its ``ShapeDtypeStruct`` leaves
    given that sharding: the passes' inputs lower to one program either way (an
    uncommitted array lowers without a sharding, and is compiled as another program)."""
    sharding = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                        if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, sharding),
                        tree)


def copy_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a jitted device copy of ``mib`` MiB (bytes read + bytes written).

    The copy is in place (donated input), so fresh output pages are not part of the cost.
    """
    held = [on_device(jnp.ones((mib * 2**20 // 4,), jnp.float32))]

    def call() -> jax.Array:
        held[0] = copy_pass(held[0])
        return held[0]

    return 2 * held[0].nbytes / _interleaved_medians({"copy": call}, repeats)["copy"]


def _bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def bytes_read(model: OrthrusLM, view: str, cache: KVCache, context: int) -> int:
    """Least bytes one pass of ``view`` (``AR_VIEW`` or ``DIFFUSION_VIEW``) reads: the layer weights
    of that view and the MLPs and norms, the final norm, the LM head (the embedding when
    tied), and ``context`` positions of every layer's cached K and V."""
    layers = model.layers
    weights = _bytes(nnx.state(getattr(layers, view))) + _bytes(nnx.state(layers.mlp))
    weights += _bytes(layers.input_norm.get_value()) + _bytes(layers.post_attn_norm.get_value())
    weights += _bytes(model.norm[...])
    weights += _bytes(model.embed_tokens[...] if model.lm_head is None else model.lm_head[...])
    c = model.config
    dtype = jax.tree.leaves(cache.k)[0].dtype
    per_position = (2 * c.num_hidden_layers * cache.batch_size * c.num_key_value_heads
                    * c.head_dim * dtype.itemsize)
    return weights + context * per_position


def time_passes(model: OrthrusLM, *, blocks: Sequence[int], batch_size: int = 1,
                context: int = 2048, repeats: int = 10, seed: int = 0,
                loop_steps: int = LOOP_STEPS, passes: bool = True,
                tree_budgets: Sequence[int] = (),
                tree_blocks: dict[int, int] | None = None) -> dict:
    """Median seconds of the decode passes over a cache filled to ``context`` positions
    (of ``context + max(blocks)``): ``{"ar_step": s, "diffusion_pass": {K: s},
    "verify_pass": {K: s}, "iteration": {K: s}, "ar_iteration": s}`` for every ``K >= 2``
    in ``blocks``; ``iteration`` is one iteration of the compiled decode loop at block
    ``K`` (:func:`time_loop`), ``ar_iteration`` one step of the AR loop, over a cache of the
    same size; with ``tree_budgets``, ``"tree_verify_pass"`` and ``"tree_iteration"`` too
    (:func:`time_passes_at`). Compile excluded."""
    return time_passes_at(model, blocks=blocks, batch_size=batch_size, contexts=[context],
                          repeats=repeats, seed=seed, loop_steps=loop_steps,
                          passes=passes, tree_budgets=tree_budgets,
                          tree_blocks=tree_blocks)[context]


def _loop_state(cache: KVCache, block: int, steps: int) -> DecodeState:
    """A decode state over ``cache`` (its K/V random, its rows at a length from which
    ``steps`` iterations at ``block`` stay inside it) that never finishes by itself."""
    B, max_len = cache.batch_size, cache.max_len
    start = max(1, max_len - 1 - steps * block)
    zeros = np.zeros((B,), np.int32)
    stats = np.zeros((B, block), np.float32)
    return DecodeState(
        cache=dataclasses.replace(cache, lengths=jnp.full((B,), start, jnp.int32)),
        anchor=jnp.asarray(zeros + 1), tokens=jnp.zeros((B, steps * block + 1), jnp.int32),
        num_generated=jnp.asarray(zeros + 1), finish=jnp.asarray(zeros + RUNNING),
        key=jax.random.split(jax.random.key(0), B), iterations=jnp.asarray(zeros),
        accepted_hist=jnp.asarray(stats.astype(np.int32)),
        block_hist=jnp.asarray(stats.astype(np.int32)), seen_tokens=jnp.asarray(stats),
        seen_iterations=jnp.asarray(stats), ar_run=jnp.asarray(zeros), step=jnp.int32(0))


@partial(jax.jit, donate_argnums=0)
def _rewind(state: DecodeState, lengths: jax.Array) -> DecodeState:
    """The state back at its first position (cache lengths, tokens and step), in place."""
    B = lengths.shape[0]
    return dataclasses.replace(
        state, cache=dataclasses.replace(state.cache, lengths=lengths),
        num_generated=jnp.ones((B,), jnp.int32), finish=jnp.zeros((B,), jnp.int32),
        step=jnp.int32(0))


@partial(jax.jit, static_argnums=4, donate_argnums=1)
def loop_pass(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, steps: jax.Array,
              spec: DecodeSpec) -> DecodeState:
    """``steps`` iterations of the engine's decode loop (:func:`infer.decode.run`, greedy,
    one block size) from ``state`` (donated)."""
    return run(model, state, inputs, steps, spec)


def loop_args(model: OrthrusLM, cache: KVCache, block: int, steps: int = LOOP_STEPS,
              tree_budget: int = 0) -> tuple[tuple, jax.Array]:
    """The arguments of :func:`loop_pass` for ``steps`` iterations at ``block`` (1: the AR
    loop; with ``tree_budget``, verifying trees of that many nodes) over ``cache`` (not
    copied; a cache of ``ShapeDtypeStruct`` leaves gives abstract
    arguments, for a plan), and the rows' first cache lengths (for :func:`_rewind`)."""
    B = cache.batch_size
    steps = max(1, min(steps, (cache.max_len - 2) // block))
    make = partial(_loop_state, block=block, steps=steps)
    abstract = isinstance(jax.tree.leaves(cache)[0], jax.ShapeDtypeStruct)
    state = on_device(jax.eval_shape(make, cache) if abstract else make(cache))
    spec = DecodeSpec(mode="ar" if block == 1 else "orthrus", blocks=(block,), greedy=True,
                      batch=B, prompt_len=1, out_len=state.tokens.shape[1],
                      max_len=cache.max_len, n_eos=8, max_block=block,
                      tree_budget=tree_budget)
    inputs = DecodeInputs(jnp.full((B,), 2**30, jnp.int32), jnp.full((8,), -1, jnp.int32),
                          SamplingParams.make(0.0))
    n = jnp.int32(steps)
    if abstract:
        inputs, n = jax.eval_shape(lambda: (inputs, n))
    return (model, state, on_device(inputs), on_device(n), spec), state.cache.lengths


def time_loop(model: OrthrusLM, cache: KVCache, block: int, steps: int = LOOP_STEPS,
              tree_budget: int = 0) -> Callable[[], jax.Array]:
    """A call of ``steps`` iterations of the compiled greedy decode loop at ``block``
    (1: the AR loop; with ``tree_budget``, verifying trees) over a copy of ``cache`` (its
    K/V; its size is the cache size timed),
    rewound before each call: its wall time over ``call.steps`` is the loop's cost per
    iteration, every pass and all the loop's own work included."""
    (model, state, inputs, n, spec), lengths = loop_args(
        model, jax.tree.map(jnp.copy, cache), block, steps, tree_budget)
    held = [state]

    def call() -> jax.Array:
        held[0] = loop_pass(model, _rewind(held[0], lengths), inputs, n, spec)
        return held[0].tokens
    call.steps = int(n)  # type: ignore[attr-defined]
    return call


def time_passes_at(model: OrthrusLM, *, blocks: Sequence[int], contexts: Sequence[int],
                   batch_size: int = 1, repeats: int = 10, seed: int = 0,
                   loop_steps: int = LOOP_STEPS, passes: bool = True,
                   tree_budgets: Sequence[int] = (),
                   tree_blocks: dict[int, int] | None = None,
                   max_len: int | None = None) -> dict[int, dict]:
    """:func:`time_passes` at every context of ``contexts``, all timed in the same rounds
    (each round runs every pass and loop at every context once): ``{context: result}``.
    ``loop_steps = 0`` times the passes only, ``passes=False`` the loops only (their
    entries are then missing). ``tree_budgets`` adds ``"tree_verify_pass": {N: s}`` and
    ``"tree_iteration": {N: s}``: trees of ``N`` nodes, the loop's at the block
    ``tree_blocks[N]`` (default: the largest of ``blocks``, ``"tree_block"``; the blocks
    used are ``"tree_blocks"``). ``max_len``: the cache's positions per row (default, and
    at least: the context plus the largest block); its passes read the smallest of its
    :func:`~orthrus_jax.cache.attention_windows` that holds the context, as the decoder's
    do."""
    c = model.config
    blocks = sorted({int(k) for k in blocks if k >= 2})
    room = max(blocks, default=1)  # positions one pass writes or reads past the context
    for context in contexts:
        if context < 1:
            raise ValueError(f"context={context} must be >= 1")
        if max(context + room, max_len or 0) > c.max_position_embeddings:
            raise ValueError(f"context {context} + block {room} (or max_len {max_len}) "
                             f"exceeds the model's max_position_embeddings "
                             f"{c.max_position_embeddings}")
    model = unstack_layers(model)
    rng = np.random.default_rng(seed)
    mask = c.mask_token_id if c.mask_token_id is not None else 0

    def tokens(k: int) -> jax.Array:
        return on_device(jnp.asarray(rng.integers(0, c.vocab_size, (batch_size, k)), jnp.int32))

    calls: dict[tuple, Callable[[], jax.Array]] = {}
    steps: dict[tuple, int] = {}
    for context in contexts:
        cache_len = max(context + room, max_len or 0)
        cache = init_cache(c, batch_size, cache_len, per_layer=True,
                           windows=attention_windows(cache_len))
        # Random K/V (their values do not change the cost) in the first `context` positions.
        keys = iter(jax.random.split(jax.random.key(seed), c.num_hidden_layers))
        kv = tuple(jax.random.normal(next(keys), a.shape, a.dtype) for a in cache.k)
        held = [on_device(dataclasses.replace(cache, k=kv, v=tuple(a * 0.5 for a in kv),
                                              lengths=jnp.full((batch_size,), context,
                                                               jnp.int32)))]

        def ar_call(t: jax.Array, held=held) -> Callable[[], jax.Array]:
            def call() -> jax.Array:
                logits, k, v = ar_pass(model, t, held[0].k, held[0].v, held[0].lengths,
                                       held[0].windows)
                held[0] = dataclasses.replace(held[0], k=k, v=v)
                return logits
            return call

        if passes:
            calls[(context, "ar_step", 1)] = ar_call(tokens(1))
            for k in blocks:
                block = on_device(tokens(k).at[:, 1:].set(mask))
                calls[(context, "diffusion_pass", k)] = (
                    lambda b=block, held=held: diffusion_pass(model, b, held[0]))
                calls[(context, "verify_pass", k)] = ar_call(tokens(k))
        if loop_steps:
            for k in [1, *blocks]:
                name = "ar_iteration" if k == 1 else "iteration"
                calls[(context, name, k)] = time_loop(model, held[0], k, loop_steps)
                steps[(context, name, k)] = calls[(context, name, k)].steps
        for n in tree_budgets:
            tree_block = (tree_blocks or {}).get(n, room)
            tree = random_tree(model, batch_size, tree_block, n, seed)
            if passes:
                rows = on_device(tree.rows(jnp.ones((batch_size,), jnp.int32)))
                offsets = on_device(tree.offsets)
                calls[(context, "tree_verify_pass", n)] = (
                    lambda r=rows, o=offsets, t=tree, held=held: tree_verify_pass(
                        model, r, o, t.visible, held[0]))
            if loop_steps:
                calls[(context, "tree_iteration", n)] = time_loop(model, held[0], tree_block,
                                                                  loop_steps, n)
                steps[(context, "tree_iteration", n)] = calls[(context, "tree_iteration",
                                                               n)].steps
    medians = _interleaved_medians(calls, repeats)
    out: dict[int, dict] = {}
    for (context, name, k), t in medians.items():
        r = out.setdefault(context, {"ar_step": None, "diffusion_pass": {}, "verify_pass": {},
                                     "iteration": {}, "ar_iteration": None,
                                     "tree_verify_pass": {}, "tree_iteration": {},
                                     "tree_block": room, "tree_blocks": {
                                         n: (tree_blocks or {}).get(n, room)
                                         for n in tree_budgets}})
        t = t / steps.get((context, name, k), 1)
        if name in ("ar_step", "ar_iteration"):
            r[name] = t
        else:
            r[name][k] = t
    return out


def random_tree(model: OrthrusLM, batch_size: int, block: int, budget: int, seed: int
                ) -> trees.Tree:
    """A draft tree of ``budget`` nodes and depth at most ``block - 1`` per row, built from
    random distributions (its shape, not its tokens, sets a pass's cost)."""
    c = model.config
    x = jax.random.normal(jax.random.key(seed), (batch_size, max(block - 1, 1), c.vocab_size))
    return on_device(trees.build(jax.nn.log_softmax(x * 3), budget))


def measure(model: OrthrusLM, *, batch_size: int = 1, context: int | Sequence[int] = 2048,
            blocks: Sequence[int] | None = None, repeats: int = 10, copy_mib: int = 1024,
            seed: int = 0, loop_steps: int = LOOP_STEPS,
            tree_budgets: Sequence[int] = (), max_len: int | None = None,
            weights_out_in: bool | None = None) -> dict:
    """Time the passes and the decode loop over a cache filled to ``context`` (one
    context, or several timed in the same rounds) at each block size of ``blocks``
    (default: the head's); see the module doc.

    One context: ``{"context": C, "passes": {name: {"seconds", "floor_seconds",
    "ratio_to_floor"}}, "iterations": {K: {...}}, ...}`` where ``passes`` holds
    ``ar_step`` and ``diffusion_pass@K`` / ``verify_pass@K`` per block size and
    ``iterations`` the loop's iteration at each ``K`` beside its two passes
    (``iteration_to_passes``) and the AR loop's step beside the AR step. Several:
    ``"contexts"`` lists them and ``"passes"`` / ``"iterations"`` hold one such mapping
    per context (keyed by the context as a string), each pass also with
    ``relative_to_first_context``. ``tree_budgets`` adds ``tree_verify_pass@N`` (with
    ``to_ar_step``) and the loop at the largest block verifying trees (``K/treeN``).
    ``max_len``: the cache's positions per row (default: the context plus the largest
    block), reported as ``"max_len"``. ``weights_out_in``: the projections' form
    (:func:`orthrus_jax.model.decoding_form`; default: ``[out, in]`` on CPU), reported
    as ``"projections"``.
    """
    c = model.config
    model = decoding_form(model, weights_out_in)
    set_attention_kernel(model, default_attention_kernel(model))
    blocks = sorted({int(k) for k in (blocks or [c.block_size])})
    if any(k < 2 for k in blocks):
        raise ValueError(f"blocks {blocks}: block sizes are >= 2 (1 is the AR step)")
    contexts = [context] if isinstance(context, int) else list(context)
    if len(set(contexts)) != len(contexts):
        raise ValueError(f"contexts {contexts} repeat a value")
    tree_budgets = sorted({int(n) for n in tree_budgets})
    seconds = time_passes_at(model, blocks=blocks, batch_size=batch_size, contexts=contexts,
                             repeats=repeats, seed=seed, loop_steps=loop_steps,
                             tree_budgets=tree_budgets, max_len=max_len)
    bandwidth = copy_bandwidth(copy_mib)
    cache = init_cache(c, batch_size, 1)
    out = {"model_type": c.model_type, "layers": c.num_hidden_layers,
           "hidden_size": c.hidden_size, "block_size": c.block_size, "blocks": blocks,
           "dtype": c.dtype, "batch_size": batch_size, "backend": jax.default_backend(),
           "device": str(jax.devices()[0]), "copy_bandwidth_gb_s": bandwidth / 1e9,
           "loop_steps": loop_steps, "tree_budgets": tree_budgets, "max_len": max_len,
           "projections": "out-in" if model.out_in else "in-out",
           "attention": "kernel" if model.attention_kernel else "xla"}
    by_context, loops = {}, {}
    for ctx in contexts:
        t = seconds[ctx]
        timed = [("ar_step", AR_VIEW, t["ar_step"])]
        for k in blocks:
            timed += [(f"diffusion_pass@{k}", DIFFUSION_VIEW, t["diffusion_pass"][k]),
                      (f"verify_pass@{k}", AR_VIEW, t["verify_pass"][k])]
        timed += [(f"tree_verify_pass@{n}", AR_VIEW, t["tree_verify_pass"][n])
                  for n in tree_budgets]
        passes = {}
        for name, view, sec in timed:
            floor = bytes_read(model, view, cache, ctx) / bandwidth
            passes[name] = {"seconds": sec, "floor_seconds": floor, "ratio_to_floor": sec / floor,
                            "to_ar_step": sec / t["ar_step"]}
        by_context[ctx] = passes
        if loop_steps:
            loops[ctx] = {"1": {"passes_seconds": t["ar_step"],
                                "iteration_seconds": t["ar_iteration"],
                                "iteration_to_passes": t["ar_iteration"] / t["ar_step"],
                                "iteration_to_ar_iteration": 1.0}}
            for k in blocks:
                both = t["diffusion_pass"][k] + t["verify_pass"][k]
                loops[ctx][str(k)] = {
                    "passes_seconds": both, "iteration_seconds": t["iteration"][k],
                    "iteration_to_passes": t["iteration"][k] / both,
                    "iteration_to_ar_iteration": t["iteration"][k] / t["ar_iteration"]}
            K = t["tree_block"]
            for n in tree_budgets:
                both = t["diffusion_pass"][K] + t["tree_verify_pass"][n]
                loops[ctx][f"{K}/tree{n}"] = {
                    "passes_seconds": both, "iteration_seconds": t["tree_iteration"][n],
                    "iteration_to_passes": t["tree_iteration"][n] / both,
                    "iteration_to_ar_iteration": t["tree_iteration"][n] / t["ar_iteration"]}
    if len(contexts) == 1:
        return out | {"context": contexts[0], "passes": by_context[contexts[0]],
                      "iterations": loops.get(contexts[0], {})}
    first = by_context[contexts[0]]
    for passes in by_context.values():
        for name, p in passes.items():
            p["relative_to_first_context"] = p["seconds"] / first[name]["seconds"]
    return out | {"contexts": contexts, "passes": {str(k): v for k, v in by_context.items()},
                  "iterations": {str(k): loops.get(k, {}) for k in contexts}}


def format_report(r: dict) -> str:
    contexts = r.get("contexts", [r.get("context")])
    lines = [f"{r['model_type']}: {r['layers']} layers, hidden {r['hidden_size']}, block "
             f"{r['block_size']}, {r['dtype']}, batch {r['batch_size']}, context "
             f"{', '.join(map(str, contexts))}"
             + (f" in a {r['max_len']}-position cache" if r.get("max_len") else "")
             + f", {r['backend']} ({r['device']}), projections {r['projections']}"
             + f", attention {r['attention']}",
             f"copy bandwidth {r['copy_bandwidth_gb_s']:.1f} GB/s"]
    several = "contexts" in r
    for ctx in contexts:
        passes = r["passes"][str(ctx)] if several else r["passes"]
        head = f"{'context ' + str(ctx):20}{'ms':>10}{'floor ms':>10}{'x floor':>9}"
        lines += ["", head + (f"{'x first':>9}" if several else "")]
        for name, p in passes.items():
            line = (f"{name:20}{p['seconds'] * 1e3:10.2f}{p['floor_seconds'] * 1e3:10.2f}"
                    f"{p['ratio_to_floor']:9.2f}")
            if several:
                line += f"{p['relative_to_first_context']:9.2f}"
            lines.append(line)
        loops = r["iterations"][str(ctx)] if several else r["iterations"]
        if loops:
            lines += ["", f"{'decode loop, block':20}{'passes ms':>10}{'loop ms':>10}"
                          f"{'x passes':>9}{'x AR':>9}"]
            for k, p in loops.items():
                lines.append(f"{k:20}{p['passes_seconds'] * 1e3:10.2f}"
                             f"{p['iteration_seconds'] * 1e3:10.2f}"
                             f"{p['iteration_to_passes']:9.3f}"
                             f"{p['iteration_to_ar_iteration']:9.2f}")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    """``--blocks``: block sizes separated by commas, each >= 2."""
    values = [positive_int(part) for part in text.split(",")]
    if min(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: block sizes are >= 2 (1 is the AR step)")
    return values


def _contexts(text: str) -> list[int]:
    """``--context``: one count of positions, or several separated by commas."""
    values = [positive_int(part) for part in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a context is repeated")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.passes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder (convert.from_hf / from_gguf)")
    src.add_argument("--config", help="HF config.json: random weights of that shape")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter and compute dtype (default: as stored / in the config)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="with --config: the block size K (default: the config's, or 32)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--context", type=_contexts, default=[2048],
                   help="cached positions per row; several, comma-separated (256,2048), "
                        "are timed in the same rounds")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="cache positions per row (default: the context plus the largest "
                        "block); the passes read the smallest of its static attention "
                        "windows that holds the context, as decoding does; the decode "
                        "loop's iterations run near the end of this cache, so with a "
                        "MAX_LEN well above the context they read more of it than the "
                        "passes (iteration_to_passes then compares two contexts)")
    p.add_argument("--blocks", type=_sizes, default=None,
                   help="block sizes to time, comma-separated (default: the head's)")
    p.add_argument("--tree-budgets", type=tree_budgets_arg, default=[],
                   help="also time draft trees of these many nodes, comma-separated: their "
                        "verify pass, and the decode loop verifying them at the largest "
                        "block of --blocks")
    p.add_argument("--loop-steps", type=non_negative_int, default=LOOP_STEPS,
                   help="decode-loop iterations per timed call (0: time the passes only)")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--copy-mib", type=positive_int, default=1024,
                   help="size of the bandwidth probe")
    p.add_argument("--json", action="store_true")
    add_projections_arg(p)
    add_compile_cache_args(p)
    return p


def _model(args: argparse.Namespace) -> OrthrusLM:
    if args.model:
        return load_model(args.model, param_dtype=args.dtype, per_layer=True)
    overrides = {"block_size": args.block_size} if args.block_size else {}
    if args.dtype:
        overrides.update(dtype=args.dtype, param_dtype=args.dtype)
    config = ModelConfig.from_json_file(args.config, **overrides)
    return random_model(config)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)

    def body() -> None:
        context = args.context[0] if len(args.context) == 1 else args.context
        r = measure(_model(args), batch_size=args.batch_size, context=context,
                    blocks=args.blocks, repeats=args.repeats, copy_mib=args.copy_mib,
                    loop_steps=args.loop_steps, tree_budgets=args.tree_budgets,
                    max_len=args.max_len, weights_out_in=projections_arg(args))
        print(json.dumps(r) if args.json else format_report(r))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
