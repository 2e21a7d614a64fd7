"""``python -m train.device_check``: every device check in one run, into one JSON report.

The run a session makes on a lent accelerator (one H100, a Qwen3-8B shape, bfloat16)
starts with the plan alone, then the run::

    python -m train.device_check --config qwen3-8b --dtype bfloat16 --plan-only --out plan.json
    python -m train.device_check --config qwen3-8b --out report.json

``--config`` takes an HF ``config.json`` (random weights of that shape; ``qwen3-8b`` is
the shipped ``infer/configs/qwen3-8b.json``) or ``--model DIR`` a model folder. On a CPU,
``--small`` shrinks every shape and repeat. ``--sections`` picks a subset of
``model,device,passes,trees,decode_loop,layers,train_step``:

- ``model``, ``device``, ``passes``, ``trees``, ``decode_loop``, ``layers``: the inference
  checks (:mod:`infer.device_check`: the model build, copy bandwidth, the three decode
  passes against their memory floor, draft trees of ``--tree-budgets`` nodes verified in
  one pass and in the decode loop against the AR step, the compiled decode loop in both
  modes, scanned against unrolled layers);
- ``train_step``: one step of :class:`train.step.Trainer` on a synthetic batch on one
  device: compile seconds, median step seconds, the step's FLOPs (counted from the model
  shape; XLA's own count is reported too) and the MFU against the device's dense bf16
  peak.

Every section is planned first (its programs compiled with abstract inputs and sized by
XLA; shrunk or skipped where the device could not hold them) and the sections run
cheapest first by their estimated time; ``--plan-only`` writes the plan and allocates
nothing (:mod:`infer.device_check` says how). The command lives on the training floor
because it times a training step and ``infer/`` never imports ``train/``. Each section
runs in its own ``try``: a failure is recorded in the report (error and traceback) and the
next section runs. The report is rewritten atomically after the plan and after every
section, so a run cut short by a time limit leaves what finished; progress lines with
elapsed seconds go to stderr; sections that would start after ``--budget-seconds``
(default 420) are recorded as skipped. Exit status 0 when no section failed, 1 when one
did, 2 for bad arguments.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from infer.device_check import (
    INFER_SECTIONS,
    Checks,
    Section,
    Settings,
    layer_form_resident,
    run_checks,
)
from infer.device_plan import Program, cost_analysis, device_spec
from orthrus_jax.config import ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.memory import tree_bytes
from orthrus_jax.sharding import make_mesh
from train.step import TrainConfig, Trainer

PEAK_DTYPES = ("bfloat16", "float16")


def peak_flops(device_kind: str, platform: str, dtype: str) -> tuple[float | None, str]:
    """``(peak FLOP/s, where it comes from)``, or ``(None, why there is none)``."""
    if platform == "cpu":
        return None, "no peak FLOP/s is known for a CPU"
    if dtype not in PEAK_DTYPES:
        return None, f"peaks are tabulated for bf16/fp16 matmuls only, not {dtype}"
    spec = device_spec(device_kind)
    if spec is None:
        return None, f"no peak FLOP/s tabulated for device kind {device_kind!r}"
    return spec.peak_flops, f"dense bf16 peak of {spec.name!r} (datasheet)"


def train_step_flops(c: ModelConfig, seq_len: int, anchors: np.ndarray) -> dict:
    """FLOPs of one train step (2 per multiply-add, matmuls and attention only), from the
    model shape and the anchors ``[..., m]`` of every sequence.

    - teacher: the frozen AR pass over every sequence (causal attention: each query reads
      the keys up to its own) and the teacher logits at the drafted positions;
    - diffusion forward: every anchor block of ``K`` tokens through the layers (block
      ``j`` reads ``a_j`` prefix keys plus its own ``K``) and the draft logits;
    - diffusion backward: the gradient through every matmul of the diffusion forward
      (activations), plus the weight gradients of the diffusion attention projections and
      the second half of the attention backward. Recomputation (``remat``) is not counted.
    """
    D, F, V, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    Hq, Hkv, hd, K = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.block_size
    attn = D * (Hq + 2 * Hkv) * hd + Hq * hd * D  # multiply-adds per token per layer
    linear = 2 * n * (attn + 3 * D * F)  # FLOPs per token through all layers
    pair = 4 * Hq * hd  # FLOPs per (query, key) pair: scores and weighted values
    anchors = np.asarray(anchors).reshape(-1, anchors.shape[-1])
    rows, m = anchors.shape
    blocks = rows * m
    pairs = K * float(np.sum(anchors + K))  # (query, key) pairs of all blocks, per layer
    head = 2 * D * V * blocks * (K - 1)  # logits of the drafted positions
    teacher = rows * (seq_len * linear + n * pair * seq_len * (seq_len + 1) / 2) + head
    forward = blocks * K * linear + n * pair * pairs + head
    backward = forward + blocks * K * 2 * n * attn + n * pair * pairs
    return {"teacher_forward": float(teacher), "diffusion_forward": float(forward),
            "diffusion_backward": float(backward),
            "total": float(teacher + forward + backward)}


def synthetic_batch(c: ModelConfig, *, batch_size: int, seq_len: int, anchors: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the train step's layout (one micro-batch): random ``tokens [1, B, L]``,
    ``anchors [1, B, m]`` (distinct, ascending, ``1 <= a <= L - K``) and an all-true
    ``anchor_mask``."""
    K = c.block_size
    if seq_len < K + 1:
        raise ValueError(f"train sequence length {seq_len} is below block size + 1 ({K + 1})")
    if anchors > seq_len - K:
        raise ValueError(f"{anchors} anchors do not fit a sequence of {seq_len} at block "
                         f"size {K} (at most {seq_len - K})")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, c.vocab_size, (1, batch_size, seq_len)).astype(np.int32)
    a = np.stack([np.sort(rng.choice(np.arange(1, seq_len - K + 1), anchors, replace=False))
                  for _ in range(batch_size)])[None].astype(np.int32)
    return {"tokens": tokens, "anchors": a, "anchor_mask": np.ones(a.shape, bool)}


