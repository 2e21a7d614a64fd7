"""Continuous batching: a fixed number of slots decoding in ONE compiled loop.

:class:`SlotEngine` holds one :class:`~infer.decode.DecodeState` of ``S`` rows over a static
KV cache of ``S`` rows of ``L`` positions (``L``: the Generator's ``max_len``; per layer
``[S, kv_heads, L, head_dim]``) and
three kinds of compiled programs, all built by :meth:`SlotEngine.warm_up`:

- ``insert`` (one per prompt-length bucket ``P`` and count ``n`` of
  :meth:`SlotEngine.insert_counts`): prefill ``n`` prompts ``[n, P]`` straight into their
  slots' rows of the state's cache and pick their first tokens (exactly
  :func:`infer.decode.start`, each row as ``Generator.generate`` runs a single prompt);
  the other slots are untouched. Requests admitted together are prefilled together
  (:meth:`SlotEngine.insert_many`);
- ``step`` (one per row count ``R`` of :func:`row_counts`: 1, 2, 4, ..., ``S``):
  :func:`infer.decode.run` for at most ``n`` iterations over the first ``R`` slots
  (:func:`run_rows`) with the block size and tree budget of that row count
  (:attr:`SlotEngine.plans`: speculation by load), sampling with per-row temperature /
  top-k / top-p (temperature 0: that row is greedy) and per-row PRNG keys. A step runs the
  smallest ``R`` that holds every busy slot (requests take the lowest free slot), so a
  lone request costs a batch-1 step; free and finished slots below ``R`` ride along,
  masked;
- ``free``: mark a slot finished, so it stops decoding at once, and set its cache length
  to 0;
- ``store`` (with a prefix cache): copy whole blocks of a slot's cache rows into the
  prefix store.

With a prefix cache (``prefix_blocks > 0``, :mod:`infer.prefix_cache`), an insert first
looks each prompt up: the longest stored prefix of whole blocks is copied into the
request's cache rows and only the rest of the prompt is prefilled (its bucket is that of
the rest). The prompt's blocks are stored after the prefill, and the blocks of
prompt and answer when the slot is freed.

Passes read the smallest attention window of the cache that holds the live rows'
positions (:func:`orthrus_jax.cache.attention_windows`), so a step costs what the busy
rows' lengths need, not ``L``.

No shape depends on the traffic, so after :meth:`warm_up` nothing compiles. The engine is
not thread-safe: one thread (the server's scheduler) owns it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.buckets import (
    MAX_TREE_BUDGET,
    MODES,
    bucket,
    eos_array,
    max_block,
    prompt_bucket,
    prompt_buckets,
)
from infer.decode import (
    FINISH_LENGTH,
    FINISH_REASONS,
    RUNNING,
    DecodeInputs,
    DecodeState,
    row_keys,
    run,
    start,
)
from infer.engine import Generator
from infer.executables import ExecutableStore, fresh_compiles
from infer.prefix_cache import (
    DEFAULT_BLOCK_TOKENS,
    PrefixIndex,
    gather_prefix,
    init_store,
    place_prefix,
    store_row,
)
from infer.sampling import SamplingParams
from orthrus_jax.cache import attention_windows, init_cache
from orthrus_jax.model import prefill
from orthrus_jax.sharding import named_sharding

# Blocks one call of the prefix store's program copies.
STORE_BLOCKS = 4


@dataclasses.dataclass(frozen=True)
class SlotParams:
    """One request's decoding settings (those of ``Generator.generate``)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        SamplingParams.check(self.temperature, self.top_k, self.top_p)
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed={self.seed} must be in [0, 2**31)")


@dataclasses.dataclass
class SlotUpdate:
    """Tokens a slot committed since its last update; ``finish_reason`` ("eos", "length",
    "cache_full") once the slot's row is done, else None."""

    slot: int
    new_ids: list[int]
    finish_reason: str | None
    iterations: int


@dataclasses.dataclass
class SlotRecord:
    """What one slot holds, the one record of it: ``owner``, the caller's handle of the
    request it decodes or is kept for (None: free); ``decoding``, whether that request
    was inserted (else the slot is kept while its long prompt prefills in chunks);
    ``shown``, its tokens already reported; ``held``, its prompt and reported tokens
    (the ids whose K/V fill its cache rows, stored as prefixes when it is freed)."""

    owner: Any = None
    decoding: bool = False
    shown: int = 0
    held: list[int] = dataclasses.field(default_factory=list)

    @property
    def free(self) -> bool:
        return self.owner is None


def row_counts(slots: int) -> tuple[int, ...]:
    """The row counts a step program exists for: the powers of two below ``slots``, and
    ``slots``."""
    out, r = [], 1
    while r < slots:
        out.append(r)
        r *= 2
    return (*out, slots)


