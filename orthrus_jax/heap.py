"""Freed heap memory handed back to the operating system.

Weights are read, cast and transposed one piece at a time so that memory holds the
weights plus one piece; glibc keeps freed pieces of a few MB in its heap, where they
would count in the process's resident memory until reused. :func:`release_memory`
returns them after each piece.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc (e.g. musl)
    _LIBC = None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); nothing elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
