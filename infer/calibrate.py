"""``python -m infer.calibrate``: measure a head's acceptance profile and save it in the
model folder (``acceptance.json``), which ``--block-size auto`` needs.

Decodes the calibration prompts greedily with Orthrus at one block size (default: the
head's trained size) and records how many iterations accepted ``j`` drafts. From that
histogram, the conditional acceptance of each draft position gives the expected tokens
per iteration at every smaller block size. Use prompts like the ones the model will
serve, and never the ones you report speed on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infer.block_size import AcceptanceProfile
from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.engine import Generator, summarize
from infer.prompts import read_prompts_file
from orthrus_jax.cli import positive_int, run_command


def calibrate(gen: Generator, prompts: Sequence[Sequence[int]], *, block_size: int | None = None,
              max_new_tokens: int = 128, batch_size: int = 1,
              source: str = "") -> AcceptanceProfile:
    """The acceptance profile of ``gen``'s head on ``prompts`` (token ids), greedy."""
    results = gen.generate(prompts, max_new_tokens=max_new_tokens, block_size=block_size,
                           batch_size=batch_size)
    k = block_size or gen.config.block_size
    hist = summarize(results)["accepted_hist"][:k]
    return AcceptanceProfile(k, tuple(int(h) for h in hist), source)


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
                               f"{args.max_new_tokens} new tokens")
    alpha = profile.alpha(profile.block_size - 1)
    print(f"block size {profile.block_size}, {sum(profile.accepted_hist)} iterations")
    print("P(draft i accepted | drafts before it were): "
          + " ".join(f"{a:.3f}" for a in alpha))
    print("expected tokens/iteration by block size: " + " ".join(
        f"{k}:{profile.expected_tokens(k):.2f}" for k in range(1, profile.block_size + 1)))
    if not args.dry_run:
        print(f"saved {profile.save(args.model)}")


if __name__ == "__main__":
    sys.exit(main())
