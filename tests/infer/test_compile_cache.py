"""JAX's persistent compilation cache for the command lines (``infer.compile_cache``): a
second process compiles nothing the first compiled, an unwritable folder only warns, and
the flags and ``$ORTHRUS_COMPILE_CACHE`` choose the folder.

The suite runs with ``ORTHRUS_COMPILE_CACHE=off`` (``tests/conftest.py``); these tests give
every cache a folder under ``tmp_path``, and put the user cache folder there too."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from infer.compile_cache import (
    ENV,
    add_compile_cache_args,
    compile_cache_folder,
    enable_compile_cache,
    enable_compile_cache_from,
    restored_compile_cache,
)

ROOT = Path(__file__).resolve().parents[2]
CLIS = ("infer.generate", "infer.bench", "infer.serve.cli", "infer.calibrate", "infer.passes",
        "train.main", "train.distill")
WARNING = "warning: compilation cache "

# Runs a module (``-m NAME ARGS``) or a script file (``PATH ARGS``) as python would, and
# writes the process's compile events to the JSON file named by its first argument at
# exit. A persistent-cache hit still records a backend compile event (JAX times the
# lookup the same way), so the compiles are those events less the hits.
_RUNNER = """
import atexit, collections, json, runpy, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: events.update([event]))
out = sys.argv[1]
def _write():
    hits = events["/jax/compilation_cache/cache_hits"]
    json.dump({"compiles": events["/jax/core/compile/backend_compile_duration"] - hits,
               "hits": hits, "writes": events["/jax/compilation_cache/cache_misses"]},
              open(out, "w"))
atexit.register(_write)
if sys.argv[2] == "-m":
    sys.argv = sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Turns the cache on as a command line does (no folder: the flag-less default) and
# compiles two small programs.
_SCRIPT = """
import jax, jax.numpy as jnp
from infer.compile_cache import enable_compile_cache
print("folder", enable_compile_cache())
print("value", float(jax.jit(lambda a: (jnp.sin(a) * 2 + a.sum()).sum())(jnp.arange(8.0))))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The child's environment: one CPU device, as a user runs it, and the user cache
    folder under ``tmp_path``; ``extra`` on top (a value of "" removes the variable)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               ORTHRUS_CACHE=str(tmp_path / "user-cache"), **extra)
    env.pop("XLA_FLAGS", None)
    return {k: v for k, v in env.items() if v != ""}


def _run(tmp_path: Path, target: list[str], **env: str) -> tuple[subprocess.CompletedProcess,
                                                                  dict]:
    """Run ``target`` (``["-m", module, *args]`` or ``[script, *args]``) in a child
    process; the process and its compile events."""
    events = tmp_path / "events.json"
    events.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(events), *target], cwd=ROOT,
                          env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=300)
    return proc, json.loads(events.read_text()) if events.exists() else {}


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*-cache"))


@pytest.fixture
def jax_settings():
    """JAX's cache settings as they were before the test, again after it."""
    with restored_compile_cache():
        yield


# ------------------------------------------------------------------ a second process


