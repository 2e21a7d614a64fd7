"""Decoding options as the command lines take them: the shared flags of ``infer.generate``,
``infer.bench`` and ``infer.serve`` (sampling, stopping, dtypes, block size, tree budget),
their parsers, and how a flag left out resolves against the model (its acceptance
profile, its ``generation_config.json``). Bad values are refused by argparse, naming the flag."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from infer.buckets import MAX_TREE_BUDGET
from infer.generation_config import Sampling
from infer.prompts import check_template_kwargs
from infer.sampling import SamplingParams
from orthrus_jax.cli import non_negative_int, positive_int
from orthrus_jax.config import DTYPE_NAMES

if TYPE_CHECKING:
    from infer.engine import Generator


def add_progress_args(p: argparse.ArgumentParser) -> None:
    """``--prefill-progress`` / ``--no-prefill-progress``."""
    p.add_argument("--prefill-progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress line on stderr while a long prompt (4 prefill chunks or "
                        "more) prefills (default: when stderr is a terminal)")


def prefill_progress(args: argparse.Namespace, stream: TextIO | None = None
                     ) -> Callable[[int, int], None] | None:
    """What ``--prefill-progress`` asks for: a function that rewrites one line of
    ``stream`` (default stderr) with the prompt tokens prefilled so far, or None."""
    stream = sys.stderr if stream is None else stream
    on = args.prefill_progress
    if on is None:
        on = stream.isatty()
    if not on:
        return None

    def show(done: int, total: int) -> None:
        print(f"\rprefill: {done:,} / {total:,} prompt tokens", end="\n" if done >= total
              else "", file=stream, flush=True)
    return show


def template_kwargs_arg(text: str) -> dict:
    """``--chat-template-kwargs``: a JSON object of chat-template variables."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not JSON ({e})") from None
    try:
        return check_template_kwargs(value, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """``--chat`` and ``--chat-template-kwargs``, shared by ``generate`` and ``bench``."""
    p.add_argument("--chat", nargs="?", choices=("auto", "on", "off"), const="on",
                   default="auto",
                   help="wrap text prompts in the chat template: auto = when the tokenizer has "
                        "one (default), --chat = on; messages always use it")
    p.add_argument("--chat-template-kwargs", type=template_kwargs_arg, default=None,
                   metavar="JSON",
                   help="variables for the chat template, e.g. '{\"enable_thinking\": false}' "
                        "(Qwen3 without its thinking block)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """Sampling, stopping, dtype and cache options shared by ``generate`` and ``bench``."""
    add_sampling_args(p)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--eos-id", type=int, action="append", default=None,
                   help="end-of-sequence id (repeatable; replaces the model's: the ids of "
                        "config.json and generation_config.json; a negative id: none)")
    add_dtype_args(p)
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="KV cache capacity (default: the model's max_position_embeddings)")
    p.add_argument("--block-size", type=parse_block_size, default=None,
                   help="Orthrus block size: 'auto' (the fastest on this machine, from measured "
                        "pass costs and the head's acceptance profile; the default when the "
                        "model folder has acceptance.json) or 1..K (K: the head's trained size, "
                        "the default otherwise)")
    p.add_argument("--tree-budget", type=parse_tree_budget, default=None,
                   help="verify a draft tree of N drafted nodes per iteration instead of the "
                        "chain (the verify pass has N + 1 rows; depth at most the block size "
                        f"less one): 1..{MAX_TREE_BUDGET}, 0 = no drafted node (plain AR "
                        "steps), 'none' = chains, or 'auto' (the chain or the budget with the "
                        "most expected tokens/s, chosen with the block size); default: auto "
                        "where the block size is auto and the model's acceptance profile "
                        "measured trees, else the chain")
    p.add_argument("--no-adapt", action="store_true",
                   help="with --block-size auto: keep the chosen size for the whole answer "
                        "instead of switching to AR steps and back by the acceptance seen")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--greedy``: left out (None), the
    model's defaults apply (:func:`sampling_arg`)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--temperature", type=float, default=None,
                       help="0 = greedy. With none of --temperature, --top-k, --top-p and "
                            "--greedy, the model's sampling defaults apply (its "
                            "generation_config.json with do_sample true; greedy otherwise); "
                            "with any of them, those given, the others off")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    group.add_argument("--greedy", action="store_true",
                       help="greedy decoding, whatever generation_config.json says (the "
                            "same as --temperature 0)")


def sampling_flags(args: argparse.Namespace) -> Sampling | None:
    """The sampling the flags ask for, checked (a bad value: ``ValueError`` naming it), or
    None when no sampling flag is given. Flags left out are off (temperature 0 = greedy,
    top-k 0, top-p 1), whatever the model's defaults."""
    if args.greedy:
        return Sampling(source="--greedy")
    if args.temperature is None and args.top_k is None and args.top_p is None:
        return None
    sampling = Sampling(temperature=0.0 if args.temperature is None else args.temperature,
                        top_k=0 if args.top_k is None else args.top_k,
                        top_p=1.0 if args.top_p is None else args.top_p, source="flags")
    SamplingParams.make(**sampling.kwargs())
    return sampling


def sampling_arg(args: argparse.Namespace, gen: Generator) -> Sampling:
    """The sampling ``generate`` and ``bench`` decode with: the flags' (:func:`sampling_flags`),
    else the model folder's defaults (``generation_config.json``; greedy without one)."""
    return sampling_flags(args) or gen.generation.sampling


# --projections: the values of Generator's weights_out_in
PROJECTION_FORMS = {"auto": None, "out-in": True, "in-out": False}


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--compute-dtype`` and ``--projections`` (shared by ``generate``,
    ``bench`` and ``serve``)."""
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter dtype: the weights are held in it, and computed in it "
                        "unless --compute-dtype says otherwise (default: as stored; a model "
                        "stored in bfloat16 or float16 decodes in float32 on CPU, where XLA "
                        "has no 16-bit matmuls)")
    p.add_argument("--compute-dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype of activations, the KV cache and matmul accumulation (default: "
                        "the parameter dtype). --dtype bfloat16 --compute-dtype float32 holds "
                        "the weights in bfloat16 and computes everything else in float32, so "
                        "a K-token verify rounds as a 1-token step does and greedy Orthrus "
                        "output equals AR output; float32 or the parameter dtype only")
    add_projections_arg(p)


def add_projections_arg(p: argparse.ArgumentParser) -> None:
    """``--projections`` (``generate``, ``bench``, ``serve``, ``passes``)."""
    p.add_argument("--projections", choices=PROJECTION_FORMS, default="auto",
                   help="how the decoder holds each layer's projection weights: out-in "
                        "([out, in], applied as W @ x^T to passes of 2-8 rows: 15-20%% less "
                        "time in their matrix products at 4-8 rows on CPU) or in-out (the "
                        "training form); auto (default): out-in where the weights live on CPU")


def projections_arg(args: argparse.Namespace) -> bool | None:
    """``--projections`` as :class:`~infer.engine.Generator`'s ``weights_out_in``."""
    return PROJECTION_FORMS[args.projections]


def parse_block_size(text: str) -> int | str:
    """``--block-size``: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto' or an integer >= 1")
    return k


def parse_tree_budget(text: str) -> int | str:
    """``--tree-budget``: ``auto``, ``none`` (chains) or an integer in
    ``[0, MAX_TREE_BUDGET]``."""
    if text in ("auto", "none"):
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_TREE_BUDGET:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 'auto', 'none' (chains) or an integer from 0 (plain AR "
            f"steps) to {MAX_TREE_BUDGET}")
    return n


def block_size_arg(args: argparse.Namespace, gen: Generator) -> int | str | None:
    """The block size to decode with: the flag, else 'auto' where the model has a profile."""
    if args.block_size is not None:
        return args.block_size
    return "auto" if gen.profile is not None else None


def resolve_tree_budget(flag: int | str | None, block_size: int | str | None,
                        gen: Generator) -> int | str | None:
    """``--tree-budget`` as the engine takes it: ``none`` is chains (None), and without the
    flag ``auto`` where the block size is ``auto`` and the model's profile measured trees
    (chains otherwise)."""
    if flag == "none":
        return None
    if flag is not None:
        return flag
    trees = gen.profile is not None and bool(gen.profile.tree_budgets)
    return "auto" if trees and block_size == "auto" else None


def tree_budget_arg(args: argparse.Namespace, gen: Generator) -> int | str | None:
    """The tree budget ``generate`` and ``bench`` decode with (:func:`resolve_tree_budget`
    of the flag and :func:`block_size_arg`)."""
    return resolve_tree_budget(args.tree_budget, block_size_arg(args, gen), gen)


def tree_budgets_arg(text: str, allow_none: bool = False) -> list[int]:
    """A list of tree budgets (``--tree-budgets``): integers in ``[1, MAX_TREE_BUDGET]``
    separated by commas, or with ``allow_none`` the word ``none`` (no trees)."""
    if allow_none and text == "none":
        return []
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = [0]
    if not all(1 <= n <= MAX_TREE_BUDGET for n in values):
        quote_none = "'none' or " if allow_none else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {quote_none}tree budgets from 1 to {MAX_TREE_BUDGET}, "
            "comma-separated")
    return values
