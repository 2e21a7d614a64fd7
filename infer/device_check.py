"""The device checks of the inference floor, their plan, and the runner that writes their
JSON report.

The command is ``python -m train.device_check``: it sits on the top floor because it
also times a training step (``infer/`` never imports ``train/``), and it runs the
sections defined here (:data:`INFER_SECTIONS`) plus its own ``train_step``. This module
holds what does not need ``train/``:

- ``model``: builds the model of random weights (or loads ``--model``) a tensor at a time
  (:func:`orthrus_jax.random_weights.random_model`): seconds, bytes, the memory it took;
- ``device``: backend, device kind, versions, memory statistics, copy bandwidth
  (:func:`infer.passes.copy_bandwidth`);
- ``passes``: for each cache context and block size, the AR step, diffusion pass and
  verify pass (:func:`infer.passes.time_passes`), each against its memory floor
  (:func:`infer.passes.bytes_read` over the copy bandwidth), and the cost of one
  iteration (diffusion + verify) in AR steps;
- ``trees``: at one context and the passes' largest block ``K``, the verify pass of draft
  trees of ``N`` nodes (``N + 1`` rows; :func:`infer.passes.tree_verify_pass`) for each
  budget, against the AR step, the memory floor and the chain's verify pass (``K``
  rows), and the decode loop's iteration verifying those trees against the AR loop's
  step and the chain loop's;
- ``decode_loop``: the whole compiled decode loop (:class:`infer.engine.Generator`) on
  random token-id prompts, greedy, in modes ``orthrus`` (the model's block size) and
  ``ar``: tokens/s, iterations/s, tokens/iteration and compile seconds per bucket;
- ``layers``: one AR step with the layers as one ``lax.scan`` (the stacked model)
  against the unrolled per-layer form (the decoder's).

The model is held once, in the form the running section needs (per-layer arrays for
decoding, ``[L, ...]`` stacks for the scan and training; :func:`orthrus_jax.model.
set_layer_form` changes it in place).

**The plan.** Before anything is allocated, every chosen section's programs are lowered
and compiled with abstract arguments (:mod:`infer.device_plan`) and sized by XLA's
``memory_analysis()``; a section whose planned peak would not fit the device
(``--device-memory``, else the allocator's limit) is shrunk (fewer contexts, a shorter
train sequence, ...) or skipped with the reason, and the sections run cheapest first by
their estimated time (compile plus FLOPs and bytes at the device's tabulated peak).
``--plan-only`` stops there: the report then holds every section's plan and nothing was
allocated. On a real run the compiled programs are kept in a persistent compilation cache
(``--compile-cache``, else a temporary folder), so the plan's compiles are not paid twice.

The runner (:func:`run_checks`) is built for a lent accelerator with a hard time limit:
every section runs in its own ``try``; a failure is recorded in the report (error and
traceback) and the next section runs; the report is rewritten atomically after the plan
and after every section, so a run killed by a time limit still leaves what it finished;
progress lines with elapsed seconds go to stderr; a section that would start after
``--budget-seconds`` is recorded as skipped (long sections also stop early inside, and
say what they left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.compile_cache import enable_compile_cache, restored_compile_cache
from infer.device_plan import (
    DEVICES,
    FIT_FRACTION,
    DeviceSpec,
    Program,
    device_spec,
    plan_programs,
    summarize_plan,
)
from infer.engine import Generator, summarize
from infer.options import tree_budgets_arg
from infer.passes import (
    LOOP_STEPS,
    ar_pass,
    bytes_read,
    copy_bandwidth,
    copy_pass,
    diffusion_pass,
    loop_args,
    loop_pass,
    on_device,
    random_tree,
    time_passes,
    tree_verify_pass,
)
from orthrus_jax.cache import KVCache, init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.cli import InputError, run_command
from orthrus_jax.config import DTYPE_NAMES, ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.memory import format_bytes, parse_bytes, peak_memory, tree_bytes
from orthrus_jax.model import AR_VIEW, DIFFUSION_VIEW, OrthrusLM, set_layer_form
from orthrus_jax.random_weights import abstract_params, random_model

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_BUDGET_SECONDS = 420.0  # fits an 8-minute device slot with room for start-up
# The passes section starts no new context once it has used this share of the budget (each
# context compiles 1 + 2 x blocks programs of the unrolled model), leaving the rest of the
# budget to the sections after it.
PASSES_BUDGET_SHARE = 0.5
# The device a plan made with --plan-only on an untabulated device (a CPU) estimates times
# for, unless --device-kind names another: the machine this project's GPU runs get.
DEFAULT_TARGET = "h100"
MAX_SHRINKS = 8  # re-plans of one section before it is skipped
# GPU memory JAX's allocator may take (its default preallocates 75%); set for the
# device check's process before a backend starts, unless the environment sets it.
MEM_FRACTION = "0.95"
# XLA flags of the device check's process (added before a backend starts). XLA:CPU's
# default scheduler favours concurrency and starts every weight's conversion to float32
# at once (a Qwen3-8B AR step planned 31 GB of temporaries, 2.5 GB with it off); a GPU's
# compiler schedules for memory, and so does the plan with this.
XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
# Added with --plan-only, where nothing runs: no machine-code optimisation (half the
# compile time; the buffers, and so the plan, are the same).
PLAN_ONLY_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


@dataclasses.dataclass
class Settings:
    """The shapes and repeats of every section; :data:`PRESETS` holds the two defaults."""

    contexts: tuple[int, ...]  # cached positions per row (passes)
    blocks: tuple[int, ...]  # block sizes K (passes, trees at the largest; those above the
    # model's K are dropped)
    batch_size: int  # rows (passes, layers, decode loop)
    repeats: int  # timed calls per pass (median)
    copy_mib: int  # size of the bandwidth probe
    prompts: int  # random prompts of the decode loop
    prompt_len: int  # their longest length (the others are up to 1/8 shorter)
    max_new_tokens: int
    layers_context: int  # cached positions of the scan-vs-unrolled step
    tree_budgets: tuple[int, ...]  # drafted nodes N per tree (trees; N + 1 verify rows)
    tree_context: int  # cached positions per row (trees)
    train_batch_size: int  # sequences of the train step
    train_seq_len: int
    train_anchors: int  # anchor blocks per sequence
    train_steps: int  # timed steps after the compiled first one (median)
    train_remat: bool  # recompute each layer in the backward pass
    seed: int = 0


PRESETS = {
    # One H100 and a Qwen3-8B shape in bfloat16: planned and run in about 8 minutes.
    "full": Settings(contexts=(512, 2048, 8192), blocks=(8, 16, 32), batch_size=1, repeats=10,
                     copy_mib=1024, prompts=4, prompt_len=100, max_new_tokens=128,
                     layers_context=2048, tree_budgets=(16, 32, 64, 128), tree_context=2048,
                     train_batch_size=1, train_seq_len=2048, train_anchors=64, train_steps=3,
                     train_remat=True),
    # CPU and tests: tiny shapes, few repeats.
    "small": Settings(contexts=(16, 32), blocks=(2, 4), batch_size=1, repeats=2, copy_mib=8,
                      prompts=2, prompt_len=8, max_new_tokens=8, layers_context=32,
                      tree_budgets=(3, 7), tree_context=16, train_batch_size=1,
                      train_seq_len=32, train_anchors=4, train_steps=2, train_remat=False),
}


# ---------------------------------------------------------------------------- helpers
def resolve_config(name: str) -> Path:
    """An HF ``config.json`` path, a folder holding one, or the name of a shipped shape
    (``qwen3-8b`` is ``infer/configs/qwen3-8b.json``)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name.removesuffix('.json')}.json"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"--config {name}: no such file, and no shipped config of that "
                            f"name (shipped: {', '.join(names) or 'none'})")


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``call()`` (awaited) over ``repeats`` calls, after one warm-up."""
    jax.block_until_ready(call())
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memory_stats(device=None) -> dict | None:
    """The device's memory statistics (``None`` where the backend keeps none, e.g. CPU)."""
    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    return {k: int(v) for k, v in stats.items()} if stats else None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def write_report(path: Path, report: dict) -> None:
    """Write ``report`` as JSON through a temporary file and ``os.replace``: a reader (or
    a run killed mid-write) sees the previous report or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Checks:
    """What the sections share: settings, the clock and budget, the progress log, the
    config, and the model (built on first use, once, and held in one layer form at a time;
    a failure to build is remembered and re-raised)."""

    def __init__(self, args: argparse.Namespace, settings: Settings, *,
                 budget: float | None, t0: float | None = None):
        self.args, self.settings, self.budget = args, settings, budget
        self.t0 = time.perf_counter() if t0 is None else t0
        self.model_info: dict = {"source": args.model or str(args.config), "built": False}
        self._config: ModelConfig | None = None
        self._abstract: dict[bool, OrthrusLM] = {}
        self._model: OrthrusLM | None = None
        self._model_error: str | None = None
        self._bandwidth: float | None = None
        self.section_t0 = self.t0

    # -------------------------------------------------------------- clock, progress
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self, share: float | None = None) -> bool:
        """Whether the run has used its time budget, or (with ``share``) the current
        section has used that share of it."""
        if self.budget is None:
            return False
        if share is not None and time.perf_counter() - self.section_t0 >= share * self.budget:
            return True
        return self.elapsed() >= self.budget

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- shared objects
    @property
    def dtype(self) -> str:
        if self.args.dtype:
            return self.args.dtype
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"

    @property
    def config(self) -> ModelConfig:
        """The model's config in the run's dtype (random weights: any id is the mask)."""
        if self._config is None:
            if self.args.model:
                path = Path(self.args.model) / "config.json"
                if not path.is_file():
                    raise FileNotFoundError(f"--model {self.args.model}: no config.json")
                config = ModelConfig.from_json_file(path).replace(dtype=self.dtype,
                                                                  param_dtype=self.dtype)
            else:
                config = ModelConfig.from_json_file(self.args.config, dtype=self.dtype,
                                                    param_dtype=self.dtype)
            if config.mask_token_id is None:
                config = config.replace(mask_token_id=0)
            self._config = config
        return self._config

    def abstract(self, per_layer: bool = True) -> OrthrusLM:
        """The model with ``ShapeDtypeStruct`` leaves, in either layer form: for planning
        (made once per form)."""
        if per_layer not in self._abstract:
            self._abstract[per_layer] = abstract_params(self.config, per_layer=per_layer)
        return self._abstract[per_layer]

    def held_model_bytes(self) -> int:
        """What the model holds while a section that does not use it runs (it may have
        been built before): its bytes, or 0 where its config cannot be read (then it
        cannot be built either, and the sections that need it fail on their own)."""
        try:
            return tree_bytes(self.abstract())
        except (OSError, ValueError):
            return 0

    def model(self, per_layer: bool = True) -> OrthrusLM:
        """The model, built on first use, in the form asked for (per-layer arrays: the
        decoder's; stacked: the scan's and training's), changed in place when needed."""
        if self._model_error is not None:
            raise RuntimeError(f"the model could not be built: {self._model_error}")
        if self._model is None:
            self.log(f"model: building from {self.model_info['source']} ({self.dtype})")
            t0 = time.perf_counter()
            try:
                model = self._build_model()
                jax.block_until_ready(nnx.state(model))
            except Exception as e:
                self._model_error = _error(e)
                self.model_info["error"] = self._model_error
                raise
            self._model = model
            self.model_info.update(describe_model(model), built=True,
                                   build_seconds=time.perf_counter() - t0)
            self.log(f"model: {self.model_info['params'] / 1e6:,.1f}M parameters "
                     f"({format_bytes(self.model_info['param_bytes'])}) in "
                     f"{self.model_info['build_seconds']:.1f}s")
        if self._model.per_layer != per_layer:
            set_layer_form(self._model, per_layer)
            gc.collect()
        return self._model

    def _build_model(self) -> OrthrusLM:
        if self.args.model:
            return load_model(self.args.model, param_dtype=self.config.param_dtype,
                              per_layer=True)
        return random_model(self.config, seed=self.settings.seed, per_layer=True)

    def bandwidth(self) -> float:
        """Bytes/s of a device copy (read + write), measured once."""
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth(self.settings.copy_mib)
        return self._bandwidth


def describe_model(model: OrthrusLM) -> dict:
    """Shape, parameter counts and bytes of a model (real or abstract)."""
    c = model.config
    leaves = jax.tree.leaves(nnx.state(model))
    diffusion = jax.tree.leaves(nnx.state(model, DiffusionParam))
    return {"model_type": c.model_type, "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "block_size": c.block_size,
            "dtype": c.dtype, "param_dtype": c.param_dtype,
            "params": int(sum(np.prod(a.shape) for a in leaves)),
            "diffusion_params": int(sum(np.prod(a.shape) for a in diffusion)),
            "param_bytes": tree_bytes(leaves)}


def form_change_bytes(model: OrthrusLM) -> int:
    """What changing the layer form holds beyond the weights: one weight kind's copy (the
    largest kind, all layers)."""
    return max(tree_bytes(var.get_value()) for _, var in nnx.iter_graph(model.layers)
               if isinstance(var, nnx.Variable))


def _abstract_cache(model: OrthrusLM, batch_size: int, max_len: int) -> KVCache:
    """The abstract cache of the timing code, committed to the device like its arrays."""
    c = model.config
    return on_device(jax.eval_shape(
        lambda: init_cache(c, batch_size, max_len, per_layer=model.per_layer)))


def _tokens(batch_size: int, length: int) -> jax.ShapeDtypeStruct:
    return on_device(jax.ShapeDtypeStruct((batch_size, length), jnp.int32))


# ---------------------------------------------------------------------------- sections
def model_section(checks: Checks) -> dict:
    peak = peak_memory()
    before = peak["device_bytes_in_use"]
    checks.model()
    after = peak_memory()
    out = {**checks.model_info, "memory": after}
    if before is not None and after["device_bytes_in_use"] is not None:
        out["device_bytes_added"] = after["device_bytes_in_use"] - before
    return out


def model_resident(checks: Checks, s: Settings) -> int:
    """The model section holds the parameters (the draws write in place)."""
    return tree_bytes(checks.abstract())


def device_section(checks: Checks) -> dict:
    import flax
    import jaxlib

    d = jax.devices()[0]
    out: dict[str, Any] = {
        "backend": jax.default_backend(), "device_kind": d.device_kind, "device": str(d),
        "device_count": jax.device_count(), "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
    }
    try:
        out["platform_version"] = d.client.platform_version
    except Exception:  # noqa: BLE001 - informative only
        out["platform_version"] = None
    out["memory_stats"] = memory_stats(d)
    out["copy_mib"] = checks.settings.copy_mib
    out["copy_bandwidth_gb_s"] = checks.bandwidth() / 1e9
    checks.log(f"device: {out['device_kind']} ({out['backend']}), copy "
               f"{out['copy_bandwidth_gb_s']:.1f} GB/s")
    return out


def device_programs(checks: Checks, s: Settings) -> list[Program]:
    probe = on_device(jax.ShapeDtypeStruct((s.copy_mib * 2**20 // 4,), jnp.float32))
    return [Program("copy", copy_pass, (probe,), calls=6, held_bytes=checks.held_model_bytes())]


def device_shrink(s: Settings) -> tuple[Settings, str] | None:
    if s.copy_mib < 2:
        return None
    return (dataclasses.replace(s, copy_mib=s.copy_mib // 2),
            f"copy probe {s.copy_mib} -> {s.copy_mib // 2} MiB")


def _floor(seconds: float, floor: float) -> dict:
    return {"seconds": seconds, "floor_seconds": floor, "ratio_to_floor": seconds / floor}


def _pass_blocks(s: Settings, c: ModelConfig) -> list[int]:
    return sorted({k for k in s.blocks if 2 <= k <= c.block_size}) or [c.block_size]


def _pass_contexts(s: Settings, c: ModelConfig) -> tuple[list[int], dict[str, str]]:
    """The contexts the passes section times, and those it skips with the reason."""
    room = max(_pass_blocks(s, c))
    keep, skipped = [], {}
    for context in s.contexts:
        if context + room > c.max_position_embeddings:
            skipped[str(context)] = (f"context + block exceeds max_position_embeddings "
                                     f"{c.max_position_embeddings}")
        else:
            keep.append(context)
    return keep, skipped


def passes_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.model()
    c = model.config
    blocks = _pass_blocks(s, c)
    contexts, skipped = _pass_contexts(s, c)
    bandwidth = checks.bandwidth()
    probe = init_cache(c, s.batch_size, 1)
    out: dict[str, Any] = {"batch_size": s.batch_size, "repeats": s.repeats, "blocks": blocks,
                           "dropped_blocks": sorted(set(s.blocks) - set(blocks)),
                           "copy_bandwidth_gb_s": bandwidth / 1e9, "contexts": {},
                           "skipped_contexts": skipped}
    for context in contexts:
        if checks.over_budget(PASSES_BUDGET_SHARE):
            out["skipped_contexts"][str(context)] = (
                f"time budget exceeded (this section stops at {PASSES_BUDGET_SHARE:.0%} of it)")
            continue
        t = time_passes(model, blocks=blocks, batch_size=s.batch_size, context=context,
                        repeats=s.repeats, seed=s.seed)
        ar_floor = bytes_read(model, AR_VIEW, probe, context) / bandwidth
        diff_floor = bytes_read(model, DIFFUSION_VIEW, probe, context) / bandwidth
        entry: dict[str, Any] = {"ar_step": _floor(t["ar_step"], ar_floor),
                                 "ar_loop_step_seconds": t["ar_iteration"], "blocks": {}}
        for k in blocks:
            d, v, loop = t["diffusion_pass"][k], t["verify_pass"][k], t["iteration"][k]
            entry["blocks"][str(k)] = {
                "diffusion_pass": _floor(d, diff_floor), "verify_pass": _floor(v, ar_floor),
                "iteration_seconds": d + v, "iteration_to_ar_step": (d + v) / t["ar_step"],
                # the compiled decode loop's own iteration, beside its two passes
                "loop_iteration_seconds": loop, "loop_to_passes": loop / (d + v),
                "loop_to_ar_loop_step": loop / t["ar_iteration"]}
        out["contexts"][str(context)] = entry
        top = entry["blocks"][str(max(blocks))]
        checks.log(f"passes: context {context}: AR step {t['ar_step'] * 1e3:.2f} ms "
                   f"({entry['ar_step']['ratio_to_floor']:.2f}x floor); K={max(blocks)} "
                   f"iteration {top['iteration_to_ar_step']:.2f} AR steps, in the loop "
                   f"{top['loop_to_ar_loop_step']:.2f} ({top['loop_to_passes']:.3f}x its "
                   "passes)")
    return out


def passes_programs(checks: Checks, s: Settings) -> list[Program]:
    """Per context: the AR step and, per block size, the diffusion and verify passes and
    the decode loop's iterations (at each block size and at 1), as
    :func:`infer.passes.time_passes` runs them (one context at a time, each with its own
    cache of ``context + max(blocks)`` positions, and each loop with its own copy)."""
    model = checks.abstract()
    c = model.config
    blocks = _pass_blocks(s, c)
    contexts, _ = _pass_contexts(s, c)
    programs = []
    for context in contexts:  # one context's cache is held at a time
        programs += _context_programs(model, s, context, blocks)
    return programs


def _abstract_tree(model: OrthrusLM, batch_size: int, block: int, budget: int
                   ) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The verify pass's abstract inputs for a tree of ``budget`` nodes (of
    :func:`infer.passes.random_tree` at ``block``): tokens and offsets ``[B, N + 1]``,
    visible ``[B, N + 1, N + 1]``."""
    def rows():
        t = random_tree(model, batch_size, block, budget, 0)
        return t.rows(jnp.ones((batch_size,), jnp.int32)), t.offsets, t.visible
    return on_device(jax.eval_shape(rows))


def _context_programs(model: OrthrusLM, s: Settings, context: int, blocks: Sequence[int],
                      tree_budgets: Sequence[int] = ()) -> list[Program]:
    """The programs :func:`infer.passes.time_passes` runs at one ``context`` over a cache of
    ``context + max(blocks)`` positions: the AR step, per block size the diffusion and
    verify passes, the loop at 1 and at each block size, and per tree budget ``N`` the
    tree's verify pass (``N + 1`` rows) and the loop verifying trees at ``max(blocks)``.
    Every loop decodes over its own copy of the cache, all held (with the trees) while the
    context runs."""
    B, room = s.batch_size, max(blocks)
    cache = _abstract_cache(model, B, context + room)
    kv = (cache.k, cache.v, cache.lengths)
    tree_rows = {n: _abstract_tree(model, B, room, n) for n in tree_budgets}
    held = ((len(blocks) + 1 + len(tree_budgets)) * tree_bytes(cache)
            + sum(tree_bytes(jax.eval_shape(lambda n=n: random_tree(model, B, room, n, 0)))
                  for n in tree_budgets))
    calls = s.repeats + 1

    def program(name: str, fn: Callable, args: tuple, trips: int = 1) -> Program:
        return Program(name, fn, args, calls, trips=trips, held_bytes=held)

    def loop(name: str, k: int, budget: int = 0) -> Program:
        args, _ = loop_args(model, cache, k, tree_budget=budget)
        steps = max(1, min(LOOP_STEPS, (cache.max_len - 2) // k))
        return program(name, loop_pass, args, trips=steps)

    programs = [program(f"ar_step@{context}", ar_pass, (model, _tokens(B, 1), *kv))]
    for k in blocks:
        programs.append(program(f"diffusion_pass@{context}/K={k}", diffusion_pass,
                                (model, _tokens(B, k), cache)))
        programs.append(program(f"verify_pass@{context}/K={k}", ar_pass,
                                (model, _tokens(B, k), *kv)))
    programs += [loop(f"loop@{context}/K={k}", k) for k in (1, *blocks)]
    for n in tree_budgets:
        programs.append(program(f"tree_verify_pass@{context}/N={n}", tree_verify_pass,
                                (model, *tree_rows[n], cache)))
        programs.append(loop(f"loop@{context}/K={room}/N={n}", room, n))
    return programs


def passes_shrink(s: Settings) -> tuple[Settings, str] | None:
    if len(s.contexts) < 2:
        return None
    drop = max(s.contexts)
    return (dataclasses.replace(s, contexts=tuple(c for c in s.contexts if c != drop)),
            f"context {drop} dropped")


def _tree_shape(s: Settings, c: ModelConfig) -> tuple[int, int, list[int]]:
    """The trees section's context, block size (the passes' largest) and budgets."""
    block = max(_pass_blocks(s, c))
    context = max(1, min(s.tree_context, c.max_position_embeddings - block))
    return context, block, sorted(set(s.tree_budgets))


def trees_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.model()
    c = model.config
    context, K, budgets = _tree_shape(s, c)
    bandwidth = checks.bandwidth()
    t = time_passes(model, blocks=[K], batch_size=s.batch_size, context=context,
                    repeats=s.repeats, seed=s.seed, tree_budgets=budgets)
    probe = init_cache(c, s.batch_size, 1)
    ar_floor = bytes_read(model, AR_VIEW, probe, context) / bandwidth
    diff_floor = bytes_read(model, DIFFUSION_VIEW, probe, context) / bandwidth
    ar, ar_loop = t["ar_step"], t["ar_iteration"]
    d, v, chain_loop = t["diffusion_pass"][K], t["verify_pass"][K], t["iteration"][K]
    out: dict[str, Any] = {
        "context": context, "block": K, "batch_size": s.batch_size, "repeats": s.repeats,
        "tree_budgets": budgets, "copy_bandwidth_gb_s": bandwidth / 1e9,
        "ar_step": _floor(ar, ar_floor), "ar_loop_step_seconds": ar_loop,
        "diffusion_pass": _floor(d, diff_floor),
        # the chain the trees replace: K - 1 drafted nodes, K verify rows
        "chain": {"nodes": K - 1, "rows": K, **_floor(v, ar_floor), "to_ar_step": v / ar,
                  "loop_iteration_seconds": chain_loop,
                  "loop_to_ar_loop_step": chain_loop / ar_loop,
                  "loop_to_passes": chain_loop / (d + v)},
        "budgets": {}}
    checks.log(f"trees: context {context}, K={K}: chain verify ({K} rows) {v / ar:.2f} AR "
               f"steps, loop {chain_loop / ar_loop:.2f} AR loop steps")
    for n in budgets:
        tv, loop = t["tree_verify_pass"][n], t["tree_iteration"][n]
        entry = out["budgets"][str(n)] = {
            "nodes": n, "rows": n + 1, **_floor(tv, ar_floor), "to_ar_step": tv / ar,
            "to_chain_verify": tv / v, "loop_iteration_seconds": loop,
            "loop_to_ar_loop_step": loop / ar_loop, "loop_to_chain_loop": loop / chain_loop,
            "loop_to_passes": loop / (d + tv)}
        checks.log(f"trees: N={n} ({n + 1} rows): verify {tv * 1e3:.2f} ms, "
                   f"{entry['to_ar_step']:.2f} AR steps ({entry['ratio_to_floor']:.2f}x "
                   f"floor, {entry['to_chain_verify']:.2f}x the chain's); loop "
                   f"{entry['loop_to_ar_loop_step']:.2f} AR loop steps "
                   f"({entry['loop_to_chain_loop']:.2f}x the chain's)")
    return out


def trees_programs(checks: Checks, s: Settings) -> list[Program]:
    """The programs of :func:`infer.passes.time_passes` at the trees' context and block
    with their budgets: the AR step and loop, the chain's passes and loop at ``K``, and per
    budget the tree's verify pass and the loop verifying trees."""
    model = checks.abstract()
    context, block, budgets = _tree_shape(s, model.config)
    return _context_programs(model, s, context, [block], budgets)


def trees_shrink(s: Settings) -> tuple[Settings, str] | None:
    budgets = set(s.tree_budgets)
    if len(budgets) < 2:
        return None
    drop = max(budgets)
    return (dataclasses.replace(s, tree_budgets=tuple(sorted(budgets - {drop}))),
            f"tree budget {drop} dropped")


def _decode_prompts(s: Settings, c: ModelConfig) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(s.seed)
    lengths = rng.integers(max(1, s.prompt_len - s.prompt_len // 8), s.prompt_len + 1,
                           s.prompts)
    return lengths, [rng.integers(0, c.vocab_size, int(n)).tolist() for n in lengths]


DECODE_MODES = ("orthrus", "ar")


def decode_loop_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.model()
    c = model.config
    lengths, prompts = _decode_prompts(s, c)
    gen = Generator(model)
    kwargs = dict(max_new_tokens=s.max_new_tokens, eos_ids=[], batch_size=s.batch_size)
    out: dict[str, Any] = {"prompts": len(prompts), "prompt_lengths": lengths.tolist(),
                           "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
                           "block_size": c.block_size, "greedy": True, "modes": {},
                           "skipped_modes": {},
                           "note": "random token ids and no EOS: every prompt decodes "
                                   "max_new_tokens; with random weights drafts are rarely "
                                   "accepted, so iterations/s is the figure to read"}
    for mode in DECODE_MODES:
        if checks.over_budget():
            out["skipped_modes"][mode] = "time budget exceeded"
            continue
        before = set(gen.compile_seconds)
        t0 = time.perf_counter()
        gen.warm_up(prompts, mode=mode, **kwargs)  # compiles every program the run needs
        warm_seconds = time.perf_counter() - t0
        results = gen.generate(prompts, mode=mode, **kwargs)
        totals = summarize(results)
        # Per batch: loop iterations (the longest row's: rows of a batch iterate together)
        # and loop seconds (after prefill and the first token).
        iterations: dict[int, int] = {}
        loop_seconds: dict[int, float] = {}
        for r in results:
            iterations[r.batch] = max(iterations.get(r.batch, 0), r.iterations)
            loop_seconds[r.batch] = r.seconds - r.time_to_first_token
        compiled = [{"bucket": k.describe(), "seconds": v}
                    for k, v in gen.compile_seconds.items() if k not in before]
        out["modes"][mode] = {
            "tokens": totals["tokens"], "iterations": totals["iterations"],
            "seconds": totals["seconds"], "tokens_per_second": totals["tokens_per_second"],
            "loop_seconds": sum(loop_seconds.values()),
            "iterations_per_second": sum(iterations.values()) / sum(loop_seconds.values()),
            "tokens_per_iteration": totals["tokens_per_iteration"],
            "time_to_first_token": totals["time_to_first_token"],
            "warm_up_seconds": warm_seconds, "compile_seconds": compiled,
            "compile_seconds_total": sum(b["seconds"] for b in compiled)}
        if mode == "orthrus":
            out["modes"][mode]["accepted_hist"] = totals["accepted_hist"]
        m = out["modes"][mode]
        checks.log(f"decode_loop: {mode}: {m['tokens_per_second']:.1f} tokens/s, "
                   f"{m['iterations_per_second']:.1f} iterations/s, "
                   f"{m['tokens_per_iteration']:.2f} tokens/iteration, compile "
                   f"{m['compile_seconds_total']:.1f}s")
    if len(out["modes"]) == 2:
        o, a = out["modes"]["orthrus"], out["modes"]["ar"]
        out["speedup"] = o["tokens_per_second"] / a["tokens_per_second"]
        out["iteration_to_ar_step"] = a["iterations_per_second"] / o["iterations_per_second"]
    return out


def decode_loop_programs(checks: Checks, s: Settings) -> list[Program]:
    """The start (prefill and first token) and run (the loop) programs of every bucket the
    section decodes, in both modes; the loop's cost counted for ``max_new_tokens`` trips
    (with random weights every iteration commits about one token)."""
    gen = Generator(checks.abstract())
    _, prompts = _decode_prompts(s, gen.config)
    batches = -(-len(prompts) // s.batch_size)
    programs = []
    for mode in DECODE_MODES:
        keys = gen.program_keys(prompts, mode=mode, max_new_tokens=s.max_new_tokens,
                                eos_ids=[], batch_size=s.batch_size)
        for key in keys:
            (start_fn, start_args), (run_fn, run_args) = gen.lowering(key)
            name = f"{mode}@prompt{key.prompt_len}/cache{key.max_len}"
            programs += [Program(f"start:{name}", start_fn, start_args, calls=1 + batches),
                         Program(f"run:{name}", run_fn, run_args, calls=1 + batches,
                                 trips=s.max_new_tokens)]
    return programs


def ar_step_timing(model: OrthrusLM, *, batch_size: int, context: int, repeats: int,
                   seed: int = 0) -> dict:
    """Compile seconds and median step seconds of one AR step (token in, logits out, its
    K/V written in place) over a cache filled to ``context``, for ``model`` in whichever
    layer form it is (stacked: ``lax.scan``; per-layer: unrolled)."""
    c = model.config
    cache = init_cache(c, batch_size, context + 1, per_layer=model.per_layer)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * c.num_hidden_layers))
    held = [on_device(jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype),
                                   kv)) for kv in (cache.k, cache.v)]
    lengths = on_device(jnp.full((batch_size,), context, jnp.int32))
    tokens = on_device(jnp.asarray(
        np.random.default_rng(seed).integers(0, c.vocab_size, (batch_size, 1)), jnp.int32))
    t0 = time.perf_counter()
    compiled = ar_pass.lower(model, tokens, *held, lengths).compile()
    compile_seconds = time.perf_counter() - t0

    def call() -> jax.Array:
        logits, held[0], held[1] = compiled(model, tokens, *held, lengths)
        return logits

    return {"compile_seconds": compile_seconds, "step_seconds": median_seconds(call, repeats)}


LAYER_FORMS = (("scan", False), ("unrolled", True))


def _layers_context(s: Settings, c: ModelConfig) -> int:
    return max(1, min(s.layers_context, c.max_position_embeddings - 1))


def layers_section(checks: Checks) -> dict:
    s = checks.settings
    c = checks.config
    context = _layers_context(s, c)
    out: dict[str, Any] = {"context": context, "batch_size": s.batch_size, "repeats": s.repeats}
    for name, per_layer in LAYER_FORMS:
        out[name] = ar_step_timing(checks.model(per_layer), batch_size=s.batch_size,
                                   context=context, repeats=s.repeats, seed=s.seed)
        checks.log(f"layers: {name}: step {out[name]['step_seconds'] * 1e3:.2f} ms, compile "
                   f"{out[name]['compile_seconds']:.1f}s")
    out["scan_to_unrolled_step"] = out["scan"]["step_seconds"] / out["unrolled"]["step_seconds"]
    return out


def layers_programs(checks: Checks, s: Settings) -> list[Program]:
    context = _layers_context(s, checks.config)
    programs = []
    for name, per_layer in LAYER_FORMS:
        model = checks.abstract(per_layer)
        cache = _abstract_cache(model, s.batch_size, context + 1)
        programs.append(Program(f"ar_step:{name}@{context}", ar_pass,
                                (model, _tokens(s.batch_size, 1), cache.k, cache.v,
                                 cache.lengths), calls=s.repeats + 1))
    return programs


def layer_form_resident(checks: Checks, s: Settings) -> int:
    """A section that changes the layer form holds the weights plus one kind's copy."""
    model = checks.abstract(per_layer=False)
    return tree_bytes(model) + form_change_bytes(model)


def layers_shrink(s: Settings) -> tuple[Settings, str] | None:
    if s.layers_context < 128:
        return None
    return (dataclasses.replace(s, layers_context=s.layers_context // 2),
            f"layers context {s.layers_context} -> {s.layers_context // 2}")


@dataclasses.dataclass(frozen=True)
class Section:
    """A check: ``run`` measures and returns its result; ``programs`` lists, at some
    settings, the programs it will run (abstract, for the plan); ``resident`` is what it
    holds outside any program (the model being built, a layer-form change); ``shrink``
    gives smaller settings (and what changed) for a section that would not fit, or
    ``None``."""

    run: Callable[[Checks], dict]
    programs: Callable[[Checks, Settings], list[Program]] | None = None
    resident: Callable[[Checks, Settings], int] | None = None
    shrink: Callable[[Settings], tuple[Settings, str] | None] | None = None


INFER_SECTIONS: dict[str, Section] = {
    "model": Section(model_section, resident=model_resident),
    "device": Section(device_section, device_programs, shrink=device_shrink),
    "passes": Section(passes_section, passes_programs, shrink=passes_shrink),
    "trees": Section(trees_section, trees_programs, shrink=trees_shrink),
    "decode_loop": Section(decode_loop_section, decode_loop_programs),
    "layers": Section(layers_section, layers_programs, layer_form_resident, layers_shrink),
}


# ---------------------------------------------------------------------------- plan
def device_memory(args: argparse.Namespace, spec: DeviceSpec | None,
                  kind_given: bool) -> tuple[int | None, str]:
    """The device memory the plan fits sections into, and where the figure comes from."""
    if args.device_memory:
        return parse_bytes(args.device_memory), "--device-memory"
    stats = memory_stats()
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"], "the device allocator's limit (memory_stats bytes_limit)"
    if kind_given and spec is not None:
        return spec.memory, f"datasheet of {spec.name!r} (--device-kind)"
    return None, "unknown (no allocator limit on this backend): pass --device-memory"


def target_device(args: argparse.Namespace) -> tuple[DeviceSpec | None, str]:
    """The device whose tabulated figures estimate the sections' times."""
    if args.device_kind:
        spec = device_spec(args.device_kind)
        if spec is None:
            raise InputError(f"--device-kind {args.device_kind}: no tabulated figures "
                             f"(known: {', '.join(d.name for d in DEVICES)})")
        return spec, "--device-kind"
    kind = jax.devices()[0].device_kind
    spec = device_spec(kind)
    if spec is not None:
        return spec, f"this device ({kind})"
    if args.plan_only:
        return device_spec(DEFAULT_TARGET), (f"default target of --plan-only on a device "
                                             f"without figures ({kind})")
    return None, f"no tabulated figures for this device ({kind})"


def plan_section(checks: Checks, name: str, section: Section, settings: Settings,
                 limit: int | None, spec: DeviceSpec | None) -> tuple[Settings | None, dict]:
    """Size ``section`` at ``settings``, shrinking it until it fits ``limit`` bytes.
    Returns the settings to run it with (``None``: skip it) and its plan entry."""
    shrunk: list[str] = []
    for attempt in range(MAX_SHRINKS + 1):
        programs = section.programs(checks, settings) if section.programs else []
        plan = summarize_plan(plan_programs(programs, spec), limit)
        if section.resident is not None:
            resident = section.resident(checks, settings)
            plan["resident_bytes"] = resident
            plan["peak_bytes"] = max(plan["peak_bytes"], resident)
            plan["fits"] = None if limit is None else plan["peak_bytes"] <= limit
            if not programs and spec is not None:  # the build: every byte written once
                plan["estimated_run_seconds"] = plan["estimated_seconds"] = \
                    resident / spec.bandwidth
        plan["shrunk"] = list(shrunk)
        if plan["fits"] is not False:
            return settings, plan
        smaller = section.shrink(settings) if section.shrink else None
        if smaller is None or attempt == MAX_SHRINKS:
            break
        settings, change = smaller
        shrunk.append(change)
        checks.log(f"{name}: planned peak {format_bytes(plan['peak_bytes'])} over "
                   f"{format_bytes(limit)}: {change}")
    plan["skip_reason"] = (f"planned peak {format_bytes(plan['peak_bytes'])} exceeds "
                           f"{FIT_FRACTION:.0%} of the device memory ({format_bytes(limit)})"
                           + (f" even after: {'; '.join(plan['shrunk'])}" if plan["shrunk"]
                              else " and it cannot be shrunk"))
    return None, plan


def _order(plans: Mapping[str, dict], chosen: Sequence[str]) -> list[str]:
    """Cheapest first by estimated seconds (compile seconds where a run estimate is
    missing); ``model`` first, since the others need it."""
    def cost(name: str) -> tuple:
        plan = plans.get(name) or {}
        seconds = plan.get("estimated_seconds")
        return (name != "model", seconds if seconds is not None
                else plan.get("compile_seconds", 0.0))
    return sorted(chosen, key=cost)


# ---------------------------------------------------------------------------- runner
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _tree_budgets(text: str) -> tuple[int, ...]:
    return tuple(tree_budgets_arg(text))


def _size(text: str) -> str:
    try:
        parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser(prog: str, description: str, sections: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="HF config.json (or a shipped name: "
                                      + ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.json")))
                                      + "): random weights of that shape")
    src.add_argument("--model", help="model folder (convert.from_hf / from_gguf)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter and compute dtype (default: bfloat16 on an accelerator, "
                        "float32 on CPU)")
    p.add_argument("--out", default="device_check.json", help="the JSON report")
    p.add_argument("--sections", default=",".join(sections),
                   help=f"comma-separated subset of {','.join(sections)} (default: all); "
                        "they run cheapest first by their planned time")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and few repeats (CPU, tests)")
    p.add_argument("--plan-only", action="store_true",
                   help="size every section's programs (lowered and compiled with abstract "
                        "inputs) and write the plan; allocate and run nothing")
    p.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                   help="device memory to plan for, e.g. 80GB (default: the device "
                        "allocator's limit; with --device-kind, its datasheet memory)")
    p.add_argument("--device-kind", default=None, metavar="NAME",
                   help="the device whose tabulated peak FLOP/s and bandwidth estimate the "
                        "sections' times, e.g. h100, h200 (default: this device; "
                        f"--plan-only on an untabulated device: {DEFAULT_TARGET})")
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help="sections (and long sections' remaining parts) that would start "
                        "after this many seconds are skipped (default %(default)s; "
                        "a negative value: no limit)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache folder (default: a temporary "
                        "one for the run): the sections reuse the programs the plan "
                        "compiled, and a rerun those of the run before")
    g = p.add_argument_group("shapes (default: the preset's)")
    g.add_argument("--contexts", type=_int_list, help="e.g. 512,2048,8192")
    g.add_argument("--blocks", type=_int_list, help="e.g. 8,16,32")
    g.add_argument("--tree-budgets", type=_tree_budgets,
                   help="drafted nodes per tree (trees section), e.g. 16,32,64,128")
    for name in ("batch-size", "repeats", "copy-mib", "prompts", "prompt-len",
                 "max-new-tokens", "layers-context", "tree-context", "train-batch-size",
                 "train-seq-len", "train-anchors", "train-steps", "seed"):
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--train-remat", action=argparse.BooleanOptionalAction, default=None)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    preset = PRESETS["small" if args.small else "full"]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
               if getattr(args, f.name, None) is not None}
    settings = dataclasses.replace(preset, **changes)
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name != "seed" and isinstance(value, int) and not isinstance(value, bool) \
                and value < 1:
            raise ValueError(f"--{f.name.replace('_', '-')} must be >= 1, got {value}")
    return settings


