"""Reading training records: chat / GSM8K / plain-text files into :class:`Record`, the
malformed-record policy, and :class:`Corpus`, the random-access index of a file set's records.

File formats (decided per file, then per line / record):

* ``.jsonl`` / ``.ndjson``, and ``.json`` files whose first character is not ``[``: one JSON
  object per line (blank lines ignored).
* ``.json`` files whose first character is ``[``: a JSON array of objects, read record by record
  (``JSONDecoder.raw_decode`` over a growing buffer). A truncated tail (the file ends inside a
  record) ends the file cleanly and counts in ``ReadStats.truncated``.
* Anything else is plain text: each file is one document whose tokens are all trainable.
  Directories are expanded to all their non-hidden files, recursively, in sorted order.

JSON records: ShareGPT ``{"conversations": [{"from", "value"}]}``, ``{"messages": [{"role",
"content"}]}``, GSM8K ``{"question", "answer"}`` (a user / assistant exchange), ``{"text"}``
(a plain document). Roles human/user -> user, gpt/assistant/chatgpt/bing/bard -> assistant,
system -> system; other roles are malformed, or dropped with ``unknown_roles="skip"``.
Assistant messages before the first non-assistant message (ShareGPT's split conversations often
open with one) are kept as context but not trained on; messages after the last assistant message
are dropped (nothing to learn); a conversation without a trainable assistant message counts in
``ReadStats.empty`` and is skipped.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROLE_ALIASES: dict[str, str] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}

_CHUNK_CHARS = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")

Message = dict[str, str]


class MalformedRecordError(ValueError):
    """A record that cannot be read or converted; the message names file and line."""


@dataclass(frozen=True)
class Record:
    """One example: a conversation (``messages``) or a plain document (``text``)."""

    source: str
    line: int  # 1-based line where the record starts
    messages: tuple[Message, ...] | None = None
    text: str | None = None


@dataclass
class ReadStats:
    """Counts of one corpus scan (``asdict`` for logging)."""

    files: int = 0
    examples: int = 0  # records kept
    chat: int = 0  # ... of which conversations
    text: int = 0  # ... of which plain documents
    malformed: int = 0  # skipped with skip_malformed=True
    truncated: int = 0  # truncated tails of JSON arrays
    empty: int = 0  # blank documents, conversations without an assistant message
    dropped_messages: int = 0  # unknown roles (unknown_roles="skip"), trailing messages


class BadRecord(Exception):
    """Why one record is malformed (the scanner adds file and line)."""


class _Empty(Exception):
    """Internal: a well-formed record without trainable content."""


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json_array" if head.startswith(b"[") else "jsonl"
    return "text"


def expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths``; directories give their non-hidden files (recursive, sorted)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and not any(s.startswith(".") for s in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data file not found: {p}")
    return out


def parse_messages(obj: Any, unknown_roles: str) -> tuple[list[Message], int]:
    """All normalized messages of one JSON record and the number of messages dropped for
    unknown roles (raises BadRecord); ``_messages`` then trims them for training."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj[key]
        if not isinstance(turns, list):
            raise BadRecord(f"'{key}' is not a list")
        msgs: list[Message] = []
        dropped = 0
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise BadRecord(f"{key}[{j}] is not an object")
            role = t.get("from", t.get("role"))
            content = t.get("value", t.get("content"))
            if not isinstance(role, str) or not isinstance(content, str):
                raise BadRecord(f"{key}[{j}] needs string 'from'/'value' or 'role'/'content'")
            mapped = ROLE_ALIASES.get(role.lower())
            if mapped is None:
                if unknown_roles != "skip":
                    raise BadRecord(f"{key}[{j}] has unknown role {role!r}")
                dropped += 1
                continue
            msgs.append({"role": mapped, "content": content})
    elif "question" in obj and "answer" in obj:
        q, a = obj["question"], obj["answer"]
        if not isinstance(q, str) or not isinstance(a, str):
            raise BadRecord("'question' and 'answer' must be strings")
        msgs, dropped = [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 0
    else:
        raise BadRecord("unrecognized record: expected 'conversations', 'messages', "
                    "'question'+'answer' or 'text'")
    return msgs, dropped


def _messages(obj: Any, unknown_roles: str, stats: ReadStats | None) -> tuple[Message, ...]:
    """Normalized messages of one JSON record, up to its last trainable assistant message
    (raises BadRecord / _Empty)."""
    msgs, dropped = parse_messages(obj, unknown_roles)
    turns = answer_turns(msgs)
    if stats is not None:
        stats.dropped_messages += dropped + (len(msgs) - turns[-1] - 1 if turns else 0)
    if not turns:
        raise _Empty
    return tuple(msgs[:turns[-1] + 1])


def answer_turns(messages: Sequence[Message]) -> list[int]:
    """Indices of the trainable assistant messages: those after the first non-assistant one
    (a conversation that opens with assistant messages keeps them as untrained context)."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), len(messages))
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first]


def _to_record(obj: Any, source: str, line: int, unknown_roles: str,
               stats: ReadStats | None) -> Record:
    if isinstance(obj, dict) and "text" in obj and not (
            {"conversations", "messages", "question"} & obj.keys()):
        if not isinstance(obj["text"], str):
            raise BadRecord("'text' must be a string")
        if not obj["text"].strip():
            raise _Empty
        return Record(source, line, text=obj["text"])
    return Record(source, line, messages=_messages(obj, unknown_roles, stats))


# A scan yields (byte offset, byte length, record) for every kept record.
_Scanned = tuple[int, int, Record]


class RecordScanner:
    """Streams the records of one file, applying the malformed / empty policy."""

    def __init__(self, path: Path, skip_malformed: bool, unknown_roles: str, stats: ReadStats):
        self.path, self.skip, self.roles, self.stats = path, skip_malformed, unknown_roles, stats
        self.source = str(path)

    def bad(self, line: int, why: str) -> None:
        """Count a malformed record, or raise if not skipping."""
        if not self.skip:
            raise MalformedRecordError(f"{self.source}:{line}: malformed record: {why}")
        self.stats.malformed += 1

    def convert(self, obj: Any, line: int) -> Record | None:
        if _has_surrogates(obj):
            self.bad(line, "not UTF-8 (an undecodable byte or a lone \\u surrogate escape)")
            return None
        try:
            rec = _to_record(obj, self.source, line, self.roles, self.stats)
        except BadRecord as e:
            self.bad(line, str(e))
            return None
        except _Empty:
            self.stats.empty += 1
            return None
        self.stats.examples += 1
        if rec.text is None:
            self.stats.chat += 1
        else:
            self.stats.text += 1
        return rec

    def scan(self) -> Iterator[_Scanned]:
        kind = file_kind(self.path)
        self.stats.files += 1
        if kind == "jsonl":
            yield from self._jsonl()
        elif kind == "json_array":
            yield from self._json_array()
        else:
            yield from self._text()

    def _jsonl(self) -> Iterator[_Scanned]:
        offset = 0
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                rec = self.convert_line(raw, lineno)
                if rec is not None:
                    yield start, len(raw), rec

    def convert_line(self, raw: bytes, lineno: int) -> Record | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.bad(lineno, f"not UTF-8 ({e.reason})")
            return None
        if not text.strip():
            return None
        try:
            obj = json.loads(text.lstrip("\ufeff"))
        except json.JSONDecodeError as e:
            self.bad(lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            return None
        return self.convert(obj, lineno)

    def _text(self) -> Iterator[_Scanned]:
        data = self.path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.bad(data.count(b"\n", 0, e.start) + 1, f"not UTF-8 text ({e.reason})")
            return
        if not text.strip():
            self.stats.empty += 1
            return
        self.stats.examples += 1
        self.stats.text += 1
        yield 0, len(data), Record(self.source, 1, text=text)

    def _json_array(self) -> Iterator[_Scanned]:
        """Record-by-record reader of a (possibly truncated) JSON array of objects. Bytes
        that are not UTF-8 are read as lone surrogates (``surrogateescape``): inside a
        record's strings they make that record malformed, elsewhere invalid JSON."""
        dec = json.JSONDecoder()
        with self.path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as f:
            buf, pos, eof = "", 0, False
            byte_pos, line = 0, 1  # byte offset and line of buf[pos]

            def more() -> bool:
                nonlocal buf, pos, eof
                if eof:
                    return False
                chunk = f.read(max(_CHUNK_CHARS, len(buf) - pos))
                if not chunk:
                    eof = True
                    return False
                buf, pos = buf[pos:] + chunk, 0
                return True

            def advance(new_pos: int) -> None:
                nonlocal pos, byte_pos, line
                seg = buf[pos:new_pos]
                byte_pos += len(seg.encode("utf-8", "surrogateescape"))
                line += seg.count("\n")
                pos = new_pos

            def skip_ws() -> bool:  # False at end of file
                while True:
                    advance(_WS.match(buf, pos).end())
                    if pos < len(buf):
                        return True
                    if not more():
                        return False

            more()
            if buf.startswith("\ufeff"):
                buf = buf[1:]
                byte_pos = 3
            if not skip_ws() or buf[pos] != "[":
                self.bad(line, "expected a JSON array")
                return
            advance(pos + 1)
            first = True
            while skip_ws():
                if buf[pos] == "]":
                    return
                if not first:
                    if buf[pos] != ",":
                        self.bad(line, f"expected ',' or ']' between records, got {buf[pos]!r}")
                        return  # no way to resynchronize inside an array
                    advance(pos + 1)
                    if not skip_ws():
                        return
                first = False
                if buf[pos] != "{":
                    self.bad(line, "array element is not a JSON object")
                    return
                while True:
                    try:
                        obj, end = dec.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:
                        # Incomplete buffer: a string running to its end, or an error at its end.
                        incomplete = (e.msg.startswith("Unterminated string")
                                      or len(buf[e.pos:].strip()) <= 16)
                        if incomplete and more():
                            continue
                        if incomplete:  # truncated tail of the file
                            self.stats.truncated += 1
                            return
                        self.bad(line + buf.count("\n", pos, e.pos),
                                 f"invalid JSON: {e.msg}")
                        return  # no way to resynchronize inside an array
                start, rec_line = byte_pos, line
                advance(end)
                rec = self.convert(obj, rec_line)
                if rec is not None:
                    yield start, byte_pos - start, rec


def _has_surrogates(obj: Any) -> bool:
    """Whether a decoded JSON value holds a lone surrogate (an undecodable byte, or a
    ``\\udXXX`` escape that is not a character) in any key or string."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


class Corpus:
    """Index of the examples in a set of files, with random access by example number.

    Building it scans every file once (validating every record); it keeps only a compact index
    (file, byte offset, byte length, line) and re-reads a record on ``corpus[i]``.
    """

    def __init__(self, paths: str | Path | Iterable[str | Path], *,
                 skip_malformed: bool = False,
                 unknown_roles: Literal["error", "skip"] = "error"):
        if unknown_roles not in ("error", "skip"):
            raise ValueError(f"unknown_roles must be 'error' or 'skip', got {unknown_roles!r}")
        self.paths = expand_paths(paths)
        self.skip_malformed, self.unknown_roles = skip_malformed, unknown_roles
        self.stats = ReadStats()
        self._kinds: list[str] = []
        file_ids, offsets, lengths, lines = array("i"), array("q"), array("q"), array("q")
        for fid, p in enumerate(self.paths):
            try:
                self._kinds.append(file_kind(p))
                scanner = RecordScanner(p, skip_malformed, unknown_roles, self.stats)
                for off, n, rec in scanner.scan():
                    file_ids.append(fid)
                    offsets.append(off)
                    lengths.append(n)
                    lines.append(rec.line)
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                raise FileNotFoundError(f"cannot read data file {p}: {e}") from e
        self._file = np.frombuffer(file_ids, np.int32) if file_ids else np.zeros(0, np.int32)
        self._offset = np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)
        self._length = np.frombuffer(lengths, np.int64) if lengths else np.zeros(0, np.int64)
        self._line = np.frombuffer(lines, np.int64) if lines else np.zeros(0, np.int64)
        if len(self) == 0:
            raise ValueError(f"no usable examples in {[str(p) for p in self.paths]} "
                             f"(read stats: {asdict(self.stats)})")

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, i: int) -> Record:
        """Record ``i`` (in file order), re-read from disk."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        fid = int(self._file[i])
        path, kind, line = self.paths[fid], self._kinds[fid], int(self._line[i])
        try:
            with path.open("rb") as f:
                f.seek(int(self._offset[i]))
                raw = f.read(int(self._length[i]))
        except OSError as e:
            raise FileNotFoundError(f"cannot read data file {path}: {e}") from e
        scanner = RecordScanner(path, False, self.unknown_roles, ReadStats())
        try:
            if kind == "text":
                return Record(str(path), 1, text=raw.decode("utf-8"))
            rec = scanner.convert_line(raw, line)
        except (MalformedRecordError, UnicodeDecodeError) as e:
            raise MalformedRecordError(f"{path}:{line}: record changed since indexing: {e}") from e
        if rec is None:
            raise MalformedRecordError(f"{path}:{line}: record changed since indexing")
        return rec

