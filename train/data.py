"""Training data: read chat / GSM8K / plain-text files, tokenize them with an assistant mask,
pack them into fixed-length sequences, sample Orthrus anchors and yield per-process batches.

Pipeline (all numpy, no JAX)::

    corpus = Corpus(["sharegpt.json", "gsm8k.jsonl", "stdlib/"], skip_malformed=True)
    it = BatchIterator(corpus, tokenizer, batch_size=128, seq_len=2048, block_size=32,
                       anchors_per_seq=256, anchors_on_assistant=True, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    for batch in it: ...             # Batch(tokens [b, L], assistant_mask, anchors [b, m], ...)
    state = it.state()               # small JSON-able dict; BatchIterator.from_state(...) resumes

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

Tokenization (``ChatEncoder``): the tokenizer's chat template renders the conversation; the
assistant mask marks, for each assistant turn, the tokens after the rendering of the preceding
messages with ``add_generation_prompt=True`` up to and including the turn's end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, the EOS token, ...); tokens after it (ChatML's ``"\\n"``) are not
assistant tokens. Every such prefix rendering must be a token prefix of the next one and of the
full rendering, otherwise ``ChatTemplateError``. A tokenizer without a chat template can only
encode plain text (chat records raise ``ValueError``), unless ``chat_template=`` is given.
Plain text is ``tokenizer.encode(text, add_special_tokens=True)`` plus the EOS token.

Packing: examples are concatenated in a seeded shuffled order (a new permutation per epoch,
``epoch_order``) and cut into sequences of exactly ``seq_len`` tokens; an example may span
several sequences and consecutive epochs continue the same stream. No separator is inserted
besides what the template / EOS provides, and attention is not masked between examples.
``DataPosition`` (epoch, index in the epoch order, token offset in that example, global
sequence index) makes resume exact.
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
# Special tokens that end a chat turn in common templates (used when present in the vocab).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_CHUNK_CHARS = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_SHUFFLE_SALT = 0x5EED_0001
_ANCHOR_SALT = 0x5EED_0002

Message = dict[str, str]


class ChatTemplateError(ValueError):
    """The chat template does not render conversations prefix-consistently."""


class MalformedRecordError(ValueError):
    """A record that cannot be read or converted; the message names file and line."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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


class _Bad(Exception):
    """Internal: the reason a record is malformed (without file / line)."""


class _Empty(Exception):
    """Internal: a well-formed record without trainable content."""


def _file_kind(path: Path) -> str:
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


