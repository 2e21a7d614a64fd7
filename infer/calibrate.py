"""``python -m infer.calibrate``: measure a head's acceptance profile and save it in the
model folder (``acceptance.json``), which ``--block-size auto`` needs.

Decodes the calibration prompts greedily with Orthrus at one block size (default: the
head's trained size) and records how many iterations accepted ``j`` drafts. From that
histogram, the conditional acceptance of each draft position gives the expected tokens
per iteration at every smaller block size. From those greedy outputs it fits how the
head's draft trees score their candidates (:mod:`infer.tree_calibration`: per depth and
draft probability, how often a candidate was the model's token; ``--no-tree-scoring``
keeps the plain product of the draft's probabilities), then decodes the prompts again
verifying draft trees, built with that scoring, of each of ``--tree-budgets`` nodes at that
block size (``--tree-budget auto`` chooses among those). Use prompts like the ones the
model will serve, and never the ones you report speed on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from functools import partial

import numpy as np

from infer import tree_calibration
from infer.block_size import TREE_BUDGETS, AcceptanceProfile
from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.engine import Generator, summarize
from infer.options import tree_budgets_arg
from infer.prompts import read_prompts_file
from orthrus_jax.cli import positive_int, run_command


def calibrate(gen: Generator, prompts: Sequence[Sequence[int]], *, block_size: int | None = None,
              max_new_tokens: int = 128, batch_size: int = 1, source: str = "",
              tree_budgets: Sequence[int] = (), tree_scoring: bool = True
              ) -> AcceptanceProfile:
    """The acceptance profile of ``gen``'s head on ``prompts`` (token ids), greedy: the
    chain's, then (with ``tree_budgets``) the fitted tree scoring (``tree_scoring``; else
    trees score by log-probability, :mod:`infer.tree_calibration`) and the trees' of each
    budget, built with it. ``gen.profile`` becomes the profile measured."""
    k = block_size or gen.config.block_size

    def run(tree_budget: int | None) -> list:
        return gen.generate(prompts, max_new_tokens=max_new_tokens, block_size=k,
                            batch_size=batch_size, tree_budget=tree_budget)

    def hist(results: list) -> tuple[int, ...]:
        return tuple(int(h) for h in summarize(results)["accepted_hist"][:k])

    chain = run(None)
    table: tuple[tuple[float, ...], ...] = ()
    if tree_budgets and tree_scoring and k >= 2:
        fitted = tree_calibration.measure(
            gen.model, [(p, r.token_ids) for p, r in zip(prompts, chain, strict=True)], k)
        table = tuple(tuple(float(x) for x in row) for row in fitted)
    gen.profile = AcceptanceProfile(k, hist(chain), source, (), table)  # the trees use its table
    trees = tuple((int(n), hist(run(int(n)))) for n in sorted(set(tree_budgets)))
    gen.profile = dataclasses.replace(gen.profile, trees=trees)
    return gen.profile


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder; acceptance.json goes there")
    p.add_argument("--prompts-file", required=True,
                   help="JSONL of {prompt|messages|prompt_ids} (text prompts use the chat "
                        "template when the tokenizer has one)")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts only")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="block size to measure at (default: the head's trained size)")
    p.add_argument("--tree-budgets", type=partial(tree_budgets_arg, allow_none=True),
                   default=list(TREE_BUDGETS),
                   help="draft-tree budgets to measure, comma-separated, or 'none' (default: "
                        f"{','.join(map(str, TREE_BUDGETS))})")
    p.add_argument("--no-tree-scoring", dest="tree_scoring", action="store_false",
                   help="build the trees by the draft's log-probabilities instead of a "
                        "scoring fitted to the head on these prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--dry-run", action="store_true", help="print the profile, save nothing")
    add_compile_cache_args(p)
    args = p.parse_args(argv)
    enable_compile_cache_from(args)
    return run_command(lambda: _calibrate(args))


def _calibrate(args: argparse.Namespace) -> None:
    items = read_prompts_file(args.prompts_file)[:args.limit]  # checked before loading
    gen = Generator.load(args.model)
    chat = bool(getattr(gen.tokenizer, "chat_template", None))
    ids = [gen.encode_item(item, chat) for item in items]
    profile = calibrate(gen, ids, block_size=args.block_size,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        source=f"{len(ids)} prompts of {args.prompts_file}, greedy, "
                               f"{args.max_new_tokens} new tokens",
                        tree_budgets=args.tree_budgets, tree_scoring=args.tree_scoring)
    alpha = profile.alpha(profile.block_size - 1)
    print(f"block size {profile.block_size}, {sum(profile.accepted_hist)} iterations")
    print("P(draft i accepted | drafts before it were): "
          + " ".join(f"{a:.3f}" for a in alpha))
    print("expected tokens/iteration by block size: " + " ".join(
        f"{k}:{profile.expected_tokens(k):.2f}" for k in range(1, profile.block_size + 1)))
    if profile.tree_calibration:
        print("tree scoring fitted: hit rate of the most likely bin by depth: " + " ".join(
            f"{d + 1}:{np.exp(row[-1]):.2f}" for d, row in enumerate(profile.tree_calibration)))
    for n, _ in profile.trees:
        print(f"trees of {n} nodes: {profile.tree_expected_tokens(n):.2f} tokens/iteration")
    if not args.dry_run:
        print(f"saved {profile.save(args.model)}")


if __name__ == "__main__":
    sys.exit(main())
