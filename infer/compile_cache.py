"""JAX's persistent compilation cache for the command lines: a second run of a command
loads the programs the first one compiled instead of compiling them again.

Every command line that compiles calls :func:`enable_compile_cache_from` at start-up
(after :func:`add_compile_cache_args` on its parser); the library (``infer.engine``) never
turns the cache on by itself. The folder is, in order of precedence:

- ``--no-compile-cache``: no cache;
- ``--compile-cache DIR``: ``DIR``;
- ``$ORTHRUS_COMPILE_CACHE``: a folder, or ``0`` / ``off`` / ``false`` / ``no`` for no cache;
- else ``xla/`` in the user cache folder beside the default model
  (:func:`infer.default_model.cache_root`: ``$ORTHRUS_CACHE``, else
  ``$XDG_CACHE_HOME/orthrus-jax``, else ``~/.cache/orthrus-jax``).

Every program is cached, also those that compile in well under a second (JAX's default
skips them), and the folder is bounded to :data:`MAX_BYTES` (4 GiB): past it, the least
recently used entries are deleted. A folder that cannot be created or written costs one
warning line on stderr, and the command compiles without a cache; a folder that fails
later (removed, full disk) costs JAX's warnings, never the run. JAX never rewrites an
entry that is there: one cut short (a process killed while writing it) warns and compiles
again at every run, until the folder is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infer.default_model import cache_root

__all__ = ["ENV", "MAX_BYTES", "add_compile_cache_args", "compile_cache_folder",
           "enable_compile_cache", "enable_compile_cache_from", "restored_compile_cache"]

ENV = "ORTHRUS_COMPILE_CACHE"
OFF_WORDS = frozenset({"0", "off", "false", "no"})
MAX_BYTES = 4 << 30
# The JAX settings enable_compile_cache changes (restored_compile_cache puts them back).
SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size",
            "jax_raise_persistent_cache_errors")


def add_compile_cache_args(parser: argparse.ArgumentParser) -> None:
    """``--compile-cache DIR`` and ``--no-compile-cache`` (mutually exclusive)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache folder, so that a rerun loads "
                        "its programs instead of compiling them (default: "
                        f"${ENV}, else xla/ in the user cache folder)")
    g.add_argument("--no-compile-cache", dest="compile_cache_enabled", action="store_false",
                   default=None, help=f"no persistent compilation cache (also {ENV}=off)")


def compile_cache_folder(folder: str | Path | None = None, *,
                         enabled: bool | None = None) -> Path | None:
    """The folder the cache would use, or None for no cache: ``enabled=False`` (the
    ``--no-compile-cache`` flag) gives None; else ``folder`` (``--compile-cache``); else
    ``$ORTHRUS_COMPILE_CACHE`` (None for an off word, unless ``enabled=True``); else
    ``cache_root() / "xla"``. Creates nothing."""
    if enabled is False:
        return None
    if folder is not None and str(folder):
        return Path(folder).expanduser()
    env = os.environ.get(ENV, "").strip()
    if env.lower() in OFF_WORDS:
        return cache_root() / "xla" if enabled else None
    return Path(env).expanduser() if env else cache_root() / "xla"


def enable_compile_cache(folder: str | Path | None = None, *,
                         enabled: bool | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at :func:`compile_cache_folder`'s folder
    (creating it) and return it; None, leaving JAX's settings as they are, when the cache
    is off or the folder cannot be created or written (then after one warning line on
    stderr). Call it before the first compile; it applies to the whole process.

    Sets ``jax_persistent_cache_min_compile_time_secs`` to 0 and
    ``jax_persistent_cache_min_entry_size_bytes`` to -1 (no minimum, never overridden),
    so every program is cached; ``jax_compilation_cache_max_size`` to :data:`MAX_BYTES`
    when the ``filelock`` package is there (JAX needs it to evict; it comes with
    ``transformers``), else no bound; and ``jax_raise_persistent_cache_errors`` to
    False, so that a folder failing later only warns. ``jax_enable_compilation_cache``
    is left as set: a user who switched JAX's cache off keeps it off."""
    try:
        path = compile_cache_folder(folder, enabled=enabled)
    except RuntimeError as e:  # a ``~`` that cannot be expanded (no home folder)
        _warn(f"warning: compilation cache folder unknown ({e}); compiling without it")
        return None
    if path is None:
        return None
    reason = _unwritable(path)
    if reason is not None:
        _warn(f"warning: compilation cache {path} not writable ({reason}); compiling "
              "without it")
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # a cache opened at another folder is dropped
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size",
                      MAX_BYTES if importlib.util.find_spec("filelock") else -1)
    jax.config.update("jax_raise_persistent_cache_errors", False)
    return path


def enable_compile_cache_from(args: argparse.Namespace) -> Path | None:
    """:func:`enable_compile_cache` with the flags of :func:`add_compile_cache_args`."""
    return enable_compile_cache(args.compile_cache, enabled=args.compile_cache_enabled)


@contextlib.contextmanager
def restored_compile_cache() -> Iterator[None]:
    """JAX's settings that :func:`enable_compile_cache` changes are put back on exit, and
    the cache it opened is dropped: a cache for one block of code, not the process."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = {name: getattr(jax.config, name) for name in SETTINGS}
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _unwritable(path: Path) -> str | None:
    """None when ``path`` is (or can be made) a folder a file can be written in, else why
    not (e.g. ``Permission denied``, ``Not a directory``)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
