"""Damaged tokenizer files beside a model (``infer.prompts.load_tokenizer``): refused with an
InputError naming the file, never a traceback; a folder without tokenizer files has none."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer import generate as cli
from infer.prompts import load_tokenizer
from orthrus_jax.cli import InputError
from tests.hf_reference import tiny_chat_tokenizer, tiny_model_dir

# CI runs a few examples per fuzz test; ORTHRUS_FUZZ_EXAMPLES=10000 runs many.
EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "150"))

TOKENIZER = "tokenizer.json"
CONFIG = "tokenizer_config.json"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tiny_chat_tokenizer().save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _json_edit(name: str, change):
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return damage


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _truncate(name: str, keep: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


# (name, damage: folder -> None, file named, what the message must say after "FILE: ")
_DAMAGE = [
    ("tokenizer.json truncated", _truncate(TOKENIZER, 500), TOKENIZER,
     "not valid JSON (Unterminated string"),
    ("tokenizer.json a list", _write(TOKENIZER, b"[1, 2]"), TOKENIZER,
     "expected a JSON object, got a list"),
    ("tokenizer.json not UTF-8", _write(TOKENIZER, b'{"a": "\xff"}'), TOKENIZER,
     "not UTF-8 text (invalid start byte at byte 7)"),
    ("tokenizer.json model of the wrong type",
     _json_edit(TOKENIZER, lambda d: d.update(model="BPE")), TOKENIZER,
     "not a usable tokenizer file (Exception: data did not match any variant"),
    ("tokenizer.json vocab a list",
     _json_edit(TOKENIZER, lambda d: d["model"].update(vocab=[1, 2])), TOKENIZER,
     "not a usable tokenizer file (Exception: invalid type: sequence, expected a map"),
    ("tokenizer_config.json not JSON", _write(CONFIG, b"{oops"), CONFIG,
     "not valid JSON (Expecting property name"),
    ("tokenizer_config.json empty", _write(CONFIG, b""), CONFIG,
     "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ("eos_token a number", _json_edit(CONFIG, lambda d: d.update(eos_token=5)), CONFIG,
     "not a usable tokenizer file (TypeError: Special token eos_token has to be either str "
     "or AddedToken"),
    ("added_tokens_decoder a list",
     _json_edit(CONFIG, lambda d: d.update(added_tokens_decoder=[1])), CONFIG,
     "not a usable tokenizer file (AttributeError: "),
    ("model_max_length a string",
     _json_edit(CONFIG, lambda d: d.update(model_max_length="big")), CONFIG,
     "'model_max_length' must be a positive number, got a string"),
    ("chat_template a number", _json_edit(CONFIG, lambda d: d.update(chat_template=5)), CONFIG,
     "'chat_template' must be a string (or a list of {\"name\", \"template\"} objects), "
     "got a number"),
    ("no tokenizer.json to build from", lambda f: (f / TOKENIZER).unlink(), CONFIG,
     "not a usable tokenizer file (ValueError: "),
]


@pytest.mark.parametrize("damage, name, needle", [d[1:] for d in _DAMAGE],
                         ids=[d[0] for d in _DAMAGE])
def test_damaged_tokenizer_is_refused(tmp_path: Path, tokenizer_dir: Path, damage, name: str,
                                      needle: str) -> None:
    folder = _copy(tokenizer_dir, tmp_path / "m")
    damage(folder)
    with pytest.raises(InputError) as info:
        load_tokenizer(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / name}: "), message
    assert needle in message, message
    assert "\n" not in message


def test_valid_and_absent_tokenizers(tmp_path: Path, tokenizer_dir: Path) -> None:
    assert load_tokenizer(tokenizer_dir).encode("Hello world")
    assert load_tokenizer(tmp_path) is None  # no tokenizer files: none, not an error


def test_generate_cli_reports_a_damaged_tokenizer_in_one_line(tmp_path: Path) -> None:
    folder = tiny_model_dir(tmp_path / "m")
    (folder / TOKENIZER).write_bytes((folder / TOKENIZER).read_bytes()[:300])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--model", str(folder), "--prompt", "hi"])
    assert status == 2 and out.getvalue() == ""
    assert err.getvalue().startswith(f"error: {folder / TOKENIZER}: not valid JSON")
    assert err.getvalue().count("\n") == 1


# --------------------------------------------------------------------------- fuzzing

_ABSURD = st.sampled_from([None, True, -1, 0, 2**64, 1.5, "", "x", "<|im_end|>", [], {},
                           [1, "a"], {"a": 1}, {"content": 5}])


def _mutations(tokenizer: bytes, config: bytes) -> st.SearchStrategy:
    """A damaged (file name, bytes): a JSON field of either file set to an absurd value or
    dropped, or the bytes truncated, flipped or overwritten."""
    files = {TOKENIZER: tokenizer, CONFIG: config}

    def field_edit(name: str, path: list[int], value, drop: bool) -> tuple[str, bytes]:
        data = json.loads(files[name])
        node = data
        for i in path:  # walk down a few levels by index into keys / items
            children = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not children:
                break
            key = children[i % len(children)]
            if not isinstance(node[key], dict | list) or i == path[-1]:
                if drop and isinstance(node, dict):
                    del node[key]
                else:
                    node[key] = copy.deepcopy(value)
                break
            node = node[key]
        return name, json.dumps(data).encode()

    def byte_edit(name: str, ops) -> tuple[str, bytes]:
        buf = bytearray(files[name])
        for kind, at, value in ops:
            at = at % (len(buf) + 1)
            if kind == "truncate":
                del buf[at:]
            elif kind == "flip" and at < len(buf):
                buf[at] ^= value
            elif kind == "overwrite":
                buf[at:at + 1] = bytes([value])
        return name, bytes(buf)

    name = st.sampled_from([TOKENIZER, CONFIG])
    op = st.tuples(st.sampled_from(["truncate", "flip", "overwrite"]),
                   st.integers(0, 2**20), st.integers(1, 255))
    return st.one_of(
        st.builds(field_edit, name, st.lists(st.integers(0, 50), min_size=1, max_size=4),
                  _ABSURD, st.booleans()),
        st.builds(byte_edit, name, st.lists(op, min_size=1, max_size=3)),
    )


def test_fuzzed_tokenizer_files_load_or_are_refused(tokenizer_dir: Path) -> None:
    tokenizer = (tokenizer_dir / TOKENIZER).read_bytes()
    config = (tokenizer_dir / CONFIG).read_bytes()

    @settings(max_examples=EXAMPLES, deadline=2000,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(change=_mutations(tokenizer, config))
    def check(change: tuple[str, bytes]) -> None:
        name, data = change
        with tempfile.TemporaryDirectory() as tmp:
            folder = _copy(tokenizer_dir, Path(tmp) / "m")
            (folder / name).write_bytes(data)
            try:
                tok = load_tokenizer(folder)
            except InputError as e:
                assert str(e).startswith(f"{folder}/"), str(e)
            else:
                tok.decode(tok.encode("Hello world"))

    check()