def _parse_messages(obj: Any, unknown_roles: str) -> tuple[list[Message], int]:
    """All normalized messages of one JSON record and the number of messages dropped for
    unknown roles (raises _Bad); ``_messages`` then trims them for training."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj[key]
        if not isinstance(turns, list):
            raise _Bad(f"'{key}' is not a list")
        msgs: list[Message] = []
        dropped = 0
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _Bad(f"{key}[{j}] is not an object")
            role = t.get("from", t.get("role"))
            content = t.get("value", t.get("content"))
            if not isinstance(role, str) or not isinstance(content, str):
                raise _Bad(f"{key}[{j}] needs string 'from'/'value' or 'role'/'content'")
            mapped = ROLE_ALIASES.get(role.lower())
            if mapped is None:
                if unknown_roles != "skip":
                    raise _Bad(f"{key}[{j}] has unknown role {role!r}")
                dropped += 1
                continue
            msgs.append({"role": mapped, "content": content})
    elif "question" in obj and "answer" in obj:
        q, a = obj["question"], obj["answer"]
        if not isinstance(q, str) or not isinstance(a, str):
            raise _Bad("'question' and 'answer' must be strings")
        msgs, dropped = [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 0
    else:
        raise _Bad("unrecognized record: expected 'conversations', 'messages', "
                    "'question'+'answer' or 'text'")
    return msgs, dropped


def _messages(obj: Any, unknown_roles: str, stats: ReadStats | None) -> tuple[Message, ...]:
    """Normalized messages of one JSON record, up to its last trainable assistant message
    (raises _Bad / _Empty)."""
    msgs, dropped = _parse_messages(obj, unknown_roles)
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
            raise _Bad("'text' must be a string")
        if not obj["text"].strip():
            raise _Empty
        return Record(source, line, text=obj["text"])
    return Record(source, line, messages=_messages(obj, unknown_roles, stats))


# A scan yields (byte offset, byte length, record) for every kept record.
_Scanned = tuple[int, int, Record]


class _Scanner:
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
        try:
            rec = _to_record(obj, self.source, line, self.roles, self.stats)
        except _Bad as e:
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
        kind = _file_kind(self.path)
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
        """Record-by-record reader of a (possibly truncated) JSON array of objects."""
        dec = json.JSONDecoder()
        with self.path.open("r", encoding="utf-8", newline="") as f:
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
                byte_pos += len(seg.encode("utf-8"))
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


def read_records(paths: str | Path | Iterable[str | Path], *, skip_malformed: bool = False,
                 unknown_roles: Literal["error", "skip"] = "error",
                 stats: ReadStats | None = None) -> Iterator[Record]:
    """Stream the records of ``paths`` in file order, one at a time (see module docstring).

    Raises ``MalformedRecordError`` (a ``ValueError`` naming file and line) on a malformed record
    unless ``skip_malformed``; skipped records are counted in ``stats``.
    """
    stats = ReadStats() if stats is None else stats
    for p in expand_paths(paths):
        try:
            scanner = _Scanner(p, skip_malformed, unknown_roles, stats)
            yield from (rec for _, _, rec in scanner.scan())
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise FileNotFoundError(f"cannot read data file {p}: {e}") from e


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
                self._kinds.append(_file_kind(p))
                scanner = _Scanner(p, skip_malformed, unknown_roles, self.stats)
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
        scanner = _Scanner(path, False, self.unknown_roles, ReadStats())
        try:
            if kind == "text":
                return Record(str(path), 1, text=raw.decode("utf-8"))
            rec = scanner.convert_line(raw, line)
        except (MalformedRecordError, UnicodeDecodeError) as e:
            raise MalformedRecordError(f"{path}:{line}: record changed since indexing: {e}") from e
        if rec is None:
            raise MalformedRecordError(f"{path}:{line}: record changed since indexing")
        return rec


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A tokenized example: ``tokens [n] int32`` and ``assistant_mask [n] bool``."""

    tokens: np.ndarray
    assistant_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


