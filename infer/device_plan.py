"""Sizing the device check's programs before anything is allocated.

A :class:`Program` is one jitted function with the abstract arguments
(``jax.ShapeDtypeStruct`` pytrees) it will be called with. :func:`plan_programs` lowers and
compiles each for the present backend and reads XLA's own numbers: ``memory_analysis()``
(arguments, outputs, the outputs aliased to donated arguments, temporaries) and
``cost_analysis()`` (FLOPs, bytes accessed). A program's planned peak is what the device
holds while it runs::

    peak = inputs + outputs - aliased + temporaries + held

where ``inputs`` are all the arrays passed in (XLA's ``arguments`` leave out those the
program does not read, such as the other view's weights, but they are held all the same)
and ``held`` is what its section keeps beside them (the model's trainable copy beside a
train step). A section fits when its largest peak is at
most :data:`FIT_FRACTION` of the device's memory; its time is estimated from the compile
seconds measured here plus, per call, ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` at
the device's tabulated figures (:data:`DEVICES`).

The numbers are the planning compiler's: XLA:CPU, asked about a bfloat16 model, plans the
float32 copies its dots need (it has no 16-bit dots), so a plan made on a CPU overstates
what a GPU holds; on a GPU the check plans again with the GPU's compiler before it
allocates anything.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from orthrus_jax.memory import tree_bytes

# A section runs only if its planned peak is at most this share of the device's memory:
# the rest is the allocator's and the runtime's.
FIT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of an accelerator: dense bf16 FLOP/s, memory bandwidth (bytes/s)
    and memory (bytes)."""

    name: str
    peak_flops: float
    bandwidth: float
    memory: int


# By a substring of the JAX device kind, first match wins ("gh200" before "h200",
# "h100 pcie" before "h100").
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("gh200", 989e12, 4.0e12, 96 * 10**9),
    DeviceSpec("h200", 989e12, 4.8e12, 141 * 10**9),
    DeviceSpec("h100 pcie", 756e12, 2.0e12, 80 * 10**9),
    DeviceSpec("h100", 989e12, 3.35e12, 80 * 10**9),
    DeviceSpec("a100", 312e12, 2.0e12, 80 * 10**9),
    DeviceSpec("l40s", 362e12, 0.864e12, 48 * 10**9),
    DeviceSpec("l4", 121e12, 0.3e12, 24 * 10**9),
    DeviceSpec("tpu v6 lite", 918e12, 1.64e12, 32 * 10**9),
    DeviceSpec("tpu v6e", 918e12, 1.64e12, 32 * 10**9),
    DeviceSpec("tpu v5 lite", 197e12, 0.819e12, 16 * 10**9),
    DeviceSpec("tpu v5e", 197e12, 0.819e12, 16 * 10**9),
    DeviceSpec("tpu v5p", 459e12, 2.765e12, 95 * 10**9),
    DeviceSpec("tpu v5", 459e12, 2.765e12, 95 * 10**9),
    DeviceSpec("tpu v4", 275e12, 1.2e12, 32 * 10**9),
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The tabulated figures of a JAX device kind (``"NVIDIA H100 80GB HBM3"``), or
    ``None``."""
    kind = device_kind.lower()
    return next((d for d in DEVICES if d.name in kind), None)


@dataclasses.dataclass(frozen=True)
class Program:
    """One program a section runs: the jitted ``fn`` and its abstract ``args``.

    ``calls``: how often the section runs it (warm-up included); ``trips``: loop trips per
    call that XLA's cost analysis counts once (a ``while_loop`` or ``scan`` body);
    ``held_bytes``: what the section holds beside the arguments while it runs; ``flops``:
    an analytic FLOP count per call that replaces XLA's (which counts a loop body once).
    """

    name: str
    fn: Any
    args: tuple
    calls: int = 1
    trips: int = 1
    held_bytes: int = 0
    flops: float | None = None


def plan_programs(programs: Sequence[Program], spec: DeviceSpec | None,
                  workers: int | None = None) -> list[dict]:
    """Lower each program (in order), compile them (``workers`` threads: XLA compiles
    without the GIL) and report per program its memory, cost and time estimate (see the
    module doc). A program that fails to lower or compile raises."""
    lowered = []
    for p in programs:
        t0 = time.perf_counter()
        lowered.append((p.fn.lower(*p.args), time.perf_counter() - t0))

    def compile_one(item: tuple[Any, float]) -> tuple[Any, float]:
        low, lower_seconds = item
        t0 = time.perf_counter()
        return low.compile(), lower_seconds + time.perf_counter() - t0

    with ThreadPoolExecutor(workers or _cpu_count()) as pool:
        compiled = list(pool.map(compile_one, lowered))
    return [describe(p, c, seconds, spec) for p, (c, seconds) in
            zip(programs, compiled, strict=True)]


def describe(program: Program, compiled: Any, compile_seconds: float,
             spec: DeviceSpec | None) -> dict:
    """One program's plan entry from its compiled form (see :func:`plan_programs`)."""
    m = compiled.memory_analysis()
    memory = {"input_bytes": tree_bytes(program.args),
              "argument_bytes": int(m.argument_size_in_bytes),
              "output_bytes": int(m.output_size_in_bytes),
              "alias_bytes": int(m.alias_size_in_bytes),
              "temp_bytes": int(m.temp_size_in_bytes),
              "held_bytes": int(program.held_bytes)}
    peak = (memory["input_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
            + memory["temp_bytes"] + memory["held_bytes"])
    cost = cost_analysis(compiled)
    flops = program.flops if program.flops is not None else \
        (cost.get("flops", 0.0) * program.trips)
    accessed = cost.get("bytes accessed", 0.0) * program.trips
    entry: dict[str, Any] = {
        "name": program.name, **memory, "peak_bytes": peak, "calls": program.calls,
        "loop_trips": program.trips, "flops_per_call": flops,
        "flops_source": "analytic" if program.flops is not None else "xla cost analysis",
        "bytes_accessed_per_call": accessed, "compile_seconds": compile_seconds}
    if spec is not None:
        per_call = max(flops / spec.peak_flops, accessed / spec.bandwidth)
        entry["estimated_run_seconds"] = program.calls * per_call
    return entry


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (``{}`` where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - informative only; not every backend implements it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed")}


def summarize_plan(entries: Sequence[dict], limit: int | None) -> dict:
    """A section's plan from its programs' entries: the largest peak, whether it fits
    ``limit`` bytes (``FIT_FRACTION`` of the device's memory; ``None``: unknown) and its
    estimated seconds (compile plus run; ``None`` where a run estimate is missing)."""
    peak = max((e["peak_bytes"] for e in entries), default=0)
    runs = [e.get("estimated_run_seconds") for e in entries]
    compile_seconds = sum(e["compile_seconds"] for e in entries)
    return {"peak_bytes": peak, "limit_bytes": limit,
            "fits": None if limit is None else peak <= limit,
            "compile_seconds": compile_seconds,
            "estimated_run_seconds": None if None in runs else sum(runs),
            "estimated_seconds": None if None in runs else compile_seconds + sum(runs),
            "programs": list(entries)}


def export_for(program: Program, platforms: Sequence[str]) -> Any:
    """``jax.export`` of a program for ``platforms`` (e.g. ``("cuda",)``), which needs no
    such device here: a lowering that only fails there fails now."""
    return jax.export.export(program.fn, platforms=tuple(platforms))(*program.args)


def _cpu_count() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))

