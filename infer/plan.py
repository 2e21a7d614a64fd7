"""``python -m infer.plan``: how much memory one device needs to decode (or train) a model,
computed from its config alone: nothing is allocated, no device is needed.

For a model folder or an HF ``config.json`` (``--config``), prints per device the
weights, the KV cache and the activation estimate (training: also the float32 trainable
tensors, their gradients and AdamW's moments) and their total, on a mesh given as
``--mesh data=1,tensor=8`` (the logical-axis rules of ``orthrus_jax.sharding``), and with
``--device-memory 32GB`` whether that fits. Sizes are decimal (1 GB = 10^9 bytes); see
docs/memory.md for the formulas.

Decoding: ``--batch`` rows of up to ``--context`` tokens each (prompt + output); the cache
holds ``context + K`` positions rounded up to a power of two as the engine does, at most
``--max-len``, in ``--compute-dtype`` (as ``infer.generate``'s: default ``--dtype``).
Training (``--train``): ``--batch`` sequences of ``--seq-len`` tokens with
``--anchors-per-seq`` blocks of ``--block-size``, per-layer remat unless ``--no-remat``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from infer.engine import check_dtypes
from orthrus_jax.cli import InputError, positive_int, run_command
from orthrus_jax.config import DTYPE_NAMES, ModelConfig
from orthrus_jax.memory import (
    DEFAULT_CHUNK_SIZE,
    MemoryPlan,
    mesh_shape,
    parse_bytes,
    plan_decode,
    plan_train,
)


def _mesh(text: str) -> dict[str, int]:
    """argparse type of ``--mesh``: ``data=1,fsdp=1,tensor=8`` (sizes >= 1)."""
    try:
        return mesh_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    """argparse type of ``--device-memory``: ``32GB``, ``80GiB``, ``24e9``."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="model folder or HF config.json (no weights are read)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter and compute dtype (default: the config's)")
    p.add_argument("--compute-dtype", choices=DTYPE_NAMES, default=None,
                   help="decode: dtype of the KV cache and activations, as infer.generate's "
                        "(default: --dtype; float32 with bfloat16 weights is the fidelity "
                        "option)")
    p.add_argument("--batch", type=positive_int, default=1, help="rows (decode) or "
                   "sequences per step (train)")
    p.add_argument("--context", type=positive_int, default=2048,
                   help="decode: tokens per row, prompt + output")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="decode: with it, --context is the prompt and the cache is exactly "
                   "the engine's for that prompt and output")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="decode: the engine's cache cap (default: max_position_embeddings)")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                   help="decode: prefill chunk")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="block size K (default: the config's, or 32)")
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="e.g. data=1,tensor=8 (default: one device)")
    p.add_argument("--train", action="store_true", help="plan a train step instead")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="train: tokens per "
                   "sequence")
    p.add_argument("--anchors-per-seq", type=positive_int, default=256)
    p.add_argument("--loss-chunk", type=positive_int, default=16,
                   help="train: anchor blocks per logits chunk")
    p.add_argument("--no-remat", action="store_true",
                   help="train: plan without per-layer recomputation (train.main's default; "
                   "the plan assumes train.main --remat otherwise)")
    p.add_argument("--device-memory", type=_size, default=None,
                   help="memory of one device, e.g. 32GB or 80GiB: say whether the plan fits")
    p.add_argument("--json", action="store_true")
    return p


def make_plan(args: argparse.Namespace) -> tuple[ModelConfig, MemoryPlan]:
    """The config named by ``--config`` and its plan for the flags."""
    config = ModelConfig.from_json_file(args.config)
    dtype = args.dtype or config.param_dtype
    if args.train:
        if args.compute_dtype is not None:
            raise InputError("--compute-dtype plans decoding; a train step computes in --dtype")
        block = args.block_size or config.block_size
        if args.seq_len < block + 1:
            raise ValueError(f"--seq-len {args.seq_len} is below block size + 1 ({block + 1})")
        return config, plan_train(config, dtype=dtype, batch=args.batch, seq_len=args.seq_len,
                                  anchors_per_seq=args.anchors_per_seq, block_size=block,
                                  mesh=args.mesh, remat=not args.no_remat,
                                  loss_chunk=args.loss_chunk)
    return config, plan_decode(config, dtype=dtype, batch=args.batch, context=args.context,
                               block_size=args.block_size, mesh=args.mesh,
                               max_new_tokens=args.max_new_tokens, max_len=args.max_len,
                               chunk_size=args.chunk_size,
                               compute_dtype=check_dtypes(dtype, args.compute_dtype))


def _headline(config: ModelConfig, plan: MemoryPlan) -> str:
    d = plan.details
    shape = (f"{config.model_type}, {config.num_hidden_layers} layers, hidden "
             f"{config.hidden_size}, vocab {config.vocab_size}, {d['dtype']}")
    if d.get("compute_dtype", d["dtype"]) != d["dtype"]:
        shape += f" weights, {d['compute_dtype']} compute"
    if plan.kind == "train":
        return (f"{shape}; train batch {d['batch']} x {d['seq_len']} tokens, "
                f"{d['anchors_per_seq']} anchors of block {d['block_size']}, "
                f"remat {'on' if d['remat'] else 'off'}")
    return (f"{shape}; decode batch {d['batch']}, context {d['context']} (cache "
            f"{d['cache_len']} positions), block {d['block_size']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, plan = make_plan(args)
        if args.json:
            out = plan.to_json() | {"config": str(args.config)}
            if args.device_memory is not None:
                out |= {"device_memory": args.device_memory,
                        "fits": plan.fits(args.device_memory)}
            print(json.dumps(out))
        else:
            print(_headline(config, plan))
            print(plan.format_table(args.device_memory))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
