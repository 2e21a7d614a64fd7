"""The device checks of the inference floor and the runner that writes their JSON report.

The command is ``python -m train.device_check``: it sits on the top floor because it
also times a training step (``infer/`` never imports ``train/``), and it runs the
sections defined here (:data:`INFER_SECTIONS`) plus its own ``train_step``. This module
holds what does not need ``train/``:

- ``device``: backend, device kind, versions, memory statistics, copy bandwidth
  (:func:`infer.passes.copy_bandwidth`);
- ``passes``: for each cache context and block size, the AR step, diffusion pass and
  verify pass (:func:`infer.passes.time_passes`), each against its memory floor
  (:func:`infer.passes.bytes_read` over the copy bandwidth), and the cost of one
  iteration (diffusion + verify) in AR steps;
- ``decode_loop``: the whole compiled decode loop (:class:`infer.engine.Generator`) on
  random token-id prompts, greedy, in modes ``orthrus`` (the model's block size) and
  ``ar``: tokens/s, iterations/s, tokens/iteration and compile seconds per bucket;
- ``layers``: one AR step with the layers as one ``lax.scan`` (the stacked model as
  loaded) against the unrolled per-layer form (:func:`orthrus_jax.model.unstack_layers`).

The runner (:func:`run_checks`) is built for a lent accelerator with a hard time limit:
every section runs in its own ``try``; a failure is recorded in the report (error and
traceback) and the next section runs; the report is rewritten atomically after every
section, so a run killed by a time limit still leaves the sections it finished; progress
lines with elapsed seconds go to stderr; a section that would start after
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

from infer.engine import Generator, summarize
from infer.passes import bytes_read, copy_bandwidth, time_passes
from orthrus_jax.cache import KVCache, init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.cli import run_command
from orthrus_jax.config import DTYPE_NAMES, ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.model import AR_VIEW, DIFFUSION_VIEW, OrthrusLM, unstack_layers

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_BUDGET_SECONDS = 420.0  # fits an 8-minute device slot with room for start-up
# The passes section starts no new context once it has used this share of the budget (each
# context compiles 1 + 2 x blocks programs of the unrolled model), leaving the rest of the
# budget to the sections after it.
PASSES_BUDGET_SHARE = 0.5


@dataclasses.dataclass
class Settings:
    """The shapes and repeats of every section; :data:`PRESETS` holds the two defaults."""

    contexts: tuple[int, ...]  # cached positions per row (passes)
    blocks: tuple[int, ...]  # block sizes K (passes; those above the model's K are dropped)
    batch_size: int  # rows (passes, layers, decode loop)
    repeats: int  # timed calls per pass (median)
    copy_mib: int  # size of the bandwidth probe
    prompts: int  # random prompts of the decode loop
    prompt_len: int  # their longest length (the others are up to 1/8 shorter)
    max_new_tokens: int
    layers_context: int  # cached positions of the scan-vs-unrolled step
    train_batch_size: int  # sequences of the train step
    train_seq_len: int
    train_anchors: int  # anchor blocks per sequence
    train_steps: int  # timed steps after the compiled first one (median)
    train_remat: bool  # recompute each layer in the backward pass
    seed: int = 0


PRESETS = {
    # One H200 and a Qwen3-8B shape in bfloat16: the whole run fits in about 8 minutes.
    "full": Settings(contexts=(512, 2048, 8192), blocks=(8, 16, 32), batch_size=1, repeats=10,
                     copy_mib=1024, prompts=4, prompt_len=100, max_new_tokens=128,
                     layers_context=2048, train_batch_size=1, train_seq_len=2048,
                     train_anchors=64, train_steps=3, train_remat=True),
    # CPU and tests: tiny shapes, few repeats.
    "small": Settings(contexts=(16, 32), blocks=(2, 4), batch_size=1, repeats=2, copy_mib=8,
                      prompts=2, prompt_len=8, max_new_tokens=8, layers_context=32,
                      train_batch_size=1, train_seq_len=32, train_anchors=4, train_steps=2,
                      train_remat=False),
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


def _memory_summary() -> dict | None:
    stats = memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: stats[k] for k in keys if k in stats}


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
    """What the sections share: settings, the clock and budget, the progress log, and the
    model (built on first use, once; a failure to build is remembered and re-raised)."""

    def __init__(self, args: argparse.Namespace, settings: Settings, *,
                 budget: float | None, t0: float | None = None):
        self.args, self.settings, self.budget = args, settings, budget
        self.t0 = time.perf_counter() if t0 is None else t0
        self.model_info: dict = {"source": args.model or str(args.config), "built": False}
        self._model: OrthrusLM | None = None
        self._unstacked: OrthrusLM | None = None
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
    def model(self) -> OrthrusLM:
        """The model as loaded (stacked layers), built on first use."""
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
            self.log(f"model: {self.model_info['params'] / 1e6:,.1f}M parameters in "
                     f"{self.model_info['build_seconds']:.1f}s")
        return self._model

    def _build_model(self) -> OrthrusLM:
        if self.args.model:
            return load_model(self.args.model, param_dtype=self.dtype)
        config = ModelConfig.from_json_file(self.args.config, dtype=self.dtype,
                                            param_dtype=self.dtype)
        if config.mask_token_id is None:  # random weights: any id serves as the mask
            config = config.replace(mask_token_id=0)
        return nnx.jit(lambda: OrthrusLM(config, rngs=nnx.Rngs(self.settings.seed)))()

    @property
    def unstacked(self) -> OrthrusLM:
        """The model in its decoding form (per-layer weights), made once and shared."""
        if self._unstacked is None:
            self._unstacked = unstack_layers(self.model)
        return self._unstacked

    def release_unstacked(self) -> None:
        """Let the decoding form go (its layer weights are a second copy)."""
        self._unstacked = None
        gc.collect()

    def bandwidth(self) -> float:
        """Bytes/s of a device copy (read + write), measured once."""
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth(self.settings.copy_mib)
        return self._bandwidth


def describe_model(model: OrthrusLM) -> dict:
    c = model.config
    leaves = jax.tree.leaves(nnx.state(model))
    diffusion = jax.tree.leaves(nnx.state(model, DiffusionParam))
    return {"model_type": c.model_type, "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "block_size": c.block_size,
            "dtype": c.dtype, "param_dtype": c.param_dtype,
            "params": int(sum(a.size for a in leaves)),
            "diffusion_params": int(sum(a.size for a in diffusion)),
            "param_bytes": int(sum(a.size * a.dtype.itemsize for a in leaves))}


# ---------------------------------------------------------------------------- sections
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


def _floor(seconds: float, floor: float) -> dict:
    return {"seconds": seconds, "floor_seconds": floor, "ratio_to_floor": seconds / floor}


def passes_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.model
    c = model.config
    blocks = sorted({k for k in s.blocks if 2 <= k <= c.block_size}) or [c.block_size]
    bandwidth = checks.bandwidth()
    probe = init_cache(c, s.batch_size, 1)
    out: dict[str, Any] = {"batch_size": s.batch_size, "repeats": s.repeats, "blocks": blocks,
                           "dropped_blocks": sorted(set(s.blocks) - set(blocks)),
                           "copy_bandwidth_gb_s": bandwidth / 1e9, "contexts": {},
                           "skipped_contexts": {}}
    for context in s.contexts:
        if checks.over_budget(PASSES_BUDGET_SHARE):
            out["skipped_contexts"][str(context)] = (
                f"time budget exceeded (this section stops at {PASSES_BUDGET_SHARE:.0%} of it)")
            continue
        if context + max(blocks) > c.max_position_embeddings:
            out["skipped_contexts"][str(context)] = (
                f"context + block exceeds max_position_embeddings {c.max_position_embeddings}")
            continue
        t = time_passes(checks.unstacked, blocks=blocks, batch_size=s.batch_size,
                        context=context, repeats=s.repeats, seed=s.seed)
        ar_floor = bytes_read(model, AR_VIEW, probe, context) / bandwidth
        diff_floor = bytes_read(model, DIFFUSION_VIEW, probe, context) / bandwidth
        entry: dict[str, Any] = {"ar_step": _floor(t["ar_step"], ar_floor), "blocks": {}}
        for k in blocks:
            d, v = t["diffusion_pass"][k], t["verify_pass"][k]
            entry["blocks"][str(k)] = {
                "diffusion_pass": _floor(d, diff_floor), "verify_pass": _floor(v, ar_floor),
                "iteration_seconds": d + v, "iteration_to_ar_step": (d + v) / t["ar_step"]}
        out["contexts"][str(context)] = entry
        top = entry["blocks"][str(max(blocks))]
        checks.log(f"passes: context {context}: AR step {t['ar_step'] * 1e3:.2f} ms "
                   f"({entry['ar_step']['ratio_to_floor']:.2f}x floor); K={max(blocks)} "
                   f"iteration {top['iteration_to_ar_step']:.2f} AR steps")
    return out


def _bucket_name(key: tuple) -> dict:
    mode, blocks, greedy, batch, prompt_len, out_len, max_len, n_eos = key
    return {"mode": mode, "blocks": list(blocks), "greedy": greedy, "batch": batch,
            "prompt_len": prompt_len, "out_len": out_len, "max_len": max_len, "eos_slots": n_eos}


def decode_loop_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.unstacked
    c = model.config
    rng = np.random.default_rng(s.seed)
    lengths = rng.integers(max(1, s.prompt_len - s.prompt_len // 8), s.prompt_len + 1,
                           s.prompts)
    prompts = [rng.integers(0, c.vocab_size, int(n)).tolist() for n in lengths]
    gen = Generator(model)
    kwargs = dict(max_new_tokens=s.max_new_tokens, eos_ids=[], batch_size=s.batch_size)
    out: dict[str, Any] = {"prompts": len(prompts), "prompt_lengths": lengths.tolist(),
                           "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
                           "block_size": c.block_size, "greedy": True, "modes": {},
                           "skipped_modes": {},
                           "note": "random token ids and no EOS: every prompt decodes "
                                   "max_new_tokens; with random weights drafts are rarely "
                                   "accepted, so iterations/s is the figure to read"}
    for mode in ("orthrus", "ar"):
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
        compiled = [{"bucket": _bucket_name(k), "seconds": v}
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


def ar_step_timing(model: OrthrusLM, *, batch_size: int, context: int, repeats: int,
                   seed: int = 0) -> dict:
    """Compile seconds and median step seconds of one AR step (token in, logits out, its
    K/V written in place) over a cache filled to ``context``, for ``model`` in whichever
    layer form it is (stacked: ``lax.scan``; per-layer: unrolled)."""
    c = model.config
    cache = init_cache(c, batch_size, context + 1, per_layer=model.per_layer)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * c.num_hidden_layers))
    held = [jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), kv)
            for kv in (cache.k, cache.v)]
    lengths = jnp.full((batch_size,), context, jnp.int32)

    def step(m, t, k, v):
        hidden, cache = m.ar_hidden(t, KVCache(k, v, lengths))
        return m.logits(hidden), cache.k, cache.v

    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, c.vocab_size, (batch_size, 1)),
                         jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(2, 3)).lower(model, tokens, *held).compile()
    compile_seconds = time.perf_counter() - t0

    def call() -> jax.Array:
        logits, held[0], held[1] = compiled(model, tokens, *held)
        return logits

    return {"compile_seconds": compile_seconds, "step_seconds": median_seconds(call, repeats)}


def layers_section(checks: Checks) -> dict:
    s = checks.settings
    c = checks.model.config
    context = max(1, min(s.layers_context, c.max_position_embeddings - 1))
    out: dict[str, Any] = {"context": context, "batch_size": s.batch_size, "repeats": s.repeats}
    for name, get in (("scan", lambda: checks.model), ("unrolled", lambda: checks.unstacked)):
        out[name] = ar_step_timing(get(), batch_size=s.batch_size, context=context,
                                   repeats=s.repeats, seed=s.seed)
        checks.log(f"layers: {name}: step {out[name]['step_seconds'] * 1e3:.2f} ms, compile "
                   f"{out[name]['compile_seconds']:.1f}s")
    out["scan_to_unrolled_step"] = out["scan"]["step_seconds"] / out["unrolled"]["step_seconds"]
    return out


Section = Callable[[Checks], dict]
INFER_SECTIONS: dict[str, Section] = {"device": device_section, "passes": passes_section,
                                      "decode_loop": decode_loop_section,
                                      "layers": layers_section}


# ---------------------------------------------------------------------------- runner
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


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
                   help=f"comma-separated subset of {','.join(sections)} (default: all)")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and few repeats (CPU, tests)")
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help="sections (and long sections' remaining parts) that would start "
                        "after this many seconds are skipped (default %(default)s; "
                        "a negative value: no limit)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache folder: a rerun (e.g. of the "
                        "sections a time limit cut) reuses the programs compiled before")
    g = p.add_argument_group("shapes (default: the preset's)")
    g.add_argument("--contexts", type=_int_list, help="e.g. 512,2048,8192")
    g.add_argument("--blocks", type=_int_list, help="e.g. 8,16,32")
    for name in ("batch-size", "repeats", "copy-mib", "prompts", "prompt-len",
                 "max-new-tokens", "layers-context", "train-batch-size", "train-seq-len",
                 "train-anchors", "train-steps", "seed"):
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
    lines = [f"device check: {report['model'].get('source')} -> {report['out']}"]
    for name, entry in report["sections"].items():
        status = entry["status"]
        extra = entry.get("error") or entry.get("reason") or ""
        seconds = f"{entry['seconds']:7.1f}s" if "seconds" in entry else " " * 8
        lines.append(f"  {name:12} {status:8} {seconds}  {extra}".rstrip())
    lines.append(f"  total {report['elapsed_seconds']:.1f}s")
    return "\n".join(lines)


def run_checks(argv: Sequence[str] | None, sections: Mapping[str, Section], *, prog: str,
               description: str = __doc__) -> int:
    """Parse ``argv`` and run the chosen ``sections`` (name -> function of :class:`Checks`
    returning the section's result) in order, writing the report after each. Exit status:
    0 when no section failed, 1 when one did, 2 for bad arguments."""
    args = build_parser(prog, description, list(sections)).parse_args(argv)
    return run_command(lambda: _run(args, sections, prog, argv))


def _run(args: argparse.Namespace, sections: Mapping[str, Section], prog: str,
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
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    budget = args.budget_seconds if args.budget_seconds >= 0 else None
    checks = Checks(args, settings, budget=budget, t0=t0)
    out = Path(args.out)
    report: dict[str, Any] = {
        "command": " ".join([prog, *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "out": str(out), "preset": "small" if args.small else "full",
        "settings": dataclasses.asdict(settings), "budget_seconds": budget,
        "model": checks.model_info, "complete": False, "elapsed_seconds": 0.0,
        "sections": {name: ({"status": "pending"} if name in chosen else
                            {"status": "skipped", "reason": "not selected (--sections)"})
                     for name in sections}}

    def save() -> None:
        report["elapsed_seconds"] = checks.elapsed()
        report["model"] = checks.model_info
        write_report(out, report)

    save()
    checks.log(f"report: {out}; sections {','.join(chosen)}; budget "
               f"{'none' if budget is None else f'{budget:.0f}s'}")
    for name, section in sections.items():
        if name not in chosen:
            continue
        if checks.over_budget():
            report["sections"][name] = {
                "status": "skipped",
                "reason": f"time budget of {budget:g}s exceeded ({checks.elapsed():.1f}s)"}
            checks.log(f"{name}: skipped (time budget)")
            save()
            continue
        checks.log(f"{name}: start")
        s0 = checks.section_t0 = time.perf_counter()
        try:
            entry = {"status": "ok", "result": section(checks)}
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the rest runs
            entry = {"status": "error", "error": _error(e),
                     "traceback": traceback.format_exc()[-6000:]}
        entry["seconds"] = time.perf_counter() - s0
        gc.collect()  # the section's arrays (caches, optimizer state) go before the next
        entry["memory"] = _memory_summary()
        report["sections"][name] = entry
        save()
        checks.log(f"{name}: {entry['status']} in {entry['seconds']:.1f}s"
                   + (f" ({entry['error']})" if "error" in entry else ""))
    report["complete"] = True
    save()
    print(format_summary(report))
    return int(any(e["status"] == "error" for e in report["sections"].values()))
