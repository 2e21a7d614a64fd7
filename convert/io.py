"""CLI plumbing shared by the converters."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from orthrus_jax.cli import non_negative_int, positive_int, run_command
from orthrus_jax.config import DTYPE_NAMES
from orthrus_jax.memory import format_bytes, host_peak_rss


def add_output_args(parser: argparse.ArgumentParser, dtype_default: str | None,
                    as_stored: str = "as stored") -> None:
    """DST, --dtype and --force; ``as_stored`` says what a None ``dtype_default`` keeps."""
    parser.add_argument("dst", help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPE_NAMES,
                        help=f"parameter dtype to write (default: {dtype_default or as_stored})")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST (only once the new one is complete)")


def add_model_args(parser: argparse.ArgumentParser, dtype_default: str | None,
                   as_stored: str = "as stored") -> None:
    """DST, --dtype, --force and the Orthrus fields of a converter into a model folder."""
    add_output_args(parser, dtype_default, as_stored)
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help="diffusion block size K (default: the config's, else 32)")
    parser.add_argument("--mask-token-id", type=non_negative_int, default=None,
                        help="id of the MASK token (default: the config's mask_token_id)")


def model_cli(convert_fn: Callable[..., Path], argv, *, prog: str, doc: str | None,
              src_help: str, dtype_default: str | None = None,
              as_stored: str = "as stored") -> int:
    """The CLI of a converter into a model folder: SRC DST and the shared options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help=src_help)
    add_model_args(parser, dtype_default, as_stored)
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_fn(args.src, args.dst, dtype=args.dtype,
                                      block_size=args.block_size,
                                      mask_token_id=args.mask_token_id, force=args.force))


def run_cli(fn: Callable[[], Path]) -> int:
    """Run a conversion and print what it wrote, its time and its peak memory (a failure: see
    :func:`orthrus_jax.cli.run_command`)."""
    start = time.perf_counter()

    def body() -> None:
        out = fn()
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s; peak memory "
              f"{format_bytes(host_peak_rss())} (host RSS)")

    return run_command(body)