class ChatEncoder:
    """Tokenizes records with a ``transformers`` tokenizer and its chat template.

    ``encode_many`` renders a list of records and tokenizes all renderings in one batched
    tokenizer call (multi-threaded in ``tokenizers``); the result is identical to encoding the
    records one by one.

    Args:
      tokenizer: a ``transformers`` tokenizer, or a path for ``AutoTokenizer.from_pretrained``.
      chat_template: overrides the tokenizer's template.
      chat_template_kwargs: extra template variables (e.g. ``{"enable_thinking": False}``).
      end_of_turn_tokens: tokens that close an assistant turn; default: EOS plus those of
        ``END_OF_TURN_TOKENS`` in the vocabulary.
      text_end_token: appended to plain documents (default EOS; None for nothing).
    """

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 end_of_turn_tokens: Sequence[str] | None = None,
                 text_end_token: str | None = "eos"):
        if isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        vocab = tokenizer.get_vocab()
        eos = getattr(tokenizer, "eos_token", None)
        if end_of_turn_tokens is None:
            end_of_turn_tokens = [t for t in (eos, *END_OF_TURN_TOKENS) if t in vocab]
        missing = [t for t in end_of_turn_tokens if t not in vocab]
        if missing:
            raise ValueError(f"end-of-turn tokens not in the vocabulary: {missing}")
        self.end_of_turn_ids = np.array(sorted({vocab[t] for t in end_of_turn_tokens}), np.int64)
        if text_end_token == "eos":
            text_end_token = eos
        if text_end_token is not None and text_end_token not in vocab:
            raise ValueError(f"text_end_token {text_end_token!r} not in the vocabulary")
        self.text_end_id = None if text_end_token is None else vocab[text_end_token]

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=self.chat_template, **self.chat_template_kwargs)

    def _tokenize(self, texts: list[str], special: bool) -> list[list[int]]:
        """Token ids of ``texts`` (one batched call); ``special``: add BOS etc."""
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"])

    def _chat_texts(self, messages: Sequence[Message], where: str) -> list[str]:
        """[full rendering, rendering before each assistant turn with a generation prompt]."""
        from jinja2 import TemplateError

        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template, so it cannot encode "
                             "conversations: pass chat_template= (plain text needs none)")
        turns = answer_turns(messages)
        if not turns:
            raise ValueError(f"{where}conversation has no assistant message after a prompt")
        try:
            return [self._render(messages[:turns[-1] + 1], False),
                    *(self._render(messages[:i], True) for i in turns)]
        except TemplateError as e:
            raise MalformedRecordError(f"{where}chat template error: {e}") from e

    def _chat_example(self, messages: Sequence[Message], ids: list[list[int]],
                      where: str) -> Example:
        """Mask the assistant turns, given the token ids of ``_chat_texts``."""
        full, prefixes = np.asarray(ids[0], np.int64), ids[1:]
        turns = answer_turns(messages)
        mask = np.zeros(len(full), bool)
        ends = [len(p) for p in prefixes[1:]] + [len(full)]
        prev_end = 0
        for k, (i, prefix) in enumerate(zip(turns, prefixes, strict=True)):
            start = len(prefix)
            if start < prev_end or start > len(full) or not np.array_equal(full[:start], prefix):
                raise ChatTemplateError(
                    f"{where}chat template is not prefix-consistent: the rendering of the "
                    f"{i} messages before assistant turn {k} with add_generation_prompt=True is "
                    "not a token prefix of the full conversation")
            hits = np.flatnonzero(np.isin(full[start:ends[k]], self.end_of_turn_ids))
            if len(hits):
                end = start + int(hits[0]) + 1
            else:  # template without end-of-turn token: the turn's own rendering ends it
                own = self._tokenize([self._render(messages[:i + 1], False)], False)[0]
                if len(own) < start or not np.array_equal(full[:len(own)], own):
                    raise ChatTemplateError(
                        f"{where}chat template is not prefix-consistent: the rendering up to "
                        f"assistant turn {k} is not a token prefix of the full conversation")
                end = len(own)
            mask[start:end] = True
            prev_end = end
        return Example(full.astype(np.int32), mask)

    def _text_example(self, ids: list[int]) -> Example:
        if self.text_end_id is not None and (not ids or ids[-1] != self.text_end_id):
            ids = [*ids, self.text_end_id]
        tokens = np.asarray(ids, np.int32)
        return Example(tokens, np.ones(len(tokens), bool))

    def encode_many(self, records: Sequence[Record], *, return_errors: bool = False
                    ) -> list[Example | MalformedRecordError]:
        """Examples of ``records``; a record the template rejects raises
        ``MalformedRecordError`` (or, with ``return_errors``, has it in its place).
        ``ChatTemplateError`` (template not prefix-consistent) is always raised."""
        out: list[Example | MalformedRecordError | None] = [None] * len(records)
        chat: list[tuple[int, str, int, int]] = []  # (record, where, first text, text count)
        texts: list[str] = []
        docs = [j for j, r in enumerate(records) if r.text is not None]
        for j, rec in enumerate(records):
            if rec.messages is None:
                continue
            where = f"{rec.source}:{rec.line}: "
            try:
                rendered = self._chat_texts(rec.messages, where)
            except MalformedRecordError as e:
                if not return_errors:
                    raise
                out[j] = e
                continue
            chat.append((j, where, len(texts), len(rendered)))
            texts += rendered
        ids = self._tokenize(texts, False)
        for j, where, first, count in chat:
            msgs = records[j].messages
            assert msgs is not None
            out[j] = self._chat_example(msgs, ids[first:first + count], where)
        doc_ids = self._tokenize([records[j].text or "" for j in docs], True)
        for j, d in zip(docs, doc_ids, strict=True):
            out[j] = self._text_example(d)
        return out  # type: ignore[return-value]

    def encode(self, record: Record) -> Example:
        """Tokens and assistant mask of one record (see ``encode_many``)."""
        ex = self.encode_many([record])[0]
        assert isinstance(ex, Example)
        return ex

    def encode_messages(self, messages: Sequence[Message]) -> Example:
        """Tokens of the rendered conversation and the mask of its assistant turns."""
        return self.encode(Record("<messages>", 0, messages=tuple(messages)))

    def encode_text(self, text: str) -> Example:
        """A plain document: all tokens (and the end token) are trainable."""
        return self.encode(Record("<text>", 0, text=text))


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPosition:
    """Where the packed stream stands: the next token is token ``offset`` of example
    ``epoch_order(...)[index]`` of ``epoch``; the next sequence has global index ``sequence``."""

    epoch: int = 0
    index: int = 0
    offset: int = 0
    sequence: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        try:
            pos = cls(**{k: int(d[k]) for k in ("epoch", "index", "offset", "sequence")})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad data position {d!r}: {e}") from e
        if min(pos.epoch, pos.index, pos.offset, pos.sequence) < 0:
            raise ValueError(f"bad data position {d!r}: negative field")
        return pos


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Example order ``[num_examples] int64`` of one epoch (a seeded permutation)."""
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng([seed, _SHUFFLE_SALT, epoch])
    return rng.permutation(num_examples)


class SequencePacker:
    """Yields packed sequences ``(tokens [seq_len] int32, assistant_mask [seq_len] bool)``.

    ``position`` is the position after the last yielded sequence; a packer started there
    yields exactly what this one yields next. Stops after ``num_epochs`` epochs (None: never),
    dropping the last partial sequence. Examples are tokenized ``lookahead`` at a time (one
    batched tokenizer call); this does not change the output.
    """

    def __init__(self, corpus: Corpus, encoder: ChatEncoder, *, seq_len: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 position: DataPosition | None = None, lookahead: int = 64):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if corpus.stats.chat and not encoder.chat_template:
            raise ValueError("the data has conversations but the tokenizer has no chat template:"
                             " pass chat_template= to ChatEncoder")
        self.corpus, self.encoder, self.seq_len = corpus, encoder, seq_len
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.lookahead = max(1, lookahead)
        pos = position or DataPosition()
        if pos.index > len(corpus) or (pos.index == len(corpus) and pos.offset):
            raise ValueError(f"position {pos} is beyond the {len(corpus)} examples of the corpus")
        self._epoch, self._index, self._offset, self._sequence = (
            pos.epoch, pos.index, pos.offset, pos.sequence)
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)
        self._example: Example | None = None
        self._cache: dict[tuple[int, int], Example | MalformedRecordError] = {}
        self.template_errors = 0  # examples skipped (skip_malformed) for chat-template errors

    @property
    def position(self) -> DataPosition:
        epoch, index = self._epoch, self._index
        if index >= len(self.corpus):
            epoch, index = epoch + 1, 0
        return DataPosition(epoch, index, self._offset, self._sequence)

    def _load(self) -> Example:
        """Example at the current position; encodes ``lookahead`` examples at a time."""
        key = (self._epoch, self._index)
        if key not in self._cache:
            if self._order_epoch != self._epoch:
                self._order = epoch_order(len(self.corpus), self.seed, self._epoch,
                                          self.shuffle)
                self._order_epoch = self._epoch
            idx = self._order[self._index:self._index + self.lookahead].tolist()
            done = self.encoder.encode_many([self.corpus[i] for i in idx],
                                            return_errors=self.corpus.skip_malformed)
            self._cache = {(self._epoch, self._index + j): ex for j, ex in enumerate(done)}
        ex = self._cache.pop(key)
        if isinstance(ex, MalformedRecordError):
            self.template_errors += 1
            ex = Example(np.zeros(0, np.int32), np.zeros(0, bool))
        if self._offset > len(ex):
            raise ValueError(f"position offset {self._offset} beyond the example at {key} "
                             f"({len(ex)} tokens): different data or tokenizer?")
        return ex

    def __iter__(self) -> SequencePacker:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        n, L = len(self.corpus), self.seq_len
        tokens, mask = np.empty(L, np.int32), np.empty(L, bool)
        filled, empty_run = 0, 0
        state = (self._epoch, self._index, self._offset, self._example)
        while filled < L:
            if self._index >= n:
                self._epoch, self._index, self._offset = self._epoch + 1, 0, 0
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                self._epoch, self._index, self._offset, self._example = state
                raise StopIteration
            if self._example is None:
                self._example = self._load()
            ex = self._example
            take = min(L - filled, len(ex) - self._offset)
            tokens[filled:filled + take] = ex.tokens[self._offset:self._offset + take]
            mask[filled:filled + take] = ex.assistant_mask[self._offset:self._offset + take]
            filled += take
            self._offset += take
            empty_run = empty_run + 1 if len(ex) == 0 else 0
            if empty_run >= n:
                raise ValueError("the data has no tokens at all")
            if self._offset >= len(ex):
                self._index, self._offset, self._example = self._index + 1, 0, None
        self._sequence += 1
        return tokens, mask


# --------------------------------------------------------------------------------------------
# Anchors and batches
# --------------------------------------------------------------------------------------------


def anchor_candidates(assistant_mask: np.ndarray, block_size: int,
                      on_assistant: bool = False) -> np.ndarray:
    """The positions ``a`` that may anchor a block in a sequence of ``len(assistant_mask)``
    tokens: ``1 <= a <= L - block_size``, and with ``on_assistant`` only where
    ``assistant_mask[a + 1]``."""
    cand = np.arange(1, len(assistant_mask) - block_size + 1)
    return cand[assistant_mask[cand + 1]] if on_assistant else cand


def sample_anchors(assistant_mask: np.ndarray, *, block_size: int, num_anchors: int, seed: int,
                   sequence_index: int, on_assistant: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Anchors of one sequence: ``(anchors [m] int32 ascending, anchor_mask [m] bool)``.

    Sampled without replacement, uniformly among ``1 <= a <= L - block_size``; with
    ``on_assistant`` only where ``assistant_mask[a + 1]`` (the first drafted token is an answer
    token, so the last prompt token anchors the first answer token and no anchor drafts past
    the end-of-turn token). If fewer than ``m`` positions are eligible, all are taken and the
    remaining slots are 0 with ``anchor_mask`` False. The draw depends only on
    ``(seed, sequence_index)``.
    """
    cand = anchor_candidates(assistant_mask, block_size, on_assistant)
    k = min(num_anchors, len(cand))
    rng = np.random.default_rng([seed, _ANCHOR_SALT, sequence_index])
    anchors = np.zeros(num_anchors, np.int32)
    anchors[:k] = np.sort(cand[rng.choice(len(cand), size=k, replace=False)])
    valid = np.arange(num_anchors) < k
    return anchors, valid


