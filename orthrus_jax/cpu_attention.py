"""A CPU kernel of our own for the attention of decode passes: a few query rows over each
row's live prefix of the KV cache.

XLA's CPU backend runs the two attention products of a decode pass (a few query rows
against thousands of cached positions) at 7-14 GB/s on one core, where the same arrays
stream at 23-38 GB/s, and it reads the whole cache (or a copied window of it) whatever
the live length. ``prefix_attention.cc`` (an XLA FFI handler) reads each row's visible
keys once, in chunks of 256 spread over XLA's intra-op threads, and returns the
flash-attention partials, which :mod:`orthrus_jax.attention` normalises (alone, or
together with a block's own keys).

It is built on first use with the C++ compiler (``$CXX``, default ``g++``, for this
machine's instruction set, AVX-512 required) into ``kernels/`` under the user cache
folder (or ``$ORTHRUS_KERNELS``), and registered with JAX once per process. Where it
cannot be built, :func:`available` is False (the reason is printed once) and attention
stays XLA's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from orthrus_jax.folders import cache_root

SOURCE = Path(__file__).with_name("prefix_attention.cc")
TARGET = "orthrus_prefix_attention"
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math",
         "-fopenmp-simd", "-std=c++17", "-fPIC", "-w")
HEAD_SIZES = (32, 64, 128, 256)
# Where built kernels go instead of ``kernels/`` under the user cache folder.
KERNELS_ENV = "ORTHRUS_KERNELS"
# Query rows per KV head above which XLA's matrix products beat the kernel (a prefill).
MAX_ROWS = 64

_STATE: dict[str, object] = {}


def _machine() -> str:
    """What ``-march=native`` compiles for: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(keep)


def library_path() -> Path:
    """Where the built kernel lives (``$ORTHRUS_KERNELS``, else ``kernels/`` under the
    user cache folder): named by a digest of the source, the flags, the compiler,
    jaxlib's version and the machine."""
    import jaxlib

    cxx = os.environ.get("CXX", "g++")
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), cxx, jaxlib.__version__,
                     _machine()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = os.environ.get(KERNELS_ENV)
    folder = Path(folder).expanduser() if folder else cache_root() / "kernels"
    return folder / f"prefix_attention-{digest}.so"


def _build(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        # Compiled with -ffast-math, linked without it: linked with it, the library would
        # set the process's floating-point state (subnormals flushed to zero) when loaded.
        subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(SOURCE),
                        "-o", obj], check=True, capture_output=True, text=True)
        subprocess.run([cxx, "-shared", obj, "-o", tmp], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(obj).unlink(missing_ok=True)


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    if "ok" not in _STATE:
        try:
            path = library_path()
            if not path.is_file():
                _build(path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OrthrusPrefixAttention),
                                        platform="cpu")
            _STATE["ok"] = True
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"warning: the CPU attention kernel is unavailable, attention stays XLA's "
                  f"({detail.strip().splitlines()[-1] if detail.strip() else e})",
                  file=sys.stderr)
            _STATE["ok"] = False
    return bool(_STATE["ok"])


def supports(dtype, head_dim: int, rows: int) -> bool:
    """Whether a pass of ``rows`` query rows per KV head, of ``head_dim`` and ``dtype``,
    is the kernel's to run (float32 only; at most :data:`MAX_ROWS` rows)."""
    return (jnp.dtype(dtype) == jnp.float32 and head_dim in HEAD_SIZES
            and rows <= MAX_ROWS)


def prefix_partials(q: jax.Array, k: jax.Array, v: jax.Array, limit: jax.Array,
                    scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flash-attention partials of ``q [N, R, D]`` over ``k``, ``v`` ``[M >= N, S, D]``
    (group ``n`` of ``q`` reads group ``n`` of the cache), row ``r`` of group ``n``
    seeing keys ``[0, limit[n, r])``: ``o [N, R, D]`` (the exponentials' weighted sum of
    V), ``m [N, R]`` (their shift, the largest score; -1e30 where no key is visible) and
    ``l [N, R]`` (their sum), scores ``scale * q . k``. Needs :func:`available`."""
    if not available():
        raise RuntimeError("the CPU attention kernel is unavailable here (see the warning "
                           "above): use XLA's attention (kernel=False)")
    N, R, D = q.shape
    shapes = (jax.ShapeDtypeStruct((N, R, D), jnp.float32),
              jax.ShapeDtypeStruct((N, R), jnp.float32),
              jax.ShapeDtypeStruct((N, R), jnp.float32))
    return jax.ffi.ffi_call(TARGET, shapes, vmap_method="sequential")(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        limit.astype(jnp.int32), scale=np.float32(scale))