def format_summary(report: dict) -> str:
    lines = [f"device check: {report['model'].get('source')} -> {report['out']}"
             + (" (plan only)" if report.get("plan_only") else "")]
    for name in report.get("order", []) + [n for n in report["sections"]
                                           if n not in report.get("order", [])]:
        entry = report["sections"][name]
        plan = entry.get("plan") or {}
        extra = entry.get("error") or entry.get("reason") or ""
        seconds = f"{entry['seconds']:7.1f}s" if "seconds" in entry else " " * 8
        planned = ""
        if "peak_bytes" in plan:
            est = plan.get("estimated_seconds")
            planned = (f"peak {format_bytes(plan['peak_bytes']):>9}, est "
                       + (f"{est:6.1f}s" if est is not None else "     ?"))
        lines.append(f"  {name:12} {entry['status']:8} {seconds}  {planned}  {extra}".rstrip())
    lines.append(f"  total {report['elapsed_seconds']:.1f}s")
    return "\n".join(lines)


def run_checks(argv: Sequence[str] | None, sections: Mapping[str, Section], *, prog: str,
               description: str = __doc__) -> int:
    """Parse ``argv``, plan the chosen ``sections`` and run them cheapest first, writing
    the report after the plan and after each. Exit status: 0 when no section failed, 1
    when one did, 2 for bad arguments."""
    args = build_parser(prog, description, list(sections)).parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    add_xla_flags(XLA_FLAGS + (PLAN_ONLY_XLA_FLAGS if args.plan_only else ()))
    return run_command(lambda: _run(args, sections, prog, argv))