def _trainer(model, s: Settings) -> Trainer:
    # One device: the figures are per chip.
    return Trainer(model, TrainConfig(total_steps=1000, remat=s.train_remat), make_mesh("data=1"))


def train_step_section(checks: Checks) -> dict:
    s = checks.settings
    model = checks.model(per_layer=False)  # training's form: stacked layers, one scan
    c = model.config
    host = synthetic_batch(c, batch_size=s.train_batch_size, seq_len=s.train_seq_len,
                           anchors=s.train_anchors, seed=s.seed)
    trainer = _trainer(model, s)
    batch = {k: jax.device_put(v, trainer.batch_sharding(v.ndim)) for k, v in host.items()}
    state = trainer.init_state()
    t0 = time.perf_counter()
    # The trainer's jitted step, compiled ahead of time so compile and run time separate.
    compiled = trainer._step.lower(state, trainer.backbone, batch).compile()
    compile_seconds = time.perf_counter() - t0
    checks.log(f"train_step: compiled in {compile_seconds:.1f}s")

    def step(state):
        state, metrics = compiled(state, trainer.backbone, batch)
        jax.block_until_ready(metrics)
        return state, metrics

    t0 = time.perf_counter()
    state, metrics = step(state)
    first_seconds = time.perf_counter() - t0
    times = []
    for _ in range(s.train_steps):
        if checks.over_budget() and times:
            break
        t0 = time.perf_counter()
        state, metrics = step(state)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    flops = train_step_flops(c, s.train_seq_len, host["anchors"])
    d = jax.devices()[0]
    peak, peak_source = peak_flops(d.device_kind, d.platform, c.dtype)
    tokens = s.train_batch_size * s.train_seq_len
    out: dict[str, Any] = {
        "batch_size": s.train_batch_size, "seq_len": s.train_seq_len,
        "anchors_per_seq": s.train_anchors, "block_size": c.block_size,
        "remat": s.train_remat, "dtype": c.dtype, "devices": 1,
        "compile_seconds": compile_seconds, "first_step_seconds": first_seconds,
        "step_seconds": seconds, "timed_steps": len(times),
        "tokens_per_second": tokens / seconds,
        "drafted_positions_per_second": metrics["positions"] / seconds,
        "loss": metrics["loss"], "positions": metrics["positions"],
        "flops_per_step": flops["total"], "flops_breakdown": flops,
        "flops_method": "analytic: matmul and attention FLOPs from the model shape and the "
                        "anchors (train.device_check.train_step_flops), remat excluded",
        "xla_cost_analysis_flops": cost_analysis(compiled).get("flops"),
        "xla_note": "XLA's cost analysis counts a loop body once: the layers run as one "
                    "lax.scan, so it undercounts by about the number of layers",
        "achieved_flops_per_second": flops["total"] / seconds,
        "peak_flops_per_second": peak, "peak_source": peak_source,
        "mfu": flops["total"] / seconds / peak if peak else None}
    if peak is None:
        out["mfu_reason"] = peak_source
    checks.log(f"train_step: {seconds:.3f}s per step, "
               f"{out['achieved_flops_per_second'] / 1e12:.2f} TFLOP/s, MFU "
               + (f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a"))
    return out


def train_step_programs(checks: Checks, s: Settings) -> list[Program]:
    """The train step as the section compiles it, on the abstract stacked model; the
    model's own (compute-dtype) diffusion tensors are held beside it, outside the step's
    arguments. Its time: the analytic FLOPs (XLA counts the scanned layers once; its
    bytes, so counted, only matter for a step that is not compute-bound)."""
    model = checks.abstract(per_layer=False)
    c = model.config
    host = synthetic_batch(c, batch_size=s.train_batch_size, seq_len=s.train_seq_len,
                           anchors=s.train_anchors, seed=s.seed)
    trainer = _trainer(model, s)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding(v.ndim))
             for k, v in host.items()}
    return [Program("train_step", trainer._step,
                    (trainer.abstract_state(), trainer.backbone, batch),
                    calls=2 + s.train_steps,
                    held_bytes=tree_bytes(nnx.state(model, DiffusionParam)),
                    flops=train_step_flops(c, s.train_seq_len, host["anchors"])["total"])]


def train_step_shrink(s: Settings) -> tuple[Settings, str] | None:
    """Recompute layers first, then halve the sequence (its anchors with it) down to 64."""
    if not s.train_remat:
        return dataclasses.replace(s, train_remat=True), "remat on"
    if s.train_batch_size > 1:
        return (dataclasses.replace(s, train_batch_size=s.train_batch_size // 2),
                f"train batch {s.train_batch_size} -> {s.train_batch_size // 2}")
    if s.train_seq_len < 128:
        return None
    seq = s.train_seq_len // 2
    anchors = max(1, s.train_anchors // 2)
    return (dataclasses.replace(s, train_seq_len=seq, train_anchors=anchors),
            f"train sequence {s.train_seq_len} -> {seq} tokens, {anchors} anchors")


SECTIONS: dict[str, Section] = {
    **INFER_SECTIONS,
    "train_step": Section(train_step_section, train_step_programs, layer_form_resident,
                          train_step_shrink)}


def main(argv: Sequence[str] | None = None) -> int:
    return run_checks(argv, SECTIONS, prog="python -m train.device_check", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
