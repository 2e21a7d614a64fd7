"""``python -m infer.generate``: generation with the Orthrus decoder (or the AR baseline).

The CLI around :class:`infer.engine.Generator`; from Python use
:func:`infer.engine.generate` or the ``Generator`` itself.

An answer ends at an end-of-sequence id of the model (those of its config.json and its
generation_config.json; --eos-id replaces them). Without a sampling flag (--temperature,
--top-k, --top-p, --greedy) decoding follows the model's generation_config.json: its
temperature, top-k and top-p with do_sample true, else greedy (greedy without the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from infer.buckets import DEFAULT_MAX_BATCH, MODES
from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.default_model import default_model_dir
from infer.engine import Generator, check_dtypes, summarize
from infer.options import (
    add_chat_args,
    add_decoding_args,
    add_progress_args,
    block_size_arg,
    prefill_progress,
    projections_arg,
    sampling_arg,
    sampling_flags,
    tree_budget_arg,
)
from infer.prompts import read_prompts_file
from orthrus_jax.cli import positive_int, run_command
from orthrus_jax.memory import format_bytes, format_peak
from orthrus_jax.sharding import make_mesh


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder (convert.from_hf / from_gguf); default: SmolLM2-135M-"
                        "Instruct with the shipped head, fetched and converted on first use "
                        "(python -m infer.default_model)")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids (repeatable)")
    p.add_argument("--prompts-file", help="JSONL of {prompt|messages|prompt_ids}")
    add_chat_args(p)
    add_progress_args(p)
    p.add_argument("--mode", choices=MODES, default="orthrus")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    add_decoding_args(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per compiled batch (default: the prompts rounded up to 2^n, "
                        f"at most {DEFAULT_MAX_BATCH})")
    p.add_argument("--mesh", default=None,
                   help="shard the model over devices, e.g. tensor=2 (axes data, fsdp, tensor)")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is committed (one prompt at a time)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--compare-ar", action="store_true",
                   help="also decode the prompts with plain AR steps and print Orthrus's speed "
                        "against it (and whether the tokens match)")
    add_compile_cache_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)
    return run_command(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    sampling_flags(args)  # a bad value fails before loading
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.dtype is not None:  # a bad pair fails before loading
        check_dtypes(args.dtype, args.compute_dtype)
    items = read_prompts_file(args.prompts_file) if args.prompts_file else []  # checked first
    if args.model is None:
        args.model = default_model_dir()
    gen = Generator.load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         mesh=mesh, max_len=args.max_len,
                         weights_out_in=projections_arg(args))
    gen.prefill_progress = prefill_progress(args)
    chat = args.chat == "on" or (
        args.chat == "auto" and bool(getattr(gen.tokenizer, "chat_template", None)))
    labels: list[Any] = []
    ids: list[list[int]] = []
    for text in args.prompt:
        labels.append(text)
        ids.append(gen.encode(text, chat, args.chat_template_kwargs))
    for text in args.prompt_ids:
        labels.append(_parse_ids(text))
        ids.append(labels[-1])
    if items:
        for item in items:
            labels.append(next(item[k] for k in ("prompt_ids", "messages", "prompt")
                               if k in item))
            ids.append(gen.encode_item(item, chat, args.chat_template_kwargs))
    if not ids:
        raise ValueError("no prompts: give --prompt, --prompt-ids or --prompts-file")

    stream = None
    batch_size = args.batch_size
    if args.stream:
        batch_size = 1
        shown: dict[int, list[int]] = {}
        printed: dict[int, int] = {}

        def stream(i: int, new: list[int]) -> None:
            if shown and i not in shown:  # the next prompt: a blank line between answers
                sys.stdout.write("\n\n")
            shown.setdefault(i, []).extend(new)
            text = gen.decode_text(shown[i])
            if text is None:
                text = " ".join(map(str, shown[i]))
            sys.stdout.write(text[printed.get(i, 0):])
            sys.stdout.flush()
            printed[i] = len(text)

    block_size = block_size_arg(args, gen) if args.mode == "orthrus" else None
    sampling = sampling_arg(args, gen)  # the flags', else generation_config.json's
    options = dict(max_new_tokens=args.max_new_tokens, **sampling.kwargs(), seed=args.seed,
                   eos_ids=args.eos_id, batch_size=batch_size)
    t0 = time.perf_counter()
    tree_budget = tree_budget_arg(args, gen) if args.mode == "orthrus" else None
    results = gen.generate(ids, mode=args.mode, stream=stream, labels=labels,
                           block_size=block_size, tree_budget=tree_budget,
                           adaptive=not args.no_adapt, **options)
    wall = time.perf_counter() - t0
    if args.stream:
        print()
    for r in results:
        if args.json:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        elif not args.stream:
            print(r.text if r.text is not None else " ".join(map(str, r.token_ids)))
            print()
    if not args.json:
        t = summarize(results)
        compile_s = sum(gen.compile_seconds.values())
        print(f"[{args.mode}] {t['tokens']} tokens, {t['iterations']} iterations, "
              f"{t['tokens_per_iteration']:.2f} tokens/iteration, "
              f"{t['tokens_per_second']:.1f} tokens/s (decode {t['seconds']:.2f} s, "
              f"compile {compile_s:.1f} s, total {wall:.1f} s); "
              f"sampling: {sampling.describe()}", file=sys.stderr)
        for plan in {p.describe() for p in gen.plans.values()}:
            print(f"[{args.mode}] {plan}", file=sys.stderr)
        if t["loop_speedup_vs_cost_table"] is not None:
            print(f"[{args.mode}] auto: measured {t['loop_speedup_vs_cost_table']:.2f}x AR in "
                  "the decode loop (against the AR step of the cost table)", file=sys.stderr)
    memory = gen.memory_report()
    if args.json:
        print(json.dumps({"memory": memory, "dtype": gen.config.param_dtype,
                          "compute_dtype": gen.config.dtype,
                          "sampling": dataclasses.asdict(sampling)}), file=sys.stderr)
    else:
        print(f"[memory] weights {format_bytes(memory['weight_bytes'])} "
              f"({gen.config.param_dtype}), KV cache {format_bytes(memory['cache_bytes'])} "
              f"({gen.config.dtype}, the compute dtype); "
              f"{format_peak(memory)}", file=sys.stderr)
    if args.compare_ar and args.mode == "orthrus":
        ar = gen.generate(ids, mode="ar", **options)
        o_tps, a_tps = summarize(results)["tokens_per_second"], summarize(ar)["tokens_per_second"]
        same = sum(r.token_ids == a.token_ids for r, a in zip(results, ar, strict=True))
        print(f"[ar] {a_tps:.1f} tokens/s; orthrus {o_tps / a_tps:.2f}x AR; "
              f"{same} of {len(ar)} outputs identical", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