def test_a_second_process_compiles_nothing_the_first_compiled(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    folder = tmp_path / "user-cache" / "xla"  # the default: beside the default model
    runs = [_run(tmp_path, [str(script)], **{ENV: ""}) for _ in range(2)]
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr
        assert f"folder {folder}\n" in proc.stdout and "value 225.107" in proc.stdout
        assert WARNING not in proc.stderr
    (_, first), (_, second) = runs
    assert first["compiles"] >= 2 and first["writes"] == first["compiles"]
    assert len(_entries(folder)) == first["writes"]
    assert second == {"compiles": 0, "hits": first["compiles"], "writes": 0}


@pytest.mark.slow
def test_generate_twice_compiles_nothing_the_second_time(tmp_path, tiny_folder):
    """``python -m infer.generate --compare-ar`` run twice: the second run loads every
    program from the cache, and prints the same tokens; an unwritable folder only warns."""
    folder = tmp_path / "xla"
    args = ["-m", "infer.generate", "--model", str(tiny_folder), "--prompt-ids", "5,6,7",
            "--max-new-tokens", "8", "--eos-id", "-1", "--compare-ar"]
    runs = [_run(tmp_path, [*args, "--compile-cache", str(folder)]) for _ in range(2)]
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr
        assert WARNING not in proc.stderr and "1 of 1 outputs identical" in proc.stderr
    (proc1, first), (proc2, second) = runs
    assert first["compiles"] > 0 and len(_entries(folder)) == first["writes"] > 0
    assert second["compiles"] == 0 and second["hits"] == first["compiles"]
    assert proc2.stdout == proc1.stdout
    # --compile-cache, not the default (the user cache folder holds only the CPU kernel)
    assert not (tmp_path / "user-cache" / "xla").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc, events = _run(tmp_path, [*args, "--compile-cache", str(blocker / "xla")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc1.stdout and events["hits"] == 0
    [line] = [ln for ln in proc.stderr.splitlines() if "compilation cache" in ln]
    assert line == (f"{WARNING}{blocker / 'xla'} not writable (Not a directory); "
                    "compiling without it")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def tiny_folder(tmp_path):
    """A model folder of a tiny random config (no tokenizer: prompts go in as ids)."""
    from orthrus_jax.checkpoint import save_model
    from orthrus_jax.config import ModelConfig
    from orthrus_jax.random_weights import random_model

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, block_size=4,
                         mask_token_id=3)
    path = tmp_path / "model"
    path.mkdir()
    save_model(random_model(config, per_layer=False), path)
    return path


# ------------------------------------------------------------------ unwritable folders


def _unwritable_folders(tmp_path: Path) -> list[tuple[Path, str]]:
    """(folder, the reason the warning gives) for folders no process can use."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [(blocker / "xla", "Not a directory"), (blocker, "File exists")]
    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        cases.append((read_only, "Permission denied"))
    return cases


def test_an_unwritable_folder_warns_once_and_leaves_jax_as_it_was(tmp_path, capsys,
                                                                   jax_settings):
    before = jax.config.jax_compilation_cache_dir
    for folder, reason in _unwritable_folders(tmp_path):
        assert enable_compile_cache(folder) is None
        assert capsys.readouterr().err == (f"{WARNING}{folder} not writable ({reason}); "
                                           "compiling without it\n")
        assert jax.config.jax_compilation_cache_dir == before
    assert (tmp_path / "a-file").read_text() == ""  # nothing written in its place


def test_a_folder_that_fails_later_costs_warnings_not_the_run(tmp_path, jax_settings):
    folder = enable_compile_cache(tmp_path / "xla")
    assert folder == tmp_path / "xla" and folder.is_dir()
    x = jnp.arange(4.0)
    shutil.rmtree(folder)
    folder.write_text("")  # a file where the folder was
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = jax.jit(lambda a: a * 3 + 1)(x)
    assert value.tolist() == [1.0, 4.0, 7.0, 10.0]
    assert caught and all("persistent compilation cache" in str(w.message) for w in caught)


# ------------------------------------------------------------------ flags and environment


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_compile_cache_args(p)
    return p.parse_args(argv)


def test_folder_precedence_flag_then_environment_then_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "user"))
    monkeypatch.delenv(ENV)
    default = tmp_path / "user" / "xla"
    assert compile_cache_folder() == default
    assert compile_cache_folder(tmp_path / "mine") == tmp_path / "mine"
    assert compile_cache_folder(enabled=False) is None
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert compile_cache_folder() == tmp_path / "env"
    assert compile_cache_folder(tmp_path / "flag") == tmp_path / "flag"  # the flag wins
    for off in ("off", "OFF", "0", "false", "no", " Off "):
        monkeypatch.setenv(ENV, off)
        assert compile_cache_folder() is None, off
        assert compile_cache_folder(tmp_path / "flag") == tmp_path / "flag"
        assert compile_cache_folder(enabled=True) == default
    monkeypatch.setenv(ENV, "")
    assert compile_cache_folder() == default


def test_the_flags(tmp_path, monkeypatch, jax_settings):
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "user"))
    monkeypatch.delenv(ENV)
    before = jax.config.jax_compilation_cache_dir
    assert enable_compile_cache_from(_parse("--no-compile-cache")) is None
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv(ENV, "off")
    assert enable_compile_cache_from(_parse()) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "user").exists()

    folder = enable_compile_cache_from(_parse("--compile-cache", str(tmp_path / "dir")))
    assert folder == tmp_path / "dir" and folder.is_dir() and not any(folder.iterdir())
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_compilation_cache_max_size == 4 << 30
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        _parse("--compile-cache", "x", "--no-compile-cache")
    assert e.value.code == 2 and "not allowed with argument" in err.getvalue()


def test_restored_compile_cache_puts_jax_back(tmp_path):
    before = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_compilation_cache_max_size")}
    with restored_compile_cache():
        enable_compile_cache(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert {name: getattr(jax.config, name) for name in before} == before


@pytest.mark.parametrize("module", CLIS)
def test_every_command_line_has_the_flags(module):
    out = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(out):
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    assert "--compile-cache DIR" in out.getvalue() and "--no-compile-cache" in out.getvalue()
