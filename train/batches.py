"""Packing, anchors and batches: encoded examples packed into fixed-length sequences,
Orthrus anchors sampled per sequence, and per-process batches with exact resume.

Pipeline (all numpy, no JAX)::

    corpus = Corpus(["sharegpt.json", "gsm8k.jsonl", "stdlib/"], skip_malformed=True)
    it = BatchIterator(corpus, tokenizer, batch_size=128, seq_len=2048, block_size=32,
                       anchors_per_seq=256, anchors_on_assistant=True, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    for batch in it: ...             # Batch(tokens [b, L], assistant_mask, anchors [b, m], ...)
    state = it.state()               # small JSON-able dict; BatchIterator.from_state(...) resumes

Packing: examples are concatenated in a seeded shuffled order (a new permutation per epoch,
``epoch_order``) and cut into sequences of exactly ``seq_len`` tokens; an example may span
several sequences and consecutive epochs continue the same stream. No separator is inserted
besides what the template / EOS provides, and attention is not masked between examples.
``DataPosition`` (epoch, index in the epoch order, token offset in that example, global
sequence index) makes resume exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from train.chat import ChatEncoder, Example
from train.records import Corpus, MalformedRecordError

_SHUFFLE_SALT = 0x5EED_0001
_ANCHOR_SALT = 0x5EED_0002


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
