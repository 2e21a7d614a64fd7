"""File helpers shared by the converters: atomic output folders and CLI plumbing."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


@contextlib.contextmanager
def staging_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dst``; on success it becomes ``dst``.

    On any error the temporary folder is removed and an existing ``dst`` is untouched.
    Without ``force`` an existing ``dst`` is an error before any work is done.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
