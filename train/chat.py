"""The chat encoder: records to tokens plus the mask of the assistant tokens.

:class:`ChatEncoder` renders a conversation with the tokenizer's chat template; the assistant
mask marks, for each assistant turn, the tokens after the rendering of the preceding messages
with ``add_generation_prompt=True`` up to and including the turn's end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, the EOS token, ...); tokens after it (ChatML's ``"\\n"``) are not
assistant tokens. Every such prefix rendering must be a token prefix of the next one and of the
full rendering, otherwise ``ChatTemplateError``. A tokenizer without a chat template can only
encode plain text (chat records raise ``ValueError``), unless ``chat_template=`` is given.
Plain text is ``tokenizer.encode(text, add_special_tokens=True)`` plus the EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.records import MalformedRecordError, Message, Record, answer_turns

# Special tokens that end a chat turn in common templates (used when present in the vocab).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class ChatTemplateError(ValueError):
    """The chat template does not render conversations prefix-consistently."""


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
