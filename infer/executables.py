"""Compiled programs kept on disk, so that a second start neither traces nor compiles.

JAX's persistent compilation cache (:mod:`infer.compile_cache`) saves XLA's work, but
every start still traces and lowers each program, and for the server's dozen programs
over an unrolled 30-layer model that is most of a warm start. An :class:`ExecutableStore`
keeps the compiled executables themselves (``jax.experimental.serialize_executable``)
and loads them back in a fraction of a second each.

An executable is named by a SHA-256 digest of everything that could change it:

- the source of the ``orthrus_jax`` and ``infer`` packages (any edit of either names
  new programs), and the versions of JAX, jaxlib, Flax and NumPy;
- the backend, device kind and device count, and ``XLA_FLAGS`` (``LIBTPU_INIT_ARGS``);
- the caller's description of the program (its name and the settings it closes over:
  for the server's engine, the model config, mode, plans, cache length, buckets, ...);
- every argument's shape, dtype and sharding, and the arguments' tree structure.

A file that cannot be read back (cut short, from another build of JAX) is deleted with
one warning line, and the program is compiled again. The folder is bounded to
:data:`MAX_BYTES`: past it, the least recently used files are deleted. Loading an
executable runs code from it: the folder is trusted exactly as JAX's own compilation
cache is (both are the user's own cache folders).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.sharding import NamedSharding

MAX_BYTES = 2 << 30
# The store's folder inside the compilation cache's (JAX evicts only its own files there).
EXECUTABLES_FOLDER = "executables"
SUFFIX = ".executable"
PACKAGES = ("orthrus_jax", "infer")
# Environment variables that change what XLA compiles (as they key JAX's own cache).
FLAG_VARIABLES = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


@cache
def code_digest() -> str:
    """SHA-256 over the source files of :data:`PACKAGES` (paths and contents, the CPU
    kernel's C++ too) and the versions of the libraries that build and run the
    programs."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        for path in sorted([*(root / package).rglob("*.py"), *(root / package).rglob("*.cc")]):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    for name in ("jax", "jaxlib", "flax", "numpy"):
        try:
            h.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{name}=?".encode())
    return h.hexdigest()


@contextlib.contextmanager
def fresh_compiles() -> Iterator[None]:
    """JAX's persistent compilation cache off inside (every program compiles afresh), as
    it was after. An executable that JAX loaded from that cache does not survive
    ``serialize_executable`` whole on the CPU (running the copy fails with ``Function
    ... not found``), so a program bound for the store is compiled, not loaded. Switches
    a process-wide setting: call it where nothing else compiles meanwhile."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _devices(args: tuple) -> list:
    """The devices a program over ``args`` runs on, in the order it was compiled for: a
    mesh's (the arguments' shardings share one), else the one device of the arguments."""
    shardings = [leaf.sharding for leaf in jax.tree.leaves(args) if hasattr(leaf, "sharding")]
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return list(sharding.mesh.devices.flat)
    return sorted({d for s in shardings for d in s.device_set}, key=lambda d: d.id) or \
        jax.devices()[:1]


def _describe_args(args: tuple) -> list:
    leaves, tree = jax.tree.flatten(args)
    out: list[Any] = [str(tree)]
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        out.append([str(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf))),
                    repr(sharding)])
    return out


class ExecutableStore:
    """Compiled programs in ``folder`` (created on the first save), named by
    :meth:`digest`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.loaded = 0  # programs loaded from the folder
        self.saved = 0  # programs written to it

    def digest(self, program: dict, args: tuple) -> str:
        """The name of the program described by ``program`` (JSON-ready: its name and the
        settings it closes over) compiled for ``args``."""
        dev = jax.devices()[0]
        key = {"code": code_digest(), "backend": jax.default_backend(),
               "device_kind": getattr(dev, "device_kind", str(dev)),
               "devices": jax.device_count(), "program": program,
               "flags": {name: os.environ.get(name) for name in FLAG_VARIABLES},
               "args": _describe_args(args)}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()
                              ).hexdigest()

    def _path(self, digest: str) -> Path:
        return self.folder / f"{digest}{SUFFIX}"

    def load(self, digest: str, args: tuple, out_tree) -> jax.stages.Compiled | None:
        """The program ``digest`` for arguments shaped as ``args`` returning ``out_tree``,
        or None when the folder lacks it or holds a file that cannot be read back (that
        file is deleted)."""
        path = self._path(digest)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            compiled = serialize_executable.deserialize_and_load(
                blob, jax.tree.structure((args, {})), out_tree,
                execution_devices=_devices(args))
        except Exception as e:  # noqa: BLE001 (any failure: compile it again)
            print(f"warning: dropping unreadable compiled program {path} "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: evicted last
        self.loaded += 1
        return compiled

    def save(self, digest: str, compiled: jax.stages.Compiled) -> None:
        """Write ``compiled`` as ``digest`` (whole or not at all: written aside, then
        renamed), then keep the folder within :data:`MAX_BYTES`. A folder that cannot be
        written costs a warning, never the caller's program."""
        try:
            blob, _, _ = serialize_executable.serialize(compiled)
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self._path(digest)
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            self.saved += 1
            self._evict()
        except (OSError, ValueError, NotImplementedError) as e:
            print(f"warning: compiled program not saved in {self.folder} "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def _evict(self) -> None:
        files = sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= MAX_BYTES:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
