"""Damaged and crafted GGUF files: refused with InputError naming the file, never a traceback,
a hang or an allocation the file's size does not justify (see docs/refusals.md)."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.from_gguf import convert, main, read_gguf
from orthrus_jax.cli import InputError
from tests.convert.gguf_fixtures import random_hf_state, tiny_config, write_tiny_gguf
from tests.fuzzing import apply_mutations, byte_mutations

FUZZ_EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "100"))


class _Valid:
    """A small valid GGUF file's bytes and the offsets of the parts the tests damage."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        reader = gguf.GGUFReader(path)
        self.data_offset = reader.data_offset
        self.field_offset = {key: f.offset for key, f in reader.fields.items()}
        self.tensors = {t.name: t for t in reader.tensors}

    def tensor_info_offset(self, name: str, part: str) -> int:
        """Offset of ``part`` ("type" or "offset") of tensor ``name``'s info."""
        t = self.tensors[name]
        at = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)
        return at if part == "type" else at + 4

    def string_value_offset(self, key: str) -> int:
        """Offset of the length of string metadata ``key``'s value."""
        return self.field_offset[key] + 8 + len(key.encode()) + 4


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> _Valid:
    config = tiny_config()
    path = write_tiny_gguf(tmp_path_factory.mktemp("valid") / "ok.gguf",
                           random_hf_state(config), config)
    return _Valid(path)


def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _u32(x: int) -> bytes:
    return struct.pack("<I", x)


def _u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def test_valid_file_converts(tmp_path: Path, valid: _Valid) -> None:
    src = tmp_path / "ok.gguf"
    src.write_bytes(valid.data)
    assert convert(src, tmp_path / "out", mask_token_id=0).is_dir()


# (name, damage: _Valid -> bytes, what the message must say after "PATH: ")
_DAMAGE = [
    ("bad magic", lambda v: _patch(v.data, 0, b"GGML"),
     "bad magic b'GGML' (expected b'GGUF'): not a GGUF file"),
    ("not gguf at all", lambda v: b"PK\x03\x04" + bytes(100), "bad magic b'PK\\x03\\x04'"),
    ("empty file", lambda v: b"", "empty file, not a GGUF file"),
    ("unsupported version", lambda v: _patch(v.data, 4, _u32(7)),
     "unsupported GGUF version 7 (supported: 2, 3)"),
    ("truncated header", lambda v: v.data[:10],
     "truncated header (10 bytes, a GGUF header needs 24)"),
    ("header cut in the tensor table",
     lambda v: v.data[:v.tensors["output_norm.weight"].field.offset + 5],
     "length of name of tensor #1 at offset"),
    ("truncated tensor data", lambda v: v.data[:-100],
     "data at offset"),
    ("tensor count 2**40", lambda v: _patch(v.data, 8, _u64(2**40)),
     "header claims 1099511627776 tensors and"),
    ("metadata count 2**60", lambda v: _patch(v.data, 16, _u64(2**60)),
     "1152921504606846976 metadata entries, more than the file's"),
    ("string length past the end",
     lambda v: _patch(v.data, v.string_value_offset("general.name"), _u64(2**50)),
     f"metadata general.name ({2**50} bytes) at offset"),
    ("tensor offset past the end",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "offset"),
                      _u64(2**40)),
     "tensor 'output_norm.weight' (F32, dims [64]) data at offset"),
    ("misaligned tensor offset",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "offset"), _u64(4)),
     "tensor 'output_norm.weight' data offset 4 is not a multiple of the alignment 32"),
    ("overlapping tensor data",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "offset"),
                      _u64(v.tensors["token_embd.weight"].data_offset - v.data_offset)),
     "data overlaps tensor"),
    ("unknown tensor type",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "type"), _u32(99)),
     "tensor 'output_norm.weight' has unknown type 99"),
    ("unsupported tensor type",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "type"), _u32(26)),
     "tensor 'output_norm.weight' has unsupported type I32"),
    ("zero dimension",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "type") - 8, _u64(0)),
     "tensor 'output_norm.weight' has dims [0]: every dimension must be positive"),
    ("too many dimensions",
     lambda v: _patch(v.data, v.tensor_info_offset("output_norm.weight", "type") - 12, _u32(9)),
     "tensor 'output_norm.weight' has 9 dimensions (1 to 4 supported)"),
    ("unknown metadata value type",
     lambda v: _patch(v.data, v.string_value_offset("general.name") - 4, _u32(13)),
     "metadata general.name has unknown value type 13"),
    ("metadata array count 2**62",
     lambda v: _patch(v.data, v.string_value_offset("tokenizer.ggml.token_type") + 4,
                      _u64(2**62)),
     "metadata tokenizer.ggml.token_type at offset"),
    ("non-UTF-8 metadata key",
     lambda v: _patch(v.data, v.field_offset["general.name"] + 8, b"\xff"),
     "metadata key #"),
    ("duplicate metadata key",
     lambda v: _patch(v.data, v.field_offset["tokenizer.ggml.model"] + 8,
                      b"llama.context_length"),
     "metadata key 'llama.context_length' appears twice"),
    ("block_count 2**31",
     lambda v: _patch(v.data, v.string_value_offset("llama.block_count"), _u32(2**31)),
     "metadata llama.block_count=2147483648 but the file has only"),
    ("head count 0",
     lambda v: _patch(v.data, v.string_value_offset("llama.attention.head_count"), _u32(0)),
     "metadata llama.attention.head_count=0 must be a positive integer"),
]


@pytest.mark.parametrize("damage, needle", [(d, n) for _, d, n in _DAMAGE],
                         ids=[name for name, _, _ in _DAMAGE])
def test_damaged_file_is_refused(tmp_path: Path, valid: _Valid, damage, needle: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bad.gguf"
    src.write_bytes(damage(valid))
    with pytest.raises(InputError) as info:
        read_gguf(src)
    message = str(info.value)
    assert message.startswith(f"{src}: "), message
    assert needle in message, message
    # The command line: one `error:` line, exit status 2, nothing written.
    assert main([str(src), str(tmp_path / "out"), "--mask-token-id", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fuzzing


def _mutations(size: int, header_end: int) -> st.SearchStrategy:
    return byte_mutations(size, header_end, [_u32(0), _u32(2**32 - 1), _u64(2**63),
                                             _u64(2**40), _u64(1), b"\x00" * 8, b"\xff" * 8])


def test_fuzzed_files_convert_or_are_refused(valid: _Valid) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=2000,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=_mutations(len(valid.data), valid.data_offset))
    def check(ops) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "m.gguf"
            src.write_bytes(apply_mutations(valid.data, ops))
            try:
                convert(src, Path(tmp) / "out", mask_token_id=0)
            except InputError as e:
                assert str(e).startswith(f"{src}: "), str(e)

    check()
