"""CLI plumbing shared by the converters."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_output_args(parser: argparse.ArgumentParser, dtype_default: str | None) -> None:
    parser.add_argument("dst", help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                        help=f"parameter dtype to write (default: {dtype_default or 'as stored'})")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST (only once the new one is complete)")


def run_cli(fn: Callable[[], Path]) -> int:
    """Run a conversion; print its time, or the error in one line with exit status 2."""
    start = time.perf_counter()
    try:
        out = fn()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
