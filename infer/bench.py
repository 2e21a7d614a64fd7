"""``python -m infer.bench``: Orthrus against plain AR decoding of the same model.

Runs the prompts of a JSONL file (one ``{"prompt": text}``, ``{"messages": [...]}`` or
``{"prompt_ids": [...]}`` per line) through both decode modes with one
:class:`infer.engine.Generator`, and reports per mode: tokens per iteration, tokens/s,
time to first token and compile time; for Orthrus the acceptance-length histogram (how
many iterations accepted j = 0, 1, ..., K-1 drafts, i.e. would commit j + 1 tokens before
any cut at EOS or the token budget) and the mean accepted length j; the speedup (Orthrus
tokens/s over AR tokens/s); and, when greedy, how many prompts' outputs differ between the
modes and where they first diverge.

Timing. Each mode first warms up: one batch per prompt-length bucket runs once, which
compiles every program the timed rounds use (compile time is reported separately and
excluded from everything else). Then ``--repeats`` timed rounds run over all prompts,
the two modes taking turns batch by batch (which goes first alternates), so that a slow
spell of a shared machine falls on both; per mode the best round (the least decode time)
is reported. Decode time of a round is the sum over its batches of the wall
time from the start of prefill to the last token; tokens/s = generated tokens / decode time
(the first token, sampled from the prefill logits, counts). Time to first token is the mean
over batches of prefill + first token. Tokens per iteration counts the tokens of the decode
loop only (the first token excluded) per loop iteration: 1 for AR, ``j + 1`` for Orthrus.

Prompts. ``messages`` always go through the tokenizer's chat template; text ``prompt``
lines do when ``--chat`` is ``auto`` (the default) and the tokenizer has a chat template,
or always with ``--chat on``, never with ``--chat off``. ``prompt_ids`` are used as given
(the only kind a model folder without a tokenizer accepts).

Long context. ``--context 1024,4096`` measures both modes once per context: each prompt is
preceded by filler (the prompts' own texts, plain, repeated) to exactly that many tokens,
so the question still comes last. The report adds a table per context: tokens/s with
prefill and of decoding alone (the loop after the first token), both speedups, tokens per
iteration, time to first token (the prefill), and whether greedy outputs differ;
``--chart PATH`` draws tokens/s against context as a PNG. The rest of the report is the
last context's.

Sampling and stopping as in ``infer.generate``: without a sampling flag, the model's
``generation_config.json`` defaults (greedy without one); the end-of-sequence ids of its
``config.json`` and ``generation_config.json`` unless ``--eos-id`` replaces them.

Errors (missing or malformed files, bad prompts) print one ``error: ...`` line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax

from infer.buckets import MODES
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
from orthrus_jax.cli import InputError, positive_int, run_command
from orthrus_jax.memory import format_bytes, format_peak


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder (convert.from_hf / from_gguf); default: SmolLM2-135M-"
                        "Instruct with the shipped head (python -m infer.default_model)")
    p.add_argument("--prompts-file", required=True,
                   help="JSONL of {prompt|messages|prompt_ids}, one per line")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts only")
    add_chat_args(p)
    add_progress_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="timed rounds after the warm-up; the best round is reported")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="rows per compiled batch (default 1: per-prompt latency)")
    p.add_argument("--context", type=_contexts, default=None,
                   help="long-context bench: each prompt is preceded by filler text (the "
                        "other prompts, plain, repeated) up to this many tokens; several, "
                        "comma-separated (1024,4096), each measured in turn")
    p.add_argument("--chart", default=None,
                   help="with --context: write a PNG of tokens/s against context, both "
                        "modes, to this path")
    add_decoding_args(p)  # the same --seed in every round and mode
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_compile_cache_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)

    def body() -> None:
        if args.chart is not None and args.context is None:
            raise InputError("--chart needs --context (the chart is tokens/s against "
                             "context)")
        report = run_bench(args)
        if args.chart is not None:
            write_context_chart(report, args.chart)
        print(json.dumps(report) if args.json else format_report(report))

    return run_command(body)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_bench(args: argparse.Namespace) -> dict:
    sampling_flags(args)  # a bad value fails before loading
    if args.model is None:
        args.model = str(default_model_dir())
    if args.dtype is not None:  # a bad pair fails before loading
        check_dtypes(args.dtype, args.compute_dtype)
    items = read_prompts_file(args.prompts_file)[:args.limit]  # never empty: --limit >= 1
    gen = Generator.load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         max_len=args.max_len,
                         weights_out_in=projections_arg(args))
    gen.prefill_progress = prefill_progress(args)
    tokenizer = gen.tokenizer
    use_chat = args.chat == "on" or (
        args.chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    ids = [gen.encode_item(item, use_chat, args.chat_template_kwargs) for item in items]
    sampling = sampling_arg(args, gen)  # the flags', else generation_config.json's
    kwargs = dict(max_new_tokens=args.max_new_tokens, **sampling.kwargs(), seed=args.seed,
                  eos_ids=args.eos_id, batch_size=args.batch_size)

    block_size = block_size_arg(args, gen)
    tree_budget = args.tree_budget = tree_budget_arg(args, gen)
    per_mode = {"orthrus": dict(block_size=block_size, tree_budget=tree_budget,
                                adaptive=not args.no_adapt), "ar": {}}
    if args.context is None:
        report = _measure(gen, ids, args, kwargs, per_mode, sampling.greedy)
    else:
        filler = _filler(gen, items, args.context, args.max_new_tokens)
        runs = {n: _measure(gen, [with_context(p, filler, n) for p in ids], args, kwargs,
                            per_mode, sampling.greedy) for n in args.context}
        report = runs[args.context[-1]] | {"contexts": [
            _context_row(n, r) for n, r in runs.items()]}
    c = gen.config
    plans = [dataclasses.asdict(p) | {"describe": p.describe()} for p in gen.plans.values()]
    return report | {
        "model": str(args.model),
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "block_size": c.block_size,  # the head's trained size
        "decode_block_size": block_size,  # as asked: None (the trained size), K' or "auto"
        "tree_budget": args.tree_budget,  # as asked: None (chains), N or "auto"
        "block_plans": plans,  # what "auto" chose, per batch shape, with its prediction
        "dtype": c.param_dtype,  # the weights'
        "compute_dtype": c.dtype,  # activations, KV cache, accumulation
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "sampling_source": sampling.source,  # flags, generation_config.json or default
        "seed": args.seed,
        "repeats": args.repeats,
        "timing": "best of repeats (least decode time) after a warm-up per mode (one "
                  "batch per prompt-length bucket); compile excluded",
        "predicted_speedup": [p["predicted_speedup"] for p in plans],
        "memory": gen.memory_report(),
        "load_average": list(os.getloadavg()),
    }


def _contexts(text: str) -> list[int]:
    """``--context``: prompt lengths in tokens, comma-separated, increasing."""
    values = [positive_int(part) for part in text.split(",")]
    if values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r}: contexts must increase")
    return values


def _filler(gen: Generator, items: Sequence[dict], contexts: Sequence[int],
            max_new_tokens: int) -> list[int]:
    """Token ids of the filler that precedes each prompt at ``--context``: the prompts'
    texts (or ids), plain, repeated to the longest context. A context that leaves no room
    for ``max_new_tokens`` in the model's ``max_len`` is refused."""
    room = gen.max_len - max_new_tokens
    if contexts[-1] > room:
        raise InputError(f"--context {contexts[-1]}: with --max-new-tokens {max_new_tokens} "
                         f"the model's cache of {gen.max_len} positions holds contexts of at "
                         f"most {room} tokens (--max-len sets the cache)")
    piece = [t for item in items for t in gen.encode_item(item, False)]
    if not piece:
        raise InputError("--context: the prompts have no tokens to make a filler of")
    return (piece * (contexts[-1] // len(piece) + 1))[:contexts[-1]]


def with_context(prompt: Sequence[int], filler: Sequence[int], context: int) -> list[int]:
    """``prompt`` preceded by the start of ``filler``: ``context`` tokens in all (the prompt
    alone when it is that long already)."""
    return list(filler[:max(0, context - len(prompt))]) + list(prompt)


def _context_row(context: int, r: dict) -> dict:
    """One context's line of the long-context table."""
    o, a = r["modes"]["orthrus"], r["modes"]["ar"]
    decode = {f"{m}_decode_tokens_per_second":  # the loop's tokens (the first is prefill's)
              (r["modes"][m]["tokens"] - r["num_prompts"]) / r["modes"][m]["loop_seconds"]
              if r["modes"][m]["loop_seconds"] > 0 else None for m in MODES}
    return {"context": context, "speedup": r["speedup"], "loop_speedup": r["loop_speedup"],
            "outputs_differ": r["outputs_differ"], **decode,
            **{f"{m}_{k}": r["modes"][m][k] for m in MODES
               for k in ("tokens_per_second", "tokens_per_iteration", "time_to_first_token",
                         "seconds_per_token")},
            "orthrus_iterations": o["iterations"], "ar_iterations": a["iterations"]}


def write_context_chart(report: dict, path: str) -> None:
    """A PNG of tokens/s against context for both modes (and Orthrus's speedup)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["contexts"]
    x = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mode, color in (("orthrus", "tab:blue"), ("ar", "tab:orange")):
        ax.plot(x, [r[f"{mode}_decode_tokens_per_second"] for r in rows], "o-", color=color,
                label=f"{mode}, decoding")
        ax.plot(x, [r[f"{mode}_tokens_per_second"] for r in rows], "s:", color=color,
                alpha=0.6, label=f"{mode}, prefill included")
    for r in rows:
        if r["loop_speedup"] is not None:
            ax.annotate(f"{r['loop_speedup']:.2f}x",
                        (r["context"], r["orthrus_decode_tokens_per_second"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{report['model_type']}, {report['layers']} layers, batch "
                 f"{report['batch_size']}, {report['max_new_tokens']} new tokens "
                 "(labels: decoding speedup)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measure(gen: Generator, ids: list[list[int]], args: argparse.Namespace, kwargs: dict,
             per_mode: dict, greedy: bool) -> dict:
    """Both modes over ``ids``: warm-up, the timed rounds, and their summary."""
    # Warm-up: one batch per prompt-length bucket compiles every program the rounds need.
    warm = {mode: gen.warm_up(ids, mode=mode, **kwargs, **per_mode[mode]) for mode in MODES}
    compile_s = {m: sum(s for k, s in gen.compile_seconds.items() if k.mode == m) for m in MODES}

    rounds: dict[str, list[dict]] = {m: [] for m in MODES}
    outputs: dict[str, list[list[list[int]]]] = {m: [] for m in MODES}
    per_prompt: dict[str, list] = {}
    size = args.batch_size
    for round_ in range(args.repeats):
        # The modes take turns batch by batch (who goes first alternates), so a slow spell
        # of a shared machine falls on both alike.
        results: dict[str, list] = {m: [] for m in MODES}
        for lo in range(0, len(ids), size):
            turn = MODES if (round_ + lo // size) % 2 == 0 else MODES[::-1]
            for mode in turn:
                results[mode] += gen.generate(ids[lo:lo + size], mode=mode, first_row=lo,
                                              **kwargs, **per_mode[mode])
        for mode in MODES:
            rounds[mode].append(summarize(results[mode]))
            outputs[mode].append([r.token_ids for r in results[mode]])
            per_prompt[mode] = results[mode]
    # greedy decoding is deterministic: the timed rounds must repeat the warm-up's output
    modes = {}
    for mode in MODES:
        best = dict(min(rounds[mode], key=lambda s: s["seconds"]))
        best["round_seconds"] = [round(s["seconds"], 4) for s in rounds[mode]]
        best["compile_seconds"] = compile_s[mode]
        if mode != "orthrus":
            del best["accepted_hist"], best["block_hist"]
        best["seconds_per_token"] = best["seconds"] / best["tokens"] if best["tokens"] else None
        modes[mode] = best
    hist = modes["orthrus"]["accepted_hist"]  # [K]: iterations that accepted j drafts, at j
    total = sum(hist)
    modes["orthrus"]["accepted_share"] = [h / total if total else 0.0 for h in hist]
    modes["orthrus"]["mean_accepted_length"] = (
        sum(j * h for j, h in enumerate(hist)) / total if total else 0.0)

    prompts = []
    for i, p in enumerate(ids):
        o, a = per_prompt["orthrus"][i], per_prompt["ar"][i]
        prompts.append({"index": i, "prompt_tokens": len(p),
                        "orthrus_tokens": len(o.token_ids), "ar_tokens": len(a.token_ids),
                        "tokens_per_iteration": round(o.tokens_per_iteration, 4),
                        "first_divergence": first_divergence(o.token_ids, a.token_ids)})
    differ = [p for p in prompts if p["first_divergence"] is not None]
    ar_tps = modes["ar"]["tokens_per_second"]
    return {
        "num_prompts": len(ids),
        "modes": modes,
        "speedup": modes["orthrus"]["tokens_per_second"] / ar_tps if ar_tps else None,
        # the decode loops alone (prefill excluded): what "auto" predicts
        "loop_speedup": modes["ar"]["loop_seconds"] / modes["orthrus"]["loop_seconds"]
        if modes["orthrus"]["loop_seconds"] > 0 else None,
        "greedy": greedy,
        # with sampling the two modes draw different random numbers: no comparison
        "outputs_differ": len(differ) if greedy else None,
        "divergence": ([{"index": p["index"], "first_divergence": p["first_divergence"]}
                        for p in differ] if greedy else None),
        # every timed round, and the warm-up's prompts, gave the same tokens
        "deterministic": (all(out == outputs[m][0] for m in MODES for out in outputs[m])
                          and all(r.token_ids == outputs[m][0][i]
                                  for m in MODES for i, r in warm[m].items())
                          if greedy else None),
        "prompts": prompts,
    }


def format_report(r: dict) -> str:
    o, a = r["modes"]["orthrus"], r["modes"]["ar"]
    kind = "greedy" if r["greedy"] else \
        f"sampling T={r['temperature']} top_k={r['top_k']} top_p={r['top_p']}"
    if "sampling_source" in r:
        kind += f" ({r['sampling_source']})"
    lines = [
        f"model {r['model']}: {r['layers']} layers, block size {r['block_size']}, "
        f"{r['dtype']} weights, {r.get('compute_dtype', r['dtype'])} compute, "
        f"{r['backend']} ({r['device']})",
        f"{r['num_prompts']} prompts, max_new_tokens {r['max_new_tokens']}, batch size "
        f"{r['batch_size']}, {kind}",
        f"timing: best of {r['repeats']} round(s) after a warm-up per mode, compile excluded",
        "",
        f"{'':24}{'orthrus':>12}{'ar':>12}",
    ]

    def row(label, key, fmt):
        lines.append(f"{label:24}{format(o[key], fmt):>12}{format(a[key], fmt):>12}")

    row("generated tokens", "tokens", "d")
    row("iterations", "iterations", "d")
    row("tokens / iteration", "tokens_per_iteration", ".3f")
    row("tokens / s", "tokens_per_second", ".2f")
    row("decode seconds", "seconds", ".3f")
    row("time to first token (s)", "time_to_first_token", ".4f")
    row("compile seconds", "compile_seconds", ".1f")
    speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.3f}x"
    lines += ["", f"speedup (orthrus tokens/s / ar tokens/s): {speedup}"]
    if r.get("loop_speedup") is not None:
        predicted = ", ".join(f"{x:.3f}x" for x in r["predicted_speedup"] if x is not None)
        lines.append(f"decode loops alone (prefill excluded): {r['loop_speedup']:.3f}x"
                     + (f"; predicted by auto {predicted}" if predicted else ""))
    for p in r["block_plans"]:
        lines.append(f"block size {p['describe']}")
    if r["decode_block_size"] not in (None, r["block_size"]) or r["block_plans"]:
        lines.append("orthrus iterations by block size: " + ", ".join(
            f"{k + 1}: {n}" for k, n in enumerate(o["block_hist"]) if n))
    verify = ", ".join(map(str, o.get("verify_rows", [])))
    tree = r.get("tree_budget")
    lines += ["",
              f"orthrus verify pass: {verify} rows"
              + (f" (tree budget {tree})" if tree is not None else " (chains)"),
              f"orthrus acceptance: mean accepted drafts (accepted depth) per iteration "
              f"{o['mean_accepted_length']:.3f}",
              "iterations by tokens per iteration (accepted drafts + 1, before the cut at "
              "EOS / budget):"]
    hist = o["accepted_hist"]
    last = max((i for i, h in enumerate(hist) if h), default=0)
    for i in range(last + 1):
        lines.append(f"  {i + 1:3d}: {hist[i]:7d}  {100 * o['accepted_share'][i]:5.1f}%")
    if r["greedy"]:
        lines.append("")
        lines.append(f"greedy outputs differing: {r['outputs_differ']} of {r['num_prompts']}")
        for d in r["divergence"]:
            lines.append(f"  prompt {d['index']}: first divergence at token "
                         f"{d['first_divergence']}")
        if not r["deterministic"]:
            lines.append("warning: greedy outputs changed between the warm-up and timed rounds")
    m = r["memory"]
    lines.append(f"memory: weights {format_bytes(m['weight_bytes'])} ({r['dtype']}), KV cache "
                 f"(largest) {format_bytes(m['cache_bytes'])} "
                 f"({r.get('compute_dtype', r['dtype'])}); {format_peak(m)}")
    if "contexts" in r:
        lines += ["", "long context (each prompt preceded by filler text to the context; the "
                  "table above is the last context):",
                  "tokens/s with prefill, then of decoding alone (o: orthrus, a: ar)",
                  f"{'context':>8}{'o tok/s':>9}{'a tok/s':>9}{'speedup':>9}{'o dec/s':>9}"
                  f"{'a dec/s':>9}{'speedup':>9}"
                  f"{'tok/iter':>10}{'TTFT o s':>10}{'TTFT a s':>10}{'differ':>8}"]
        for c in r["contexts"]:
            differ = "-" if c["outputs_differ"] is None else str(c["outputs_differ"])
            loop = "-" if c["loop_speedup"] is None else f"{c['loop_speedup']:.3f}x"
            lines.append(f"{c['context']:>8}{c['orthrus_tokens_per_second']:>9.2f}"
                         f"{c['ar_tokens_per_second']:>9.2f}{c['speedup']:>8.3f}x"
                         f"{c['orthrus_decode_tokens_per_second'] or 0:>9.2f}"
                         f"{c['ar_decode_tokens_per_second'] or 0:>9.2f}{loop:>9}"
                         f"{c['orthrus_tokens_per_iteration']:>10.3f}"
                         f"{c['orthrus_time_to_first_token']:>10.3f}"
                         f"{c['ar_time_to_first_token']:>10.3f}{differ:>8}")
    lines.append(f"load average: {' '.join(f'{x:.2f}' for x in r['load_average'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