def run_rows(model, state: DecodeState, inputs: DecodeInputs, max_steps: jax.Array, spec,
             rows: int) -> DecodeState:
    """:func:`infer.decode.run` over the first ``rows`` rows of ``state`` (``inputs`` of
    those rows); the other rows are neither computed nor changed.

    The cache's K/V stay whole and are updated in place: its ``lengths`` of the first
    ``rows`` rows say which rows a pass computes (the attention reads those rows only).
    Every other field is sliced and written back (``rows`` entries each).
    """
    def head(a):
        return a[:rows]

    sub = dataclasses.replace(
        jax.tree.map(head, dataclasses.replace(state, cache=None, step=None)),
        cache=dataclasses.replace(state.cache, lengths=head(state.cache.lengths)),
        step=state.step)
    out = run(model, sub, inputs, max_steps, spec)

    def put(big, small):
        return jax.lax.dynamic_update_slice_in_dim(big, small, 0, 0)

    merged = jax.tree.map(put, dataclasses.replace(state, cache=None, step=None),
                          dataclasses.replace(out, cache=None, step=None))
    return dataclasses.replace(merged, cache=dataclasses.replace(
        out.cache, lengths=put(state.cache.lengths, out.cache.lengths)), step=out.step)


class SlotEngine:
    """``slots`` rows decoding together over the Generator's model; see the module doc.

    ``block_size``: Orthrus's block; ``tree_budget``: verify draft trees of that many
    nodes instead of chains (None: chains; every slot then holds ``budget + 1`` verify
    rows). Fixed values hold at every load. ``"auto"`` (either) chooses them once here
    for each row count a step may run (speculation by load, :meth:`_choose_plans`):
    drafting where the measured costs say it pays at that many rows, plain AR steps
    where the rows are many. ``plans``: ``{rows: (block, tree budget)}`` for each of
    :attr:`row_counts`, given instead of choosing. ``executables``: compiled programs
    are loaded from this store when it holds them (no tracing, no compiling) and saved
    to it when compiled. ``eos_ids``: default the model's (:attr:`Generator.eos_ids`: those of
    ``config.json`` and ``generation_config.json``). ``prefill_rows``: at most this many
    prompts are prefilled by one program (:meth:`insert_counts`); more than 1 pays where
    a prefill is memory-bound (a GPU at short prompts), not where it is compute-bound.
    ``prefix_blocks``: blocks of ``prefix_block_tokens`` tokens in the prefix store (0: no
    prefix caching; see the module doc); ``max_len`` must be a multiple of
    ``prefix_block_tokens``. ``prefill_chunk`` (with a prefix store; a multiple of its
    block): a prompt with more uncached tokens than this is prefilled that many at a time
    (:meth:`prefill_next_chunk`, between steps) before its insert; 0: never.
    """

    def __init__(self, gen: Generator, *, slots: int, mode: str = "orthrus",
                 block_size: int | str | None = None, eos_ids: Sequence[int] | None = None,
                 tree_budget: int | str | None = None, prefill_rows: int = 1,
                 prefix_blocks: int = 0, prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 prefill_chunk: int = 0, plans: Mapping[int, tuple[int, int]] | None = None,
                 executables: ExecutableStore | None = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}")
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if mode == "ar" and block_size not in (None, 1):
            raise ValueError(f"block_size={block_size!r} applies to mode 'orthrus' only")
        if mode == "ar" and tree_budget is not None:
            raise ValueError(f"tree_budget={tree_budget!r} applies to mode 'orthrus' only")
        if prefill_rows < 1:
            raise ValueError(f"prefill_rows={prefill_rows} must be >= 1")
        if prefix_blocks < 0:
            raise ValueError(f"prefix_blocks={prefix_blocks} must be >= 0")
        if prefix_blocks and (prefix_block_tokens < 1 or gen.max_len % prefix_block_tokens):
            raise ValueError(f"prefix_block_tokens={prefix_block_tokens} must divide the "
                             f"cache length {gen.max_len}")
        if prefill_chunk and (not prefix_blocks or prefill_chunk < 0
                              or prefill_chunk % prefix_block_tokens):
            raise ValueError(f"prefill_chunk={prefill_chunk} needs a prefix store and must be "
                             f"a multiple of its block of {prefix_block_tokens} tokens")
        self.prefill_chunk = prefill_chunk
        self.executables = executables
        self.gen, self.slots, self.mode = gen, slots, mode
        self.prefill_rows = prefill_rows
        self.max_len = gen.max_len
        self.max_block = max_block(mode, gen.config.block_size)
        # One step program per row count: a step runs the first ``rows`` slots only.
        self.row_counts = row_counts(slots)
        self.plans = self._choose_plans(block_size, tree_budget) if plans is None else \
            self._check_plans(plans)
        self.rows = self.row_counts[0]  # the row count of the latest step
        self.out_len = bucket(self.max_len + self.max_block)
        self.eos = eos_array(gen.eos_ids, eos_ids)
        # an insert prefills what follows the chunks (at most prefill_chunk tokens)
        largest = prompt_bucket(prefill_chunk, gen.chunk_size) if prefill_chunk else \
            self.max_len
        self.buckets = [P for P in prompt_buckets(self.max_len, gen.chunk_size)
                        if largest >= P]
        self._budget = np.ones((slots,), np.int32)
        self._temperature = np.zeros((slots,), np.float32)
        self._top_k = np.zeros((slots,), np.int32)
        self._top_p = np.ones((slots,), np.float32)
        self._inputs = self._make_inputs()
        self._tree_scoring: dict[int, object] = {}  # rows -> their program's tree scoring
        self.records = [SlotRecord() for _ in range(slots)]  # what each slot holds
        self.rows_stepped: collections.Counter[int] = collections.Counter()  # steps per count
        self.inserted: collections.Counter[int] = collections.Counter()  # inserts per count
        self.chunks = 0  # chunks prefilled ahead of their inserts
        self._chunked: dict[tuple[int, ...], int] = {}  # tokens so prefilled, by prompt
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._graphdef = nnx.graphdef(gen.model)
        self.state = jax.jit(self._empty)()
        self.compile_seconds = 0.0
        self.exercise_seconds = 0.0  # spent in exercise_one()
        self._exercised: set[tuple] = set()  # programs it ran
        self.prefix = (PrefixIndex(prefix_blocks, prefix_block_tokens) if prefix_blocks
                       else None)
        self.store = None if self.prefix is None else init_store(
            gen.config, prefix_blocks, prefix_block_tokens, sharding=None if gen.mesh is None
            else named_sharding((None, "kv_heads", "cache_seq", "head_dim"), gen.mesh,
                                gen.rules, name="prefix_store"))

    # ------------------------------------------------------------------ programs
    def _empty(self) -> DecodeState:
        """All slots free (finished), over a zero cache."""
        S, K = self.slots, self.max_block
        zeros = jnp.zeros((S,), jnp.int32)
        stats = jnp.zeros((S, K), jnp.float32)
        cache = init_cache(self.gen.config, S, self.max_len, mesh=self.gen.mesh,
                           rules=self.gen.rules, per_layer=self.gen.model.per_layer,
                           windows=attention_windows(self.max_len))
        return DecodeState(cache=cache, anchor=zeros,
                           tokens=jnp.zeros((S, self.out_len), jnp.int32), num_generated=zeros,
                           finish=jnp.full((S,), FINISH_LENGTH, jnp.int32),
                           key=row_keys(jax.random.key(0), zeros), iterations=zeros,
                           accepted_hist=jnp.zeros((S, K), jnp.int32),
                           block_hist=jnp.zeros((S, K), jnp.int32),
                           seen_tokens=stats, seen_iterations=stats, ar_run=zeros,
                           step=jnp.int32(0))

    def _choose_plans(self, block_size: int | str | None, tree_budget: int | str | None
                      ) -> dict[int, tuple[int, int]]:
        """``{rows: (block, tree budget)}`` for each row count: a fixed block and budget
        for all of them, or with ``"auto"`` the plan of most expected tokens/s at that
        row count (speculation by load), from the costs of the loop's iterations at that
        batch size over the cache's smallest attention window (the step of short
        requests; a longer context favours drafting, whose two passes share the cache
        reads of more tokens, so the choice errs towards plain AR steps). Each row
        count's costs are measured once per machine (minutes on a CPU; then cached on
        disk, :class:`infer.block_size.CostTable`): no rule carries one row count's
        choice to another (on a 2-core CPU a block of 5 costs 3.5 AR steps at one row and
        3.1 at eight)."""
        if self.mode == "ar":
            return {rows: (1, 0) for rows in self.row_counts}
        cost_len = (attention_windows(self.max_len) or (self.max_len,))[0]
        plans: dict[int, tuple[int, int]] = {}
        for rows in self.row_counts:
            chosen = self.gen.block_plan(block_size, tree_budget=tree_budget, greedy=False,
                                         batch_size=rows, max_len=cost_len, adaptive=False)
            block = chosen.blocks[0]
            plans[rows] = (block, 0 if block == 1 else chosen.tree_budget)
        return plans

    def _check_plans(self, plans: Mapping[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """``plans`` given by the caller, checked: one ``(block, tree budget)`` per row
        count, blocks in ``[1, max_block]`` (1 in mode ``"ar"``), budgets only where a
        block drafts."""
        if set(plans) != set(self.row_counts):
            raise ValueError(f"plans: give one (block, tree budget) for each row count "
                             f"{list(self.row_counts)}, not for {sorted(plans)}")
        out = {}
        for rows, (block, budget) in sorted(plans.items()):
            top = 1 if self.mode == "ar" else self.max_block
            if not 1 <= block <= top:
                raise ValueError(f"plans[{rows}]: block {block} is not in [1, {top}]")
            if budget and (block == 1 or not 0 < budget <= MAX_TREE_BUDGET):
                raise ValueError(f"plans[{rows}]: tree budget {budget} needs a block of at "
                                 f"least 2 and must be in [0, {MAX_TREE_BUDGET}]")
            out[rows] = (int(block), int(budget))
        return out

    def describe_plans(self) -> str:
        """The plans in words: ``"block size 5, trees of 5 nodes"`` where every row count
        has the same, else one per row count (``"1 row: ...; 8 rows: plain AR steps"``)."""
        def words(plan: tuple[int, int]) -> str:
            k, n = plan
            return ("plain AR steps" if k == 1 else f"block size {k}"
                    + (f", trees of {n} nodes" if n else ""))
        if len(set(self.plans.values())) == 1:
            return words(self.plans[self.slots])
        return "; ".join(f"{rows} row{'s' * (rows > 1)}: {words(plan)}"
                         for rows, plan in self.plans.items())

    @property
    def block(self) -> int:
        """The block size of the latest step (1: plain AR steps)."""
        return self.plans[self.rows][0]

    @property
    def tree_budget(self) -> int:
        """The tree budget of the latest step (0: chains, or no drafting)."""
        return self.plans[self.rows][1]

    def _spec(self, prompt_len: int, batch: int, plan: tuple[int, int] = (1, 0)):
        """The decode spec of a program over ``batch`` rows (1: an insert's prefill) of
        cache ``max_len`` decoding with ``plan`` (block, tree budget; an insert runs no
        iteration), sampling code for rows of any temperature."""
        return self.gen.spec(self.mode, (plan[0],), False, batch, prompt_len, self.out_len,
                             self.eos.shape[0], plan[1])

    def _insert_fn(self, prompt_len: int, n: int):
        gen = self.gen
        spec = self._spec(prompt_len, n)

        def insert(weights, state: DecodeState, slots, prompts, lengths, inputs, seeds,
                   store=None, blocks=None, prefix_lengths=None):
            model = nnx.merge(self._graphdef, weights)
            # each row's key is that of row 0 of a generate call with its own seed
            keys = jax.vmap(lambda seed: row_keys(jax.random.key(seed),
                                                  jnp.zeros((1,), jnp.int32))[0])(seeds)
            # The prompts go straight into their slots' rows of the state's cache (after
            # their cached prefix, copied from the store): no other row is read or
            # written, and no cache of max_len positions is made for them.
            n = prompts.shape[0]
            cache = dataclasses.replace(state.cache, lengths=jnp.zeros((n,), jnp.int32))
            if store is not None:
                cache = dataclasses.replace(
                    place_prefix(store, cache, blocks, prefix_lengths, slots),
                    lengths=prefix_lengths.astype(jnp.int32))
            rows = start(model, prompts, lengths, inputs, keys, spec, mesh=gen.mesh,
                         rules=gen.rules, cache=cache, rows=slots)

            def put(big, new):
                return big.at[slots].set(new.astype(big.dtype))
            cache = dataclasses.replace(rows.cache,
                                        lengths=put(state.cache.lengths, rows.cache.lengths))
            fields = ("anchor", "tokens", "num_generated", "finish", "key", "iterations",
                      "accepted_hist", "block_hist", "seen_tokens", "seen_iterations", "ar_run")
            return dataclasses.replace(
                state, cache=cache,
                **{f: put(getattr(state, f), getattr(rows, f)) for f in fields})
        return jax.jit(insert, donate_argnums=1, out_shardings=self._state_shardings())

    def insert_counts(self, prompt_len: int) -> tuple[int, ...]:
        """How many prompts of bucket ``prompt_len`` one insert program prefills together:
        the :attr:`row_counts` up to ``prefill_rows`` whose prompts hold at most
        ``max_len`` tokens in all (at least 1), so the programs stay few and a batch's
        prefill bounded."""
        return tuple(n for n in self.row_counts if n == 1 or (
            n <= self.prefill_rows and n * prompt_len <= self.max_len))

    def _run_fn(self, rows: int):
        spec = self._spec(self.buckets[0], rows, self.plans[rows])
        return jax.jit(lambda w, s, i, n: run_rows(nnx.merge(self._graphdef, w), s, i, n, spec,
                                                   rows), donate_argnums=1,
                       out_shardings=self._state_shardings())

    def _free_fn(self):
        # A free slot's length drops to 0, so it never holds the attention window up.
        return jax.jit(lambda s, slot: dataclasses.replace(
            s, finish=s.finish.at[slot].set(FINISH_LENGTH),
            cache=dataclasses.replace(s.cache, lengths=s.cache.lengths.at[slot].set(0))),
            donate_argnums=0, out_shardings=self._state_shardings())

    def _chunk_fn(self):
        """Prefill one chunk of ``prefill_chunk`` tokens after a prefix gathered from the
        store, and store the chunk's blocks."""
        C, B = self.prefill_chunk, self._block_tokens
        windows = attention_windows(self.max_len)

        def chunk(weights, store, blocks, start, tokens, dst):
            model = nnx.merge(self._graphdef, weights)
            cache = gather_prefix(store, blocks[None], start[None], self.max_len, windows)
            _, cache = prefill(model, tokens, cache, jnp.full((1,), C, jnp.int32))
            return store_row(store, cache, jnp.int32(0), start // B + jnp.arange(C // B), dst)
        return jax.jit(chunk, donate_argnums=1, out_shardings=self._store_shardings())

    def _store_fn(self):
        return jax.jit(lambda store, s, row, src, dst: store_row(store, s.cache, row, src, dst),
                       donate_argnums=0, out_shardings=self._store_shardings())

    def _store_shardings(self):
        """The prefix store's shardings, which the programs that write it keep."""
        return jax.tree.map(lambda a: a.sharding, self.store)

    def _state_shardings(self):
        """The state's shardings, which every program keeps (a compiled program takes its
        inputs laid out exactly as when it was compiled)."""
        return jax.tree.map(lambda a: a.sharding, self.state)

    def _weights(self) -> nnx.State:
        """The model's arrays as the programs take them (the model itself is rebuilt from
        them inside each program: a module traced by ``lower`` would keep its tracers)."""
        return nnx.state(self.gen.model)

    def _program(self, key: tuple, make, *args) -> jax.stages.Compiled:
        """The compiled program ``key`` (``("insert", P, n)``, ``("step", rows)``,
        ``("free",)``, ``("store",)`` or ``("chunk",)``) for ``args``: loaded from
        :attr:`executables`, else compiled ahead of time from ``make()`` the first time
        (from JAX's persistent compilation cache where the command line turned it on)."""
        if key not in self._programs:
            compiled = self._load(key, args)
            if compiled is None:
                with self._compiling():
                    compiled = make().lower(*args).compile()
                self._save(key, args, compiled)
            self._programs[key] = compiled
        return self._programs[key]

    def _compiling(self) -> contextlib.AbstractContextManager:
        """Around compiles: with a store, JAX's persistent cache is off
        (:func:`infer.executables.fresh_compiles`)."""
        return contextlib.nullcontext() if self.executables is None else fresh_compiles()

    def _settings(self) -> dict:
        """What the programs close over besides their arguments (part of the name of a
        stored executable)."""
        gen = self.gen
        return {"config": gen.config.to_hf_dict(), "dtype": gen.config.dtype,
                "param_dtype": gen.config.param_dtype, "mode": self.mode,
                "slots": self.slots, "max_len": self.max_len, "out_len": self.out_len,
                "max_block": self.max_block, "plans": sorted(self.plans.items()),
                "buckets": self.buckets, "chunk_size": gen.chunk_size,
                "prefill_progress": gen.prefill_progress is not None,
                "block_tokens": self._block_tokens, "prefill_chunk": self.prefill_chunk,
                "windows": attention_windows(self.max_len), "mesh": repr(gen.mesh),
                "rules": repr(gen.rules), "attention_kernel": gen.model.attention_kernel}

    def _digest(self, key: tuple, args: tuple) -> str:
        return self.executables.digest({"program": list(key), **self._settings()}, args)

    def _load(self, key: tuple, args: tuple) -> jax.stages.Compiled | None:
        if self.executables is None:
            return None
        out = self.store if key[0] in ("store", "chunk") else self.state
        return self.executables.load(self._digest(key, args), args, jax.tree.structure(out))

    def _save(self, key: tuple, args: tuple, compiled: jax.stages.Compiled) -> None:
        if self.executables is not None:
            self.executables.save(self._digest(key, args), compiled)

    def _call(self, key: tuple, make, *args):
        return self._program(key, make, *args)(*args)

    def _run(self, key: tuple):
        """Run program ``key`` on :meth:`_builder`'s arguments."""
        make, args = self._builder(key)
        return self._call(key, make, *args)

    def _make_inputs(self) -> DecodeInputs:
        return DecodeInputs(jnp.asarray(self._budget), self.eos, SamplingParams(
            jnp.asarray(self._temperature), jnp.asarray(self._top_k),
            jnp.asarray(self._top_p)))

    def warm_up(self, workers: int = 2) -> float:
        """Compile every program of :meth:`programs` ahead of time, running none: the step
        of each row count, each prompt bucket's insert (:attr:`buckets`: with
        ``prefill_chunk``, those up to the chunk's bucket, since a longer prompt is chunked
        first, :meth:`needs_chunks`; an insert past them compiles on its first call), free,
        store and chunk. Returns the seconds it took.

        Programs are lowered here one after another (tracing holds the interpreter) and
        compiled by ``workers`` threads meanwhile (XLA compiles, or loads a program from
        the persistent compilation cache, without it), the largest first."""
        t0 = time.perf_counter()
        todo = [(key, *self._builder(key)) for key in reversed(self.programs())]
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            # stored programs need no tracing: loaded by the threads too
            loading = {key: pool.submit(self._load, key, args)
                       for key, _, args in todo if key not in self._programs}
            for key, future in loading.items():
                if (compiled := future.result()) is not None:
                    self._programs[key] = compiled
            with self._compiling():
                compiling = {key: (pool.submit(make().lower(*args).compile), args)
                             for key, make, args in todo if key not in self._programs}
                for key, (future, args) in compiling.items():
                    self._programs[key] = future.result()
                    self._save(key, args, self._programs[key])
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def programs(self) -> list[tuple]:
        """Every program's key, smallest first: the step of each row count
        (``("step", rows)``), each prompt bucket's inserts (``("insert", P, n)``), then
        ``("free",)``, ``("store",)`` with a prefix cache and ``("chunk",)`` with chunked
        prefill."""
        keys = [("step", rows) for rows in self.row_counts]
        keys += [("insert", P, n) for P in self.buckets for n in self.insert_counts(P)]
        keys.append(("free",))
        if self.prefix is not None:
            keys.append(("store",))
        if self.prefill_chunk:
            keys.append(("chunk",))
        return keys

    def _builder(self, key: tuple) -> tuple[Callable, tuple]:
        """The jitted function of program ``key`` (made on call) and arguments of its
        shapes: a throwaway one-token prompt for an insert, the slot 0 for the others."""
        kind = key[0]
        if kind == "step":
            rows = key[1]
            return (lambda: self._run_fn(rows),
                    (self._weights(), self.state, self._row_inputs(rows), np.int32(1)))
        if kind == "insert":
            P, n = key[1], key[2]
            return (lambda: self._insert_fn(P, n),
                    self._insert_args([(i, [0], SlotParams(1)) for i in range(n)], P))
        if kind == "free":
            return self._free_fn, (self.state, np.int32(0))
        if kind == "store":
            return self._store_fn, self._store_args(0, [])
        if kind == "chunk":
            return self._chunk_fn, self._chunk_args([0] * self.max_len, [], [])
        raise KeyError(f"no program {key!r}")

    def warm_runs(self) -> list[tuple]:
        """The programs :meth:`exercise_one` has not yet run, in the order it runs them
        (that of :meth:`programs`): steps, inserts, ``store``. (``free`` runs with each of
        them; ``chunk`` is left to its first long prompt.)"""
        return [key for key in self.programs() if key[0] in ("step", "insert", "store")
                and key not in self._exercised]

    def exercise_one(self) -> bool:
        """Run the next program of :meth:`warm_runs` once on a throwaway one-token prompt
        (every slot must be free, and is again afterwards); returns whether any is left.

        XLA:CPU prepares a program's library calls (its matrix products) on its first
        run, loaded or compiled alike: about 0.5-1 s for each program of the default
        model, which the first request of each prompt bucket and row count would otherwise
        wait for. A step runs slot 0 (holding the throwaway prompt) for one iteration,
        so its loop body runs; an insert prefills slots ``0..n-1``; ``free`` runs after
        each. The prefix store gets none of the throwaway prompt's blocks (a store run
        writes padding only, dropped)."""
        todo = self.warm_runs()
        if not todo:
            return False
        if any(not r.free for r in self.records):
            raise RuntimeError("exercise_one() needs every slot free")
        t0 = time.perf_counter()
        key = todo[0]
        budget = self._budget.copy()
        self._budget[:] = self.out_len  # slot 0 keeps decoding through its step
        self._inputs = self._make_inputs()
        try:
            if key[0] == "store":
                self.store = self._run(key)
            else:
                insert = key if key[0] == "insert" else ("insert", self.buckets[0], 1)
                self.state = self._run(insert)
                if key[0] == "step":
                    self.state = self._run(key)
                for slot in range(insert[2]):
                    self.state = self._call(("free",), self._free_fn, self.state,
                                            np.int32(slot))
            jax.block_until_ready((self.state, self.store))
        finally:
            self._budget[:] = budget
            self._inputs = self._make_inputs()
        self._exercised.add(key)
        self.exercise_seconds += time.perf_counter() - t0
        return len(todo) > 1

    def exercise(self) -> float:
        """Every program of :meth:`warm_runs`, one after another (:meth:`exercise_one`);
        returns the seconds they took in all."""
        while self.exercise_one():
            pass
        return self.exercise_seconds

    # ------------------------------------------------------------------ API
    @property
    def busy(self) -> list[bool]:
        """Per slot: whether it decodes a request (inserted, not yet freed)."""
        return [r.decoding for r in self.records]

    def free_slots(self) -> list[int]:
        """The slots that hold nothing (neither decoding nor kept)."""
        return [i for i, r in enumerate(self.records) if r.free]

    def owners(self) -> dict[int, Any]:
        """``{slot: owner}`` of the slots decoding a request."""
        return {i: r.owner for i, r in enumerate(self.records) if r.decoding}

    def keep(self, slot: int, owner: Any) -> None:
        """Keep free ``slot`` for ``owner`` (a request whose long prompt is prefilled in
        chunks first): no other request takes it, and its insert must name the same
        owner."""
        if not 0 <= slot < self.slots or not self.records[slot].free:
            raise ValueError(f"slot {slot} is not a free slot")
        if owner is None:
            raise ValueError("keep(slot, None): give the request's handle")
        self.records[slot] = SlotRecord(owner)

    def forget_all(self) -> None:
        """Every slot free again in the records, with no device call (after a failed
        device call, or at shut-down: the state is not used again)."""
        self.records = [SlotRecord() for _ in range(self.slots)]

    def release(self, slot: int) -> None:
        """Give up a slot kept by :meth:`keep` whose request will not be inserted."""
        if self.records[slot].decoding:
            raise ValueError(f"slot {slot} decodes a request: free it instead")
        self.records[slot] = SlotRecord()

    def insert(self, slot: int, prompt_ids: Sequence[int], params: SlotParams,
               owner: Any = True) -> SlotUpdate:
        """Prefill ``prompt_ids`` into free ``slot`` and pick its first token (returned).
        Raises ``ValueError`` for a bad prompt or settings."""
        return self.insert_many([(slot, prompt_ids, params)], [owner])[0]

    def insert_many(self, requests: Sequence[tuple[int, Sequence[int], SlotParams]],
                    owners: Sequence[Any] | None = None) -> list[SlotUpdate]:
        """Prefill several ``(slot, prompt_ids, params)`` at once and pick their first
        tokens (returned in the same order): prompts of one length bucket go through one
        program together, in groups of :meth:`insert_counts` (largest first). ``owners``:
        each request's handle, kept in its slot's record (default ``True``; a slot kept
        by :meth:`keep` takes its own owner only). Every request is checked before any
        is inserted: ``ValueError`` names the first bad one, and then nothing changed."""
        slots = [slot for slot, _, _ in requests]
        owners = [True] * len(requests) if owners is None else list(owners)
        if len(owners) != len(requests) or any(o is None for o in owners):
            raise ValueError("owners: one handle (not None) per request")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots}: a slot is given twice")
        for (slot, prompt_ids, params), owner in zip(requests, owners, strict=True):
            if not 0 <= slot < self.slots:
                raise ValueError(f"slot {slot} is not in [0, {self.slots})")
            record = self.records[slot]
            if record.decoding:
                raise ValueError(f"slot {slot} is busy")
            if not record.free and record.owner is not owner:
                raise ValueError(f"slot {slot} is kept for another request")
            self.gen.check_ids(prompt_ids)
            params.check()
        # store slots of each prompt's cached prefix; the rest of the prompt is prefilled
        hits = {slot: [] if self.prefix is None else self.prefix.match(
            ids, own=self._chunked.pop(tuple(ids), 0)) for slot, ids, _ in requests}
        by_bucket: dict[int, list] = {}
        for req in requests:
            rest = len(req[1]) - len(hits[req[0]]) * self._block_tokens
            by_bucket.setdefault(prompt_bucket(rest, self.gen.chunk_size), []).append(req)
        for slot, _, params in requests:
            self._budget[slot] = params.max_new_tokens
            # greedy rows have no filters: they never pay for the filtering work
            greedy = params.temperature == 0
            self._temperature[slot] = params.temperature
            self._top_k[slot] = 0 if greedy else params.top_k
            self._top_p[slot] = 1.0 if greedy else params.top_p
        self._inputs = self._make_inputs()
        for P, group in by_bucket.items():
            counts = self.insert_counts(P)
            while group:
                n = max(c for c in counts if c <= len(group))
                part, group = group[:n], group[n:]
                self.state = self._call(("insert", P, n), lambda P=P, n=n: self._insert_fn(P, n),
                                        *self._insert_args(part, P, hits))
                self.inserted[n] += 1
        for (slot, ids, _), owner in zip(requests, owners, strict=True):
            self.records[slot] = SlotRecord(owner, True, 0, [int(t) for t in ids])
            self._store_blocks(slot, ids)
        return self._updates(slots)

    # ------------------------------------------------------------------ chunked prefill
    def uncached(self, prompt_ids: Sequence[int]) -> int:
        """Tokens of ``prompt_ids`` an insert would prefill now: those after its longest
        cached prefix (a lookup that counts no query)."""
        if self.prefix is None:
            return len(prompt_ids)
        return len(prompt_ids) - len(self.prefix.match(prompt_ids, count=False)) * \
            self._block_tokens

    def needs_chunks(self, prompt_ids: Sequence[int]) -> bool:
        """Whether ``prompt_ids`` is to be prefilled in chunks before its insert (more
        than ``prefill_chunk`` uncached tokens)."""
        return bool(self.prefill_chunk) and self.uncached(prompt_ids) > self.prefill_chunk

    def prefill_next_chunk(self, prompt_ids: Sequence[int]) -> None:
        """Prefill the ``prefill_chunk`` tokens of ``prompt_ids`` that follow its longest
        cached prefix into the prefix store (one program; the slots decode on between
        calls). Once :meth:`needs_chunks` is false, an insert finds the chunks as a cached
        prefix and prefills only the rest."""
        hit = [] if self.prefix is None else self.prefix.match(prompt_ids, count=False)
        end = len(hit) * self._block_tokens + self.prefill_chunk
        if not self.prefill_chunk or len(prompt_ids) <= end:  # not needs_chunks
            raise ValueError("this prompt needs no chunked prefill")
        self.gen.check_ids(prompt_ids)
        # the chunk's blocks (the prefix before it is stored: the lookup just walked it)
        todo = [(i, s) for i, s in self.prefix.insert(prompt_ids[:end]) if i >= len(hit)]
        self.store = self._call(("chunk",), self._chunk_fn,
                                *self._chunk_args(prompt_ids, hit, todo))
        self.chunks += 1
        key = tuple(prompt_ids)
        self._chunked[key] = self._chunked.get(key, 0) + self.prefill_chunk

    def forget_chunks(self, prompt_ids: Sequence[int]) -> None:
        """A prompt prefilled in part by :meth:`prefill_next_chunk` will not be inserted
        (its request went away); its chunks stay in the store as any cached prefix."""
        self._chunked.pop(tuple(prompt_ids), None)

    def _chunk_args(self, prompt_ids: Sequence[int], hit: Sequence[int],
                    todo: Sequence[tuple[int, int]]) -> tuple:
        B, C = self._block_tokens, self.prefill_chunk
        blocks = np.zeros((self.max_len // B,), np.int32)
        blocks[:len(hit)] = hit
        start = len(hit) * B
        tokens = np.asarray(prompt_ids[start:start + C], np.int32)[None]
        dst = np.full((C // B,), self.prefix.num_blocks, np.int32)
        for i, s in todo:
            dst[i - len(hit)] = s
        return (self._weights(), self.store, jnp.asarray(blocks), np.int32(start),
                jnp.asarray(tokens), jnp.asarray(dst))

    @property
    def _block_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.block_tokens

    def _store_blocks(self, slot: int, ids: Sequence[int]) -> None:
        """Store the whole blocks of ``ids`` (tokens whose K/V fill the first positions
        of ``slot``'s cache rows) that the prefix store lacks."""
        if self.prefix is None:
            return
        todo = self.prefix.insert(ids)
        m = self._blocks_per_store
        for i in range(0, len(todo), m):
            self.store = self._call(("store",), self._store_fn,
                                    *self._store_args(slot, todo[i:i + m]))

    @property
    def _blocks_per_store(self) -> int:
        """Blocks one store call copies (a call copies that many, padding included, so
        it stays small: a request stores a block or two at a time, a long prompt in a few
        calls)."""
        return min(self.max_len // self._block_tokens, STORE_BLOCKS)

    def _store_args(self, slot: int, todo: Sequence[tuple[int, int]]) -> tuple:
        """The store program's arguments: ``todo``'s ``(block, store slot)`` pairs padded
        to :attr:`_blocks_per_store` (padding: block 0 to slot ``num_blocks``, dropped)."""
        m = self._blocks_per_store
        src = np.zeros((m,), np.int32)
        dst = np.full((m,), self.prefix.num_blocks, np.int32)
        for i, (block, at) in enumerate(todo):
            src[i], dst[i] = block, at
        return self.store, self.state, np.int32(slot), jnp.asarray(src), jnp.asarray(dst)

    def _insert_args(self, requests: Sequence[tuple[int, Sequence[int], SlotParams]],
                     P: int, hits: dict[int, list[int]] | None = None) -> tuple:
        """The insert program's arguments for ``requests`` (what follows each prompt's
        cached prefix, store slots ``hits[slot]``, padded to bucket ``P``), whose settings
        are already in the engine's per-slot arrays."""
        hits = hits or {}
        n, B = len(requests), self._block_tokens
        slots = np.array([slot for slot, _, _ in requests], np.int32)
        prompts = np.zeros((n, P), np.int32)
        lengths = np.zeros((n,), np.int32)
        for i, (slot, ids, _) in enumerate(requests):
            rest = ids[len(hits.get(slot, [])) * B:]
            prompts[i, :len(rest)] = rest
            lengths[i] = len(rest)
        seeds = np.array([params.seed for _, _, params in requests], np.int32)
        row_inputs = DecodeInputs(
            jnp.asarray(self._budget[slots]), self.eos,
            SamplingParams(*(jnp.asarray(a[slots]) for a in
                             (self._temperature, self._top_k, self._top_p))))
        args = (self._weights(), self.state, jnp.asarray(slots), jnp.asarray(prompts),
                jnp.asarray(lengths), row_inputs, jnp.asarray(seeds))
        if self.prefix is None:
            return args
        blocks = np.zeros((n, self.max_len // B), np.int32)
        for i, (slot, _, _) in enumerate(requests):
            hit = hits.get(slot, [])
            blocks[i, :len(hit)] = hit
        prefix_lengths = np.array([len(hits.get(slot, [])) * B for slot, _, _ in requests],
                                  np.int32)
        return (*args, self.store, jnp.asarray(blocks), jnp.asarray(prefix_lengths))

    def step(self, n_iterations: int = 1) -> list[SlotUpdate]:
        """Run up to ``n_iterations`` loop iterations (fewer when every slot is done) and
        return the busy slots' updates: new tokens, and a finish reason once done (the
        slot stays busy until :meth:`free`)."""
        busy = [i for i, b in enumerate(self.busy) if b]
        if not busy:
            return []
        rows = self.rows = self.rows_for(busy)
        self.rows_stepped[rows] += 1
        self.state = self._call(("step", rows), lambda: self._run_fn(rows), self._weights(),
                                self.state, self._row_inputs(rows), np.int32(n_iterations))
        return self._updates(busy)

    def rows_for(self, busy: Sequence[int]) -> int:
        """The row count of the program that steps the ``busy`` slots: the smallest of
        :attr:`row_counts` that holds the highest of them."""
        need = max(busy) + 1
        return next(r for r in self.row_counts if r >= need)

    def _row_inputs(self, rows: int) -> DecodeInputs:
        """The per-call inputs of the first ``rows`` slots (with the tree scoring of their
        step program's plan)."""
        if rows not in self._tree_scoring:
            self._tree_scoring[rows] = self.gen.tree_scoring(
                self._spec(self.buckets[0], rows, self.plans[rows]))
        inputs = dataclasses.replace(self._inputs, tree_scoring=self._tree_scoring[rows])
        if rows == self.slots:
            return inputs
        return dataclasses.replace(inputs, max_new_tokens=inputs.max_new_tokens[:rows],
                                   sampling=jax.tree.map(lambda a: a[:rows], inputs.sampling))

    def free(self, slot: int) -> None:
        """Stop ``slot``'s row (if still running) and make the slot free; with a prefix
        cache, the whole blocks of its prompt and answer are stored first (every token
        but the newest has its K/V in the cache)."""
        if self.records[slot].decoding:
            self._store_blocks(slot, self.records[slot].held[:-1])
        self.state = self._call(("free",), self._free_fn, self.state, np.int32(slot))
        self.records[slot] = SlotRecord()

    def _updates(self, slots: list[int]) -> list[SlotUpdate]:
        tokens = np.asarray(self.state.tokens)
        counts = np.asarray(self.state.num_generated)
        finish = np.asarray(self.state.finish)
        iterations = np.asarray(self.state.iterations)
        out = []
        for s in slots:
            record = self.records[s]
            new = tokens[s, record.shown:counts[s]].tolist()
            record.shown = int(counts[s])
            record.held += new
            reason = None if finish[s] == RUNNING else FINISH_REASONS[int(finish[s])]
            out.append(SlotUpdate(s, new, reason, int(iterations[s])))
        return out