@dataclass(frozen=True)
class Batch:
    """This process's rows of one global batch (b = batch_size / process_count)."""

    tokens: np.ndarray  # [b, L] int32
    assistant_mask: np.ndarray  # [b, L] bool
    anchors: np.ndarray  # [b, m] int32, ascending where valid
    anchor_mask: np.ndarray  # [b, m] bool


# State fields that must match on resume (they change the token stream).
_STREAM_KEYS = ("seed", "seq_len", "shuffle", "num_examples")


@dataclass
class _Config:
    batch_size: int
    seq_len: int
    block_size: int
    anchors_per_seq: int
    seed: int = 0
    anchors_on_assistant: bool = False
    shuffle: bool = True
    num_epochs: int | None = None


class BatchIterator:
    """Global batches of ``batch_size`` packed sequences; yields this process's rows.

    Every process packs the whole global batch (so it is identical whatever the process
    count) and keeps rows ``[process_index * b, (process_index + 1) * b)``, b = batch_size /
    process_count. ``state()`` is the position after the last yielded batch; it is the same on
    every process and may be restored with another process count or batch size. A packed
    sequence with no possible anchor (with ``anchors_on_assistant``: no answer token to
    draft) is skipped and counted in ``skipped_sequences``, so no row trains on nothing.
    """

    def __init__(self, corpus: Corpus, tokenizer: Any, *, batch_size: int, seq_len: int,
                 block_size: int, anchors_per_seq: int, seed: int = 0,
                 anchors_on_assistant: bool = False, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 position: DataPosition | dict[str, Any] | None = None, lookahead: int = 64):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if seq_len < block_size + 1:
            raise ValueError(f"seq_len ({seq_len}) must be >= block_size + 1 ({block_size + 1}) "
                             "so that at least one anchor 1 <= a <= seq_len - block_size exists")
        if anchors_per_seq < 1:
            raise ValueError(f"anchors_per_seq must be >= 1, got {anchors_per_seq}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index ({process_index}) < process_count "
                             f"({process_count})")
        if batch_size % process_count:
            raise ValueError(f"batch_size ({batch_size}) is not divisible by process_count "
                             f"({process_count})")
        encoder = tokenizer if isinstance(tokenizer, ChatEncoder) else ChatEncoder(tokenizer)
        if isinstance(position, dict):
            position = DataPosition.from_dict(position)
        self.corpus, self.encoder = corpus, encoder
        self.config = _Config(batch_size, seq_len, block_size, anchors_per_seq, seed,
                              anchors_on_assistant, shuffle, num_epochs)
        self.process_index, self.process_count = process_index, process_count
        self.packer = SequencePacker(corpus, encoder, seq_len=seq_len, seed=seed,
                                     shuffle=shuffle, num_epochs=num_epochs, position=position,
                                     lookahead=lookahead)
        self._position = self.packer.position
        self.skipped_sequences = 0  # packed sequences with no possible anchor, not trained on

    @property
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.process_count

    @property
    def position(self) -> DataPosition:
        """Position after the last yielded batch."""
        return self._position

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        c, b = self.config, self.local_batch_size
        lo = self.process_index * b
        rows = []  # (sequence index, tokens, assistant mask)
        while len(rows) < c.batch_size:
            index = self.packer.position.sequence
            tokens, mask = next(self.packer)
            if not len(anchor_candidates(mask, c.block_size, c.anchors_on_assistant)):
                self.skipped_sequences += 1  # e.g. all prompt text, with anchors_on_assistant
                continue
            rows.append((index, tokens, mask))
        rows = rows[lo:lo + b]
        tokens = np.stack([t for _, t, _ in rows])
        mask = np.stack([m for _, _, m in rows])
        anchors = np.zeros((b, c.anchors_per_seq), np.int32)
        valid = np.zeros((b, c.anchors_per_seq), bool)
        for r, (index, _, m) in enumerate(rows):
            anchors[r], valid[r] = sample_anchors(
                m, block_size=c.block_size, num_anchors=c.anchors_per_seq, seed=c.seed,
                sequence_index=index, on_assistant=c.anchors_on_assistant)
        self._position = self.packer.position
        return Batch(tokens, mask, anchors, valid)

    def state(self) -> dict[str, Any]:
        """JSON-able resume state: the position after the last batch and the configuration."""
        c = self.config
        return {"position": self._position.to_dict(), "num_examples": len(self.corpus),
                "batch_size": c.batch_size, "seq_len": c.seq_len, "block_size": c.block_size,
                "anchors_per_seq": c.anchors_per_seq, "seed": c.seed,
                "anchors_on_assistant": c.anchors_on_assistant, "shuffle": c.shuffle,
                "num_epochs": c.num_epochs}

    @classmethod
    def from_state(cls, state: dict[str, Any], corpus: Corpus, tokenizer: Any,
                   **overrides: Any) -> BatchIterator:
        """Resume from ``state()``; ``overrides`` may change anything that does not alter the
        token stream (batch size, process split, anchors, num_epochs)."""
        kwargs = {k: state[k] for k in ("batch_size", "seq_len", "block_size", "anchors_per_seq",
                                        "seed", "anchors_on_assistant", "shuffle", "num_epochs")}
        for k in _STREAM_KEYS:
            have = len(corpus) if k == "num_examples" else overrides.get(k, state[k])
            if have != state[k]:
                raise ValueError(f"cannot resume: {k} is {have!r}, the saved state has "
                                 f"{state[k]!r}")
        kwargs.update(overrides)
        return cls(corpus, tokenizer, position=DataPosition.from_dict(state["position"]),
                   **kwargs)
