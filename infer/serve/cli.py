"""``python -m infer.serve``: the command line of the server (flags, model loading,
uvicorn)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.prefix_cache import DEFAULT_BLOCK_TOKENS
from infer.serve.app import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_PREFIX_CACHE_MB,
    WARM_RUNS,
    build_server,
)
from orthrus_jax.cli import (
    CommandError,
    InputError,
    non_negative_int,
    positive_int,
    run_command,
)


def build_parser() -> argparse.ArgumentParser:
    import infer.serve
    from infer.buckets import MODES
    from infer.options import add_projections_arg, parse_block_size, parse_tree_budget
    from orthrus_jax.config import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="python -m infer.serve", description=infer.serve.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder; default: SmolLM2-135M-Instruct with the shipped head")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--slots", type=positive_int, default=16,
                   help="requests decoding at once (rows of the compiled loop; a step "
                        "computes only up to the highest busy slot, so an idle slot costs "
                        "its cache memory, not time)")
    p.add_argument("--max-len", type=positive_int, default=2048,
                   help="KV cache length per slot: prompt + output tokens")
    p.add_argument("--prefill-rows", type=positive_int, default=1,
                   help="queued prompts prefilled together by one program (default 1: on a "
                        "CPU a prefill is compute-bound and batching it only delays first "
                        "tokens; more pays on a GPU)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB,
                   help="MiB of K/V kept for prompt prefixes (system prompts, a chat's earlier "
                        "turns) that later requests reuse instead of prefilling; 0: off "
                        f"(default {DEFAULT_PREFIX_CACHE_MB:g})")
    p.add_argument("--prefix-block-tokens", type=positive_int, default=None,
                   help="tokens per prefix-cache block (a prefix is reused in whole blocks; "
                        f"must divide --max-len; default {DEFAULT_BLOCK_TOKENS}, or the largest "
                        "divisor of --max-len below it)")
    p.add_argument("--prefill-chunk-tokens", type=non_negative_int, default=None,
                   help="a prompt with more uncached tokens than this is prefilled this many "
                        "per iteration, between the running requests' decode steps, so their "
                        "streams keep flowing (needs the prefix cache, which holds the chunks; "
                        f"a multiple of --prefix-block-tokens; 0: off; default "
                        f"{DEFAULT_PREFILL_CHUNK}, in whole blocks)")
    p.add_argument("--mode", choices=MODES, default="orthrus")
    p.add_argument("--block-size", type=parse_block_size, default=None,
                   help="Orthrus block, fixed for all requests: 'auto' (resolved once at "
                        "start-up) or 1..K (default: auto with an acceptance profile, else K)")
    p.add_argument("--tree-budget", type=parse_tree_budget, default=None,
                   help="verify draft trees of N drafted nodes instead of chains (every slot "
                        "holds N + 1 verify rows): 1..N, 0 = plain AR steps, 'none' = chains, "
                        "or 'auto' "
                        "(resolved once at start-up with the block size); default: auto where "
                        "the block size is auto and the acceptance profile measured trees, "
                        "else chains")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter dtype (default: as stored; bfloat16 and float16 decode in "
                        "float32 on CPU)")
    p.add_argument("--compute-dtype", choices=DTYPE_NAMES, default=None,
                   help="activations, KV cache and accumulation (default: the parameter "
                        "dtype); --dtype bfloat16 --compute-dtype float32: bfloat16 weights, "
                        "float32 compute, greedy Orthrus output equal to AR's")
    add_projections_arg(p)
    p.add_argument("--mesh", default=None, help="shard the model, e.g. tensor=2")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--queue-size", type=positive_int, default=64,
                   help="requests waiting for a slot before 429")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds a request may take, queue included (504 past it)")
    p.add_argument("--max-body", type=positive_int, default=1 << 20,
                   help="largest request body in bytes (413 past it)")
    p.add_argument("--warm-runs", choices=WARM_RUNS, default="background",
                   help="run each program once on a throwaway prompt, so that no request "
                        "waits for its first run (on a CPU about 0.5-1 s per program, paid by "
                        "the first request of each prompt length and load): 'background' "
                        "(default) while the server has nothing else to do, 'before' it "
                        "answers (ready later), or 'off'; /health shows how many are left")
    add_compile_cache_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = enable_compile_cache_from(args)
    return run_command(lambda: _main(args, folder))


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def check_serve_extra() -> None:
    """Refuse, before loading anything, when the ``serve`` extra is not installed."""
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(f"python -m infer.serve needs the serve extra (missing: "
                           f"{', '.join(missing)}): pip install 'orthrus-jax[serve]'")


def _main(args: argparse.Namespace, compile_cache: Path | None) -> int:
    check_serve_extra()
    import uvicorn

    from infer.default_model import default_model_dir
    from infer.engine import Generator, check_dtypes
    from infer.executables import EXECUTABLES_FOLDER, ExecutableStore
    from infer.options import projections_arg, resolve_tree_budget
    from orthrus_jax.sharding import make_mesh

    if not args.deadline > 0:
        raise InputError(f"--deadline {args.deadline} must be > 0")
    if args.dtype is not None:  # a bad pair fails before loading
        check_dtypes(args.dtype, args.compute_dtype)
    mesh = make_mesh(args.mesh) if args.mesh else None
    model_dir = args.model or default_model_dir()
    gen = Generator.load(model_dir, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         mesh=mesh, max_len=args.max_len,
                         weights_out_in=projections_arg(args))
    block = args.block_size if args.block_size is not None else (
        "auto" if gen.profile is not None and args.mode == "orthrus" else None)
    print(f"warming up: {args.slots} slots, cache {args.max_len}, mode {args.mode}, "
          f"{gen.describe_dtypes()}",
          file=sys.stderr, flush=True)
    if args.mode == "ar" and args.tree_budget not in (None, "none"):
        raise InputError("--tree-budget applies to --mode orthrus only")
    server = build_server(gen, slots=args.slots, mode=args.mode, block_size=block,
                          tree_budget=resolve_tree_budget(args.tree_budget, block, gen),
                          model_name=args.served_model_name or Path(model_dir).name,
                          api_key=args.api_key, queue_size=args.queue_size,
                          deadline=args.deadline, max_body=args.max_body,
                          prefill_rows=args.prefill_rows,
                          prefix_cache_mb=args.prefix_cache_mb,
                          prefix_block_tokens=args.prefix_block_tokens,
                          prefill_chunk_tokens=args.prefill_chunk_tokens,
                          executables=None if compile_cache is None else
                          ExecutableStore(compile_cache / EXECUTABLES_FOLDER),
                          warm_runs=args.warm_runs)
    engine = server.api.engine
    warm = f", each run once in {engine.exercise_seconds:.1f} s" if args.warm_runs == \
        "before" else ""
    print(f"programs compiled or loaded in {engine.compile_seconds:.1f} s{warm} ("
          f"{engine.describe_plans()}); serving '{server.api.model_name}' on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT
            server.scheduler.drain()
            super().handle_exit(sig, frame)

    # every request ends by its deadline: the graceful shutdown waits that long, plus slack
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(math.ceil(args.deadline)) + 5)
    try:
        Uvicorn(config).run()  # then uvicorn re-raises the signal (exit status -SIGTERM)
    finally:
        server.close()  # fail whatever is left (503)
    return 0
