"""The server's text side (``infer.serve.text``): incremental detokenization equals
decoding the whole answer, for a byte-level BPE (multi-byte characters split across
tokens) and a SentencePiece-style tokenizer (a leading space dropped at the start), with
tokens arriving a few at a time; each step decodes a short window, never the whole answer;
stop strings and hold-back across pieces."""

from __future__ import annotations

import numpy as np
import pytest

from infer.serve.text import IncrementalDetokenizer, TextStream, holdback
from tests.hf_reference import tiny_chat_tokenizer

TEXTS = ["Hello world, how are you?", "naïve café — 10 € each; 漢字 and 😀 emoji!",
         "  leading spaces\nand\n\nnew lines\tand tabs", "€€€ ùùù 😀😀"]


def _metaspace_tokenizer():
    """A small SentencePiece-style BPE (``▁`` for spaces, the first one dropped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *bytes_])
    tok.train_from_iterator(TEXTS * 5 + ["the cat sat on the mat"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return tiny_chat_tokenizer() if request.param == "byte-level" else _metaspace_tokenizer()


def test_pieces_concatenate_to_the_whole_decoding(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = np.random.default_rng(0)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(5):
            detok = IncrementalDetokenizer(decode)
            pieces, i = [], 0
            while i < len(ids):
                n = int(rng.integers(1, 4))
                piece = detok.add(ids[i:i + n])
                assert "\ufffd" not in piece, (text, piece)  # never half a character
                pieces.append(piece)
                i += n
            pieces.append(detok.flush())
            assert "".join(pieces) == decode(ids) == detok.text, text


def test_each_step_decodes_a_short_window():
    windows = []

    def decode(ids):
        windows.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)
    detok = IncrementalDetokenizer(decode)
    for i in range(0, 2000, 3):
        detok.add(list(range(i, i + 3)))
    assert len(detok.text) == 2001 - 2000 % 3 + 2 and max(windows) <= 6


def test_an_incomplete_character_waits_and_is_flushed_at_the_end():
    # byte-level: "€" is three bytes; feed its ids one at a time
    tok = tiny_chat_tokenizer()
    ids = tok.encode("a€", add_special_tokens=False)
    assert len(ids) >= 3  # split across tokens in this small vocabulary
    detok = IncrementalDetokenizer(lambda x: tok.decode(x))
    assert detok.add(ids[:1]) == "a" and detok.add(ids[1:2]) == ""
    rest = "".join(detok.add([i]) for i in ids[2:])
    assert rest == "€"
    half = IncrementalDetokenizer(lambda x: tok.decode(x))
    assert half.add(ids[:2]) == ""  # "a" and half a character: wait for the rest
    assert half.flush() == "a\ufffd"  # the end: as decoded


def _chars(ids):
    return "".join(chr(i) for i in ids)


def test_a_stop_string_across_pieces_ends_the_text_before_it():
    ts = TextStream(_chars, ["c|d"])
    out = []
    for part in ("ab", "c", "|", "de"):
        piece, stopped = ts.add([ord(c) for c in part])
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == "ab" and stopped
    assert out[1] == ""  # "c" could begin the stop string: held back


def test_held_back_text_is_sent_when_it_cannot_be_a_stop_or_at_the_end():
    ts = TextStream(_chars, ["xyz"])
    assert ts.add([ord("a"), ord("x")]) == ("a", False)
    assert ts.add([ord("b")]) == ("xb", False)
    assert ts.add([ord("x"), ord("y")]) == ("", False)
    assert ts.add([], last=True) == ("xy", False)
    assert TextStream(_chars).add([ord("q")]) == ("q", False)  # no stops: nothing held


def test_holdback_counts_a_stop_prefix_or_a_replacement_character():
    assert holdback("hello wor", ["world"]) == 3
    assert holdback("hello", ["xyz"]) == 0
    assert holdback("ab\ufffd", []) == 1