def add_xla_flags(flags: Sequence[str]) -> None:
    """Append ``flags`` to ``XLA_FLAGS`` (those not set there already). They take effect
    only if no JAX backend has started in this process yet."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def _run(args: argparse.Namespace, sections: Mapping[str, Section], prog: str,
         argv: Sequence[str] | None) -> int:
    """:func:`_checks` with JAX's persistent compilation cache in ``--compile-cache`` (or,
    on a real run, a temporary folder removed at the end), so that the programs the plan
    compiled are loaded, not compiled again, by the sections."""
    cache_dir = args.compile_cache
    if cache_dir is None and args.plan_only:
        return _checks(args, sections, prog, argv)
    with (tempfile.TemporaryDirectory(prefix="orthrus-device-check-xla-") as temporary,
          restored_compile_cache()):
        enable_compile_cache(cache_dir or temporary, enabled=True)
        return _checks(args, sections, prog, argv)


def _checks(args: argparse.Namespace, sections: Mapping[str, Section], prog: str,
            argv: Sequence[str] | None) -> int:
    t0 = time.perf_counter()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {list(sections)}")
    if args.config:
        args.config = resolve_config(args.config)
    elif not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder")
    settings = settings_from_args(args)
    spec, spec_source = target_device(args)
    limit_memory, memory_source = device_memory(args, spec, bool(args.device_kind))
    limit = None if limit_memory is None else int(FIT_FRACTION * limit_memory)
    budget = args.budget_seconds if args.budget_seconds >= 0 else None
    checks = Checks(args, settings, budget=budget, t0=t0)
    out = Path(args.out)
    d = jax.devices()[0]
    report: dict[str, Any] = {
        "command": " ".join([prog, *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "out": str(out), "preset": "small" if args.small else "full",
        "plan_only": bool(args.plan_only),
        "settings": dataclasses.asdict(settings), "budget_seconds": budget,
        "model": checks.model_info, "complete": False, "elapsed_seconds": 0.0,
        "plan": {"compiler": f"XLA:{d.platform.upper()} ({d.device_kind})",
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "target": None if spec is None else dataclasses.asdict(spec),
                 "target_source": spec_source, "device_memory_bytes": limit_memory,
                 "device_memory_source": memory_source, "fit_fraction": FIT_FRACTION,
                 "limit_bytes": limit, "compile_cache": args.compile_cache},
        "order": [],
        "sections": {name: ({"status": "pending"} if name in chosen else
                            {"status": "skipped", "reason": "not selected (--sections)"})
                     for name in sections}}

    def save() -> None:
        report["elapsed_seconds"] = checks.elapsed()
        report["model"] = checks.model_info
        write_report(out, report)

    save()
    checks.log(f"report: {out}; sections {','.join(chosen)}; budget "
               f"{'none' if budget is None else f'{budget:.0f}s'}; plan for "
               f"{format_bytes(limit_memory) if limit_memory else 'unknown memory'}"
               + (f", times at {spec.name}" if spec else ""))
    try:
        report["model"] = checks.model_info = {**checks.model_info,
                                               **describe_model(checks.abstract())}
    except Exception as e:  # noqa: BLE001 - the sections record the failure
        checks.model_info["error"] = _error(e)
    run_settings: dict[str, Settings | None] = {}
    for name in chosen:
        s0 = time.perf_counter()
        try:
            run_settings[name], plan = plan_section(checks, name, sections[name], settings,
                                                    limit, spec)
        except Exception as e:  # noqa: BLE001 - recorded; the section is not run
            run_settings[name] = None
            report["sections"][name] = {"status": "error", "error": f"plan: {_error(e)}",
                                        "traceback": traceback.format_exc()[-6000:]}
            checks.log(f"{name}: plan failed ({_error(e)})")
            save()
            continue
        plan["plan_seconds"] = time.perf_counter() - s0
        entry: dict[str, Any] = {"status": "planned", "plan": plan}
        if run_settings[name] is None:
            entry.update(status="skipped", reason=plan["skip_reason"])
        elif plan["shrunk"]:
            entry["settings"] = dataclasses.asdict(run_settings[name])
        report["sections"][name] = entry
        est = plan.get("estimated_seconds")
        checks.log(f"{name}: planned peak {format_bytes(plan['peak_bytes'])}"
                   + (f", about {est:.1f}s" if est is not None else "")
                   + (f" ({'; '.join(plan['shrunk'])})" if plan["shrunk"] else "")
                   + ("" if run_settings[name] else f": skipped ({plan['skip_reason']})"))
        save()
    report["order"] = _order({n: report["sections"][n].get("plan") for n in chosen}, chosen)
    if args.plan_only:
        report["complete"] = True
        save()
        print(format_summary(report))
        return int(any(report["sections"][n]["status"] == "error" for n in chosen))
    for name in report["order"]:
        entry = report["sections"][name]
        if run_settings.get(name) is None:
            continue  # skipped by the plan, or its plan failed (recorded)
        if checks.over_budget():
            entry.update(status="skipped", reason=f"time budget of {budget:g}s exceeded "
                                                  f"({checks.elapsed():.1f}s)")
            checks.log(f"{name}: skipped (time budget)")
            save()
            continue
        checks.log(f"{name}: start")
        checks.settings = run_settings[name]
        s0 = checks.section_t0 = time.perf_counter()
        try:
            entry.update(status="ok", result=sections[name].run(checks))
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the rest runs
            entry.update(status="error", error=_error(e),
                         traceback=traceback.format_exc()[-6000:])
        entry["seconds"] = time.perf_counter() - s0
        gc.collect()  # the section's arrays (caches, optimizer state) go before the next
        entry["memory"] = peak_memory()
        entry["device_peak_bytes"] = entry["memory"]["device_peak_bytes"]
        save()
        checks.log(f"{name}: {entry['status']} in {entry['seconds']:.1f}s"
                   + (f" ({entry['error']})" if "error" in entry else ""))
    report["complete"] = True
    save()
    print(format_summary(report))
    return int(any(e["status"] == "error" for e in report["sections"].values()))
