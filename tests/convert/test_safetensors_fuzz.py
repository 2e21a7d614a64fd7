"""Damaged and crafted safetensors files (HF checkpoints read by ``convert.from_hf``, head
files read by ``convert.head``): refused with an InputError whose message starts with the
file's path and names the problem, never a traceback, a hang or an allocation the file's
size does not justify (see docs/refusals.md)."""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from convert import from_hf
from convert import head as H
from orthrus_jax.cli import InputError
from tests.convert.test_hf_roundtrip import no_leftovers, orthrus_checkpoint
from tests.fuzzing import apply_mutations, byte_mutations

# CI runs a few examples per fuzz test; ORTHRUS_FUZZ_EXAMPLES=10000 runs many.
EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "150"))


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's ``(header, data section)``."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (any JSON value) and a data section."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def edit(data: bytes, change) -> bytes:
    header, body = split(data)
    change(header)
    return join(header, body)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, src, _ = orthrus_checkpoint(tmp_path_factory.mktemp("valid"), shards=1)
    return src


NORM = "model.norm.weight"  # float32 [64]
EMBED = "model.embed_tokens.weight"


def _raw_edit(data: bytes, change) -> bytes:
    """``data`` with its header's bytes changed (the header length follows)."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = change(data[8:8 + n])
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _offsets(header: dict, key: str) -> list[int]:
    return header[key]["data_offsets"]


def _overlap(header: dict) -> None:
    begin, end = _offsets(header, NORM)
    other = min((k for k in header if k not in (NORM, "__metadata__")),
                key=lambda k: abs(_offsets(header, k)[0] - begin))
    b = _offsets(header, other)[0]
    header[NORM]["data_offsets"] = [b, b + end - begin]


# (name, damage: valid file bytes -> bytes, what the message must say after "PATH: ")
_DAMAGE = [
    ("empty file", lambda d: b"",
     "unreadable safetensors file: 0 bytes, too short for the 8-byte header length"),
    ("header length past the end", lambda d: struct.pack("<Q", 2**40) + d[8:],
     "unreadable safetensors file: header length 1099511627776 is larger than the "),
    ("not a safetensors file", lambda d: b"PK\x03\x04 a zip file, not tensors" * 4,
     "header length 8800140462016121680 is larger than the 104 bytes after it: "
     "truncated or not a safetensors file"),
    ("header not JSON", lambda d: struct.pack("<Q", 5) + b"{oops" + d[8:],
     "unreadable safetensors file: header is not JSON (Expecting property name"),
    ("header JSON cut", lambda d: struct.pack("<Q", 10) + b'{"a": [1, 2' + d[8:],
     "unreadable safetensors file: header is not JSON ("),
    ("header not UTF-8", lambda d: struct.pack("<Q", 4) + b'"\xff"\x20' + d[8:],
     "unreadable safetensors file: header is not UTF-8 (invalid start byte at byte 9)"),
    ("header a list", lambda d: join([1, 2], b""),
     "unreadable safetensors file: header is not a JSON object (a list)"),
    ("tensor entry a number", lambda d: edit(d, lambda h: h.update({NORM: 3})),
     f"tensor '{NORM}' is not an object"),
    ("no dtype", lambda d: edit(d, lambda h: h[NORM].pop("dtype")),
     f"tensor '{NORM}' has no 'dtype'"),
    ("unknown dtype", lambda d: edit(d, lambda h: h[NORM].update(dtype="F99")),
     f"tensor '{NORM}' has unknown dtype 'F99' (known: BOOL, U8, I8,"),
    ("8-bit float dtype", lambda d: edit(d, lambda h: h[NORM].update(dtype="F8_E4M3")),
     f"tensor '{NORM}' has dtype F8_E4M3, which this reader cannot load (supported: BOOL,"),
    ("negative dimension", lambda d: edit(d, lambda h: h[NORM].update(shape=[-1, 64])),
     f"tensor '{NORM}' has shape [-1, 64]: not a list of non-negative integers"),
    ("shape not a list", lambda d: edit(d, lambda h: h[NORM].update(shape="64")),
     f"tensor '{NORM}' has shape '64': not a list of non-negative integers"),
    ("absurd shape", lambda d: edit(d, lambda h: h[NORM].update(shape=[2**62, 2**62])),
     f"tensor '{NORM}' (F32, shape [4611686018427387904, 4611686018427387904]) needs more "
     "bytes than the data section's "),
    ("a million huge dimensions",
     lambda d: edit(d, lambda h: h[NORM].update(shape=[2**62] * 10**6)),
     f"tensor '{NORM}' (F32, shape [4611686018427387904, 4611686018427387904, 46116860184"),
    ("data_offsets reversed",
     lambda d: edit(d, lambda h: h[NORM].update(data_offsets=_offsets(h, NORM)[::-1])),
     "not [begin, end] with 0 <= begin <= end"),
    ("data_offsets past the end",
     lambda d: edit(d, lambda h: h[NORM].update(data_offsets=[2**50, 2**50 + 256])),
     f"tensor '{NORM}' data_offsets [1125899906842624, 1125899906842880] run past the end "
     "of the data section ("),
    ("shape x dtype != data_offsets",
     lambda d: edit(d, lambda h: h[NORM].update(shape=[32])),
     f"tensor '{NORM}' (F32, shape [32]) needs 128 bytes, its data_offsets"),
    ("dtype size != data_offsets", lambda d: edit(d, lambda h: h[NORM].update(dtype="F64")),
     f"tensor '{NORM}' (F64, shape [64]) needs 512 bytes"),
    ("overlapping tensors", lambda d: edit(d, _overlap), "data overlaps tensor"),
    ("truncated data", lambda d: d[:-100],
     "run past the end of the data section ("),
    ("duplicate tensor name",
     lambda d: _raw_edit(d, lambda raw: raw.replace(b'"model.norm.weight"',
                                                    b'"model.embed_tokens.weight"')),
     "unreadable safetensors file: header key 'model.embed_tokens.weight' appears twice"),
    ("metadata not strings", lambda d: edit(d, lambda h: h.update(__metadata__={"a": 1})),
     "unreadable safetensors file: __metadata__ must be an object of strings"),
    ("a gap between tensors (library check)", lambda d: d + b"\x00" * 16,
     "unreadable safetensors file (SafetensorError: "),
]


@pytest.mark.parametrize("damage, needle", [(d, n) for _, d, n in _DAMAGE],
                         ids=[name for name, _, _ in _DAMAGE])
def test_damaged_checkpoint_is_refused(tmp_path: Path, checkpoint: Path, damage,
                                       needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoint.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    bad = src / "model.safetensors"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(InputError) as info:
        list(from_hf.iter_safetensors([bad]))
    message = str(info.value)
    assert message.startswith(f"{bad}: "), message
    assert needle in message, message
    # The command line: one `error:` line, exit status 2, nothing written.
    assert from_hf.main([str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_header_length_over_the_cap_reads_nothing_more(tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:  # sparse: 200 MB on paper, a few bytes on disk
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(200_000_000)
    with pytest.raises(InputError, match="header length 150000000 is over the "
                                         "100000000-byte limit"):
        list(from_hf.iter_safetensors([big]))


def test_bad_index_files_are_refused(tmp_path: Path, checkpoint: Path) -> None:
    index = tmp_path / from_hf.INDEX_FILE
    for text, needle in [("{", "not valid JSON"), ('{"weight_map": [1]}', "not a safetensors "
                         "index"), ('{"weight_map": {"a": "../x.safetensors"}}', "weight_map"),
                         ('{"weight_map": {"a": 5}}', "weight_map")]:
        index.write_text(text)
        with pytest.raises(InputError, match=needle) as info:
            from_hf.safetensors_files(tmp_path)
        assert str(info.value).startswith(f"{index}: ")


def _nan_scale(data: bytes) -> bytes:
    """A head whose first int8 row scale is NaN (a row of NaN weights)."""
    header, _ = split(data)
    key = min(k for k in header if k.endswith(H.SCALE_SUFFIX))
    at = len(data) - len(split(data)[1]) + header[key]["data_offsets"][0]
    return data[:at] + b"\xff\xff\xff\xff" + data[at + 4:]


def test_damaged_head_is_refused_through_the_cli(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tests.hf_reference import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m")
    head = tmp_path / "h.safetensors"
    assert H.main(["export", str(model), str(head)]) == 0
    data = head.read_bytes()
    for bad, needle in [
        (data[:-10], "not a readable safetensors file: tensor "),
        (edit(data, lambda h: h["__metadata__"].update(block_size='"x"')),
         "header field block_size='x' must be an integer >= 1"),
        (edit(data, lambda h: h["__metadata__"].update(backbone="[]")),
         "header field backbone must be an object, got []"),
        (_nan_scale(data), "k_proj_diff.weight has 64 non-finite value(s)"),
    ]:
        head.write_bytes(bad)
        assert H.main(["apply", str(model), str(head), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {head}: ") and needle in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fuzzing


def _small_file(path: Path) -> bytes:
    """A small valid file: several dtypes, a scalar, an empty tensor, metadata."""
    rng = np.random.default_rng(0)
    save_file({"a": rng.standard_normal((4, 8)).astype(np.float32),
               "b": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
               "c": rng.integers(-9, 9, (3, 5)).astype(np.int8),
               "d": np.arange(6, dtype=np.int64).reshape(2, 3),
               "e": np.array(1.5, np.float16), "f": np.zeros((0, 4), np.float32)},
              str(path), metadata={"format": "pt", "note": "x"})
    return path.read_bytes()


_ABSURD = st.sampled_from([-1, 0, 1, 2**31, 2**32 - 1, 2**53, 2**63, 2**64 + 3, 1.5, "8", None,
                           True, [], {}, [1, 2, 3], [2**40, 2**40 + 4]])
_FIELDS = st.sampled_from(["dtype", "shape", "data_offsets"])


def _header_op() -> st.SearchStrategy:
    """A change to the parsed header: a field set to an absurd value or another tensor's,
    a field dropped, a dtype renamed, a whole entry swapped."""
    return st.one_of(
        st.tuples(st.just("set"), st.integers(0, 7), _FIELDS, _ABSURD),
        st.tuples(st.just("swap"), st.integers(0, 7), _FIELDS, st.integers(0, 7)),
        st.tuples(st.just("drop"), st.integers(0, 7), _FIELDS, st.none()),
        st.tuples(st.just("dtype"), st.integers(0, 7), st.just("dtype"),
                  st.sampled_from(["F32", "F64", "BF16", "I8", "U8", "BOOL", "C64", "F4", "x",
                                   "F8_E4M3", "I64"])),
        st.tuples(st.just("offset"), st.integers(0, 7), st.integers(0, 1),
                  st.integers(-8, 8)),
        st.tuples(st.just("entry"), st.integers(0, 7), st.just(""), _ABSURD),
    )


def _apply_header_ops(data: bytes, ops, length_delta: int) -> bytes:
    header, body = split(data)
    keys = sorted(header)
    for kind, i, field, value in ops:
        key = keys[i % len(keys)]
        entry = header[key]
        value = copy.deepcopy(value)  # the strategy's lists and dicts are shared
        if kind == "entry":
            header[key] = value
        elif not isinstance(entry, dict):
            continue
        elif kind == "set":
            entry[field] = value
        elif kind == "swap":
            other = header[keys[value % len(keys)]]
            if isinstance(other, dict) and field in other:
                entry[field] = other[field]
        elif kind == "drop":
            entry.pop(field, None)
        elif kind == "dtype":
            entry["dtype"] = value
        elif kind == "offset" and isinstance(entry.get("data_offsets"), list) \
                and len(entry["data_offsets"]) == 2:
            entry["data_offsets"][field] += value
    raw = json.dumps(header).encode()
    return join(header, body, max(0, len(raw) + length_delta))


def _byte_ops(size: int, header_end: int) -> st.SearchStrategy:
    return byte_mutations(size, header_end, [
        struct.pack("<Q", 2**63), struct.pack("<Q", 2**40), b"\x00" * 8, b"\xff" * 8, b'"',
        b"{", b"]", b"-1", b"99999999999"])


def _damaged_files(valid: bytes) -> st.SearchStrategy:
    (n,) = struct.unpack("<Q", valid[:8])
    header_level = st.builds(lambda ops, delta: _apply_header_ops(valid, ops, delta),
                             st.lists(_header_op(), min_size=1, max_size=3),
                             st.sampled_from([0, 0, 0, -1, 1, -8, 10**6]))
    byte_level = _byte_ops(len(valid), 8 + n).map(lambda ops: apply_mutations(valid, ops))
    return st.one_of(header_level, byte_level)


_SETTINGS = settings(max_examples=EXAMPLES, deadline=2000,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz(valid: bytes, name: str, read) -> None:
    """Damaged copies of ``valid`` written as ``name`` are read by ``read(path)`` or
    refused with an InputError that starts with the path; nothing else."""

    @_SETTINGS
    @given(data=_damaged_files(valid))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                read(path, data)
            except InputError as e:
                assert str(e).startswith(f"{path}: "), str(e)

    check()


def test_fuzzed_safetensors_read_or_are_refused(tmp_path: Path) -> None:
    def read(path: Path, data: bytes) -> None:
        tensors = dict(from_hf.iter_safetensors([path]))
        assert sum(t.nbytes for t in tensors.values()) <= len(data)  # within the file

    _fuzz(_small_file(tmp_path / "valid.safetensors"), "m.safetensors", read)


def test_fuzzed_heads_apply_or_are_refused(tmp_path: Path) -> None:
    from tests.convert.test_head import _trained

    model = _trained()
    valid = H.save_head(model, tmp_path / "h.safetensors", dtype="int8").read_bytes()
    _fuzz(valid, "h.safetensors", lambda path, data: H.read_head(path, model.config))
