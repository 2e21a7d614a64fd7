"""Model-folder file handling: atomic replacement of a folder and the tokenizer files that
travel with a model folder."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The environment variable that moves the user cache folder (:func:`cache_root`).
CACHE_ENV = "ORTHRUS_CACHE"

# Files of an HF folder that travel with a model folder (tokenizer, chat template, ...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


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
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: str | Path, dst: str | Path) -> None:
    """Rename the complete folder ``new`` to ``dst``, so that a complete ``dst`` exists at
    every moment, even if the process is killed during the call.

    An existing ``dst`` is swapped with ``new`` in one atomic step (Linux
    ``renameat2(RENAME_EXCHANGE)``) and then deleted. Where the system cannot swap, it is
    moved aside to ``.DST.old-PID`` first and removed after the rename (a kill between the
    two renames leaves it there, complete).
    """
    new, dst = Path(new), Path(dst)
    if dst.exists() and _exchange(new, dst):
        shutil.rmtree(new, ignore_errors=True)  # now the previous dst
        return
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b``; False where the system cannot (not Linux,
    an old C library, a file system without the operation)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot replace {b} with {a}: {os.strerror(err)}")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of folder ``src`` into ``dst``; returns their names."""
    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names


def cache_root() -> Path:
    """The user cache folder (converted models, cost tables, compiled programs and
    kernels): ``$ORTHRUS_CACHE``, else ``$XDG_CACHE_HOME/orthrus-jax``, else
    ``~/.cache/orthrus-jax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "orthrus-jax"
    return Path.home() / ".cache" / "orthrus-jax"
