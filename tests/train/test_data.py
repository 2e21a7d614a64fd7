"""Training data pipeline (``train.records``, ``train.chat``, ``train.batches``): reading,
assistant masks, packing, resume, process split, anchors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from tests.convert.gguf_fixtures import CHATML_TEMPLATE
from tests.hf_reference import tiny_chat_tokenizer
from train import records
from train.batches import (
    Batch,
    BatchIterator,
    DataPosition,
    SequencePacker,
    anchor_candidates,
    epoch_order,
    sample_anchors,
)
from train.chat import ChatEncoder, ChatTemplateError
from train.records import Corpus, MalformedRecordError, Record

# SmolLM2-style ChatML: injects a default system prompt when the first message is not one.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a cat<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3-style: only the last assistant message gets an (empty) think block, so the rendering
# up to an earlier assistant turn is not a prefix of the full conversation.
THINK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)
COUNTING_TEMPLATE = "{{ messages|length }}" + CHATML_TEMPLATE  # not prefix-consistent

SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello world"},
        {"from": "gpt", "value": "the cat is here"},
        {"from": "human", "value": "and the apples?"},
        {"from": "chatgpt", "value": "apples as usual ü 42"}]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "what is 42?"},
        {"from": "bing", "value": "the answer, or the world?"}]},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hello user, the world is here."}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                  {"role": "user", "content": "b"}, {"role": "assistant", "content": "c d e"}]},
]
GSM8K = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>"
                                                        f"{2 * i}\n#### {2 * i}"}
         for i in range(6)]
TEXT = "def f(x):\n    return x * 42  # the world\n"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_chat_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_truncated_array(path: Path, rows: list) -> Path:
    """A pretty-printed JSON array cut off inside the record after ``rows``."""
    text = json.dumps(rows + [{"id": "cut", "conversations": [
        {"from": "human", "value": "this record is cut off somewhere in the middle"}]}],
        indent=2, ensure_ascii=False)
    path.write_text(text[:-60], encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "f.py").write_text(TEXT, encoding="utf-8")
    return {
        "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT),
        "messages": write_jsonl(tmp_path / "messages.jsonl", MESSAGES),
        "gsm8k": write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K),
        "array": write_truncated_array(tmp_path / "sharegpt_v3.json", SHAREGPT + MESSAGES[:1]),
        "code": tmp_path / "code",
    }


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def answers(rec: Record) -> list[str]:
    assert rec.messages is not None
    return [m["content"] for m in rec.messages if m["role"] == "assistant"]


def all_records(corpus: Corpus) -> list[Record]:
    return [corpus[i] for i in range(len(corpus))]


def make_iter(corpus, tokenizer, **kw) -> BatchIterator:
    args = {"batch_size": 4, "seq_len": 24, "block_size": 4, "anchors_per_seq": 5, "seed": 0}
    args.update(kw)
    return BatchIterator(corpus, tokenizer, **args)


# ---------------------------------------------------------------------------- reading + masks


def test_reads_every_format(files):
    corpus = Corpus(list(files.values()))
    stats, recs = corpus.stats, all_records(corpus)
    assert stats.truncated == 1 and stats.malformed == 0
    assert stats.examples == len(recs) == 2 + 2 + 6 + 3 + 1
    assert stats.chat == 13 and stats.text == 1 and stats.files == 5
    assert recs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in recs[0].messages] == [
        "system", "user", "assistant", "user", "assistant"]
    assert answers(recs[1]) == ["the answer, or the world?"]
    assert recs[4].messages == ({"role": "user", "content": GSM8K[0]["question"]},
                                {"role": "assistant", "content": GSM8K[0]["answer"]})
    array_recs = [r for r in recs if r.source == str(files["array"])]
    starts = [i for i, line in enumerate(files["array"].read_text().splitlines(), 1)
              if line == "  {"]  # each record's "{" (the last one is the truncated record)
    assert [r.line for r in array_recs] == starts[:-1]
    assert [r.messages for r in array_recs] == [r.messages for r in recs[:3]]
    assert recs[-1].text == TEXT and recs[-1].source.endswith("f.py")


def test_corpus_does_not_depend_on_read_chunks(files, monkeypatch):
    want = all_records(Corpus(list(files.values())))
    monkeypatch.setattr(records, "_CHUNK_CHARS", 7)  # records span many chunks
    corpus = Corpus(list(files.values()))
    assert all_records(corpus) == want
    with pytest.raises(IndexError):
        corpus[len(corpus)]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOL_TEMPLATE, THINK_TEMPLATE])
def test_assistant_mask_is_exactly_the_answers(files, tokenizer, template):
    enc = ChatEncoder(tokenizer, chat_template=template)
    for rec in all_records(Corpus(list(files.values()))):
        ex = enc.encode(rec)
        assert ex.tokens.dtype == np.int32 and ex.assistant_mask.dtype == bool
        pieces = [tokenizer.decode(ex.tokens[a:b]) for a, b in runs(ex.assistant_mask)]
        if rec.text is not None:
            assert ex.assistant_mask.all() and pieces == [rec.text + "<|im_end|>"]
            continue
        want = [a + "<|im_end|>" for a in answers(rec)]
        if template is THINK_TEMPLATE:
            want[-1] = "<think></think>" + want[-1]
        # An empty answer is just <|im_end|>, adjacent to nothing else: runs stay separate.
        assert pieces == want, rec
        assert tokenizer.decode(ex.tokens) == tokenizer.apply_chat_template(
            list(rec.messages), tokenize=False, chat_template=template)


def test_encode_many_matches_single_and_apply_chat_template(files, tokenizer):
    enc = ChatEncoder(tokenizer)
    recs = all_records(Corpus(list(files.values())))
    many = enc.encode_many(recs)
    for rec, ex in zip(recs, many, strict=True):
        one = enc.encode(rec)
        np.testing.assert_array_equal(one.tokens, ex.tokens)
        np.testing.assert_array_equal(one.assistant_mask, ex.assistant_mask)
        if rec.messages is not None:
            ids = tokenizer.apply_chat_template(list(rec.messages), tokenize=True,
                                                return_dict=False)
            assert ex.tokens.tolist() == list(ids)


def test_template_errors(files, tokenizer):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
                 "{% endif %}" + CHATML_TEMPLATE)
    enc = ChatEncoder(tokenizer, chat_template=no_system)
    corpus = Corpus(files["sharegpt"])  # record 1 (line 1) has a system message
    with pytest.raises(MalformedRecordError, match=r"sharegpt\.jsonl:1: .*no system"):
        list(SequencePacker(corpus, enc, seq_len=8, shuffle=False, num_epochs=1))
    corpus = Corpus(files["sharegpt"], skip_malformed=True)
    packer = SequencePacker(corpus, enc, seq_len=8, shuffle=False, num_epochs=1)
    got = np.concatenate([t for t, _ in packer])
    want = enc.encode(corpus[1]).tokens
    np.testing.assert_array_equal(got, want[:len(want) // 8 * 8])
    assert packer.template_errors == 1


def test_template_without_end_token_uses_turn_rendering(tokenizer):
    enc = ChatEncoder(tokenizer, chat_template=PLAIN_TEMPLATE)
    ex = enc.encode_messages([{"role": "user", "content": "Hello"},
                              {"role": "assistant", "content": "the cat"},
                              {"role": "user", "content": "apples"},
                              {"role": "assistant", "content": "42"}])
    pieces = [tokenizer.decode(ex.tokens[a:b]) for a, b in runs(ex.assistant_mask)]
    assert pieces == ["the cat\n\n", "42\n\n"]


def test_prefix_inconsistent_template_is_an_error(tokenizer):
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "the world"}]
    enc = ChatEncoder(tokenizer, chat_template=COUNTING_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="prefix-consistent"):
        enc.encode_messages(msgs)
    # The generation prompt's trailing space merges with the answer's first word ("Ġthe").
    enc = ChatEncoder(tokenizer, chat_template=PLAIN_TEMPLATE.replace(":\n", ": "))
    with pytest.raises(ChatTemplateError, match="prefix-consistent"):
        enc.encode_messages(msgs)


def test_no_chat_template(files, tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                   eos_token="<|im_end|>")
    assert not bare.chat_template
    with pytest.raises(ValueError, match="no chat template"):
        make_iter(Corpus(files["gsm8k"]), bare)
    batch = next(make_iter(Corpus(files["code"]), bare, batch_size=1, seq_len=8))
    assert batch.assistant_mask.all()


def test_roles_and_empty_conversations(tmp_path, tokenizer):
    rows = [
        {"conversations": [{"from": "gpt", "value": "leading"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}, {"from": "human", "value": "tail"}]},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"},
                           {"from": "gpt", "value": "a"}]},
        {"text": "   "},
        {"text": "a document"},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(MalformedRecordError, match=r"r\.jsonl:3: .*unknown role 'tool'"):
        Corpus(path)
    corpus = Corpus(path, unknown_roles="skip")
    s = corpus.stats
    assert (s.examples, s.empty, s.dropped_messages, s.malformed) == (3, 2, 2, 0)
    assert corpus[0].messages == ({"role": "assistant", "content": "leading"},
                                  {"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"})
    assert corpus[2].text == "a document"
    ex = ChatEncoder(tokenizer).encode(corpus[0])  # the opening answer is context only
    assert [tokenizer.decode(ex.tokens[a:b]) for a, b in runs(ex.assistant_mask)] == [
        "a<|im_end|>"]
    only_answers = write_jsonl(tmp_path / "o.jsonl", [
        {"conversations": [{"from": "gpt", "value": "x"}]}, GSM8K[0]])
    assert Corpus(only_answers).stats.empty == 1


# ---------------------------------------------------------------------------- malformed input


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GSM8K[0]), "", "{not json", json.dumps({"foo": 1}),
             json.dumps({"question": 3, "answer": "x"}), json.dumps(GSM8K[1]), "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed record: invalid JSON"):
        Corpus(path)
    corpus = Corpus(path, skip_malformed=True)
    assert (len(corpus), corpus.stats.malformed) == (2, 4)
    assert corpus[1].messages[0]["content"] == GSM8K[1]["question"]

    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*not UTF-8"):
        Corpus(path)

    txt = tmp_path / "bin.txt"
    txt.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(ValueError, match=r"bin\.txt:2: .*not UTF-8"):
        Corpus(txt)


def test_malformed_json_array(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": oops},\n  {"text": "three"}\n]\n')
    with pytest.raises(ValueError, match=r"arr\.json:3: malformed record: invalid JSON"):
        Corpus(path)
    corpus = Corpus(path, skip_malformed=True)  # no resync inside an array: file ends there
    assert (len(corpus), corpus.stats.malformed, corpus.stats.truncated) == (1, 1, 0)
    path.write_text('[{"text": "one"}, {"messages": 5}, {"text": "three"}]')
    corpus = Corpus(path, skip_malformed=True)  # valid JSON, bad schema: only it is skipped
    assert [corpus[i].text for i in range(len(corpus))] == ["one", "three"]
    path.write_text('[{"text": "one"}, 7]')
    with pytest.raises(ValueError, match=r"arr\.json:1: .*not a JSON object"):
        Corpus(path)
    path.write_bytes(b'[\n  {"text": "one"},\n  {"text": "tw\xff"}\n]')  # found by fuzzing
    with pytest.raises(ValueError, match=r"arr\.json:3: malformed record: not UTF-8"):
        Corpus(path)
    corpus = Corpus(path, skip_malformed=True)
    assert (len(corpus), corpus.stats.malformed) == (1, 1)
    lone = tmp_path / "lone.jsonl"  # valid JSON, but no string of Unicode characters
    lone.write_text('{"text": "ok"}\n{"text": "a \\udc80 b"}\n')
    with pytest.raises(ValueError, match=r"lone\.jsonl:2: malformed record: not UTF-8"):
        Corpus(lone)


def test_missing_file_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        Corpus(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    write_jsonl(tmp_path / "e.jsonl", [{"conversations": []}])
    with pytest.raises(ValueError, match="no usable examples"):
        Corpus([tmp_path / "empty.txt", tmp_path / "e.jsonl"])


# ---------------------------------------------------------------------------- packing


def test_packing_is_the_shuffled_concatenation(files, tokenizer):
    corpus = Corpus(list(files.values()))
    enc = ChatEncoder(tokenizer)
    L, seed = 24, 3
    stream = []
    for epoch in range(3):
        order = epoch_order(len(corpus), seed, epoch)
        assert sorted(order.tolist()) == list(range(len(corpus)))
        stream += [enc.encode(corpus[int(i)]) for i in order]
    tokens = np.concatenate([e.tokens for e in stream])
    mask = np.concatenate([e.assistant_mask for e in stream])
    assert max(len(e) for e in stream) > L  # some examples span several sequences
    epoch_tokens = len(tokens) // 3
    packer = SequencePacker(corpus, enc, seq_len=L, seed=seed, num_epochs=2)
    seqs = list(packer)
    assert len(seqs) == 2 * epoch_tokens // L  # the last partial sequence is dropped
    assert all(t.shape == m.shape == (L,) and t.dtype == np.int32 for t, m in seqs)
    np.testing.assert_array_equal(np.concatenate([t for t, _ in seqs]), tokens[:len(seqs) * L])
    np.testing.assert_array_equal(np.concatenate([m for _, m in seqs]), mask[:len(seqs) * L])
    assert packer.position.sequence == len(seqs)


def test_lookahead_does_not_change_output(files, tokenizer):
    corpus = Corpus(list(files.values()))
    a = [next(it) for it in [make_iter(corpus, tokenizer, lookahead=1)] for _ in range(6)]
    b = [next(it) for it in [make_iter(corpus, tokenizer, lookahead=5)] for _ in range(6)]
    assert_batches_equal(a, b)


def test_determinism_and_seed(files, tokenizer):
    corpus = Corpus(list(files.values()))

    def first(seed, n=3):
        it = make_iter(corpus, tokenizer, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b, strict=True):
        for f in ("tokens", "assistant_mask", "anchors", "anchor_mask"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert any(not np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(epoch_order(100, 0, 0), epoch_order(100, 0, 1))


def assert_batches_equal(xs: list[Batch], ys: list[Batch]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        for f in ("tokens", "assistant_mask", "anchors", "anchor_mask"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


@pytest.mark.parametrize("k", [1, 4, 9])
def test_resume_is_exact(files, tokenizer, k):
    corpus = Corpus(list(files.values()))
    kw = {"seq_len": 19, "anchors_on_assistant": True, "seed": 5}
    full = make_iter(corpus, tokenizer, **kw)
    ref = [next(full) for _ in range(k + 6)]  # crosses an epoch boundary
    it = make_iter(corpus, tokenizer, **kw)
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(it.state()))
    assert state["position"]["sequence"] == 4 * k + it.skipped_sequences
    resumed = BatchIterator.from_state(state, corpus, tokenizer)
    assert_batches_equal(head + [next(resumed) for _ in range(6)], ref)
    # Another batch size and process split resume the same sequence stream.
    two = BatchIterator.from_state(state, corpus, tokenizer, batch_size=2)
    assert_batches_equal([next(two)], [Batch(*(getattr(ref[k], f)[:2] for f in (
        "tokens", "assistant_mask", "anchors", "anchor_mask")))])
    with pytest.raises(ValueError, match="seed"):
        BatchIterator.from_state(state, corpus, tokenizer, seed=6)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator.from_state(state, Corpus(files["gsm8k"]), tokenizer)


def test_num_epochs_stops(files, tokenizer):
    corpus = Corpus(files["gsm8k"])
    it = make_iter(corpus, tokenizer, num_epochs=1, batch_size=2)
    batches = list(it)
    total = sum(len(ChatEncoder(tokenizer).encode(corpus[i])) for i in range(len(corpus)))
    assert len(batches) == total // (24 * 2)
    assert it.state()["position"]["sequence"] == 2 * len(batches)


def test_process_split(files, tokenizer):
    corpus = Corpus(list(files.values()))
    one = make_iter(corpus, tokenizer, anchors_on_assistant=True)
    parts = [make_iter(corpus, tokenizer, anchors_on_assistant=True, process_index=p,
                       process_count=2) for p in range(2)]
    for _ in range(5):
        want = next(one)
        got = [next(p) for p in parts]
        assert got[0].tokens.shape == (2, 24)
        for f in ("tokens", "assistant_mask", "anchors", "anchor_mask"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(g, f) for g in got]), getattr(want, f))
    assert parts[0].state() == parts[1].state() == one.state()
    with pytest.raises(ValueError, match="divisible"):
        make_iter(corpus, tokenizer, batch_size=3, process_count=2, process_index=0)
    with pytest.raises(ValueError, match="process_index"):
        make_iter(corpus, tokenizer, process_count=2, process_index=2)


# ---------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("on_assistant", [False, True])
def test_batch_anchors(files, tokenizer, on_assistant):
    corpus = Corpus(list(files.values()))
    L, K, m = 40, 6, 8
    it = make_iter(corpus, tokenizer, seq_len=L, block_size=K, anchors_per_seq=m,
                   anchors_on_assistant=on_assistant)
    for _ in range(6):
        b = next(it)
        assert b.anchors.shape == b.anchor_mask.shape == (4, m) and b.anchors.dtype == np.int32
        for r in range(4):
            a = b.anchors[r][b.anchor_mask[r]]
            assert np.all((a >= 1) & (a <= L - K)) and np.all(np.diff(a) > 0)
            eligible = np.arange(1, L - K + 1)
            if on_assistant:
                assert b.assistant_mask[r][a + 1].all()
                eligible = eligible[b.assistant_mask[r][eligible + 1]]
            assert len(a) == min(m, len(eligible))
            assert np.all(b.anchors[r][~b.anchor_mask[r]] == 0)
            assert np.all(b.anchor_mask[r][:len(a)])  # valid anchors come first


def test_sequences_without_a_possible_anchor_are_skipped(tmp_path, tokenizer):
    """With anchors on answers only, a packed sequence of prompt text alone would train on
    nothing: the iterator skips it (and counts it); the rows it keeps are the packer's."""
    long_question = " ".join(["the world of apples"] * 12)
    rows = [{"messages": [{"role": "user", "content": long_question},
                          {"role": "assistant", "content": f"cat {i}"}]} for i in range(8)]
    corpus = Corpus([write_jsonl(tmp_path / "q.jsonl", rows)])
    kw = {"seq_len": 20, "block_size": 4, "anchors_per_seq": 3, "num_epochs": 1}
    it = make_iter(corpus, tokenizer, anchors_on_assistant=True, **kw)
    batches = list(it)
    assert it.skipped_sequences > 0
    packed = list(SequencePacker(corpus, ChatEncoder(tokenizer), seq_len=20, seed=0,
                                   num_epochs=1))
    kept = [t for t, m in packed if len(anchor_candidates(m, 4, on_assistant=True))]
    assert len(kept) + it.skipped_sequences == len(packed)
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in batches]),
                                  np.stack(kept[:4 * len(batches)]))
    assert all(b.anchor_mask.any(axis=1).all() for b in batches)  # every row trains
    every = make_iter(corpus, tokenizer, **kw)  # anchors anywhere: nothing to skip
    assert len(list(every)) == len(packed) // 4 and every.skipped_sequences == 0


def test_sample_anchors():
    mask = np.zeros(32, bool)
    mask[10:14] = True  # eligible: a + 1 in [10, 14) -> a in 9..12
    kw = {"block_size": 4, "num_anchors": 6, "seed": 1, "on_assistant": True}
    a, v = sample_anchors(mask, sequence_index=7, **kw)
    assert a.tolist() == [9, 10, 11, 12, 0, 0] and v.tolist() == [True] * 4 + [False] * 2
    a, v = sample_anchors(np.zeros(32, bool), sequence_index=7, **kw)
    assert not v.any()
    kw.update(on_assistant=False, num_anchors=10)
    a1, _ = sample_anchors(mask, sequence_index=7, **kw)
    a2, _ = sample_anchors(mask, sequence_index=7, **kw)
    a3, _ = sample_anchors(mask, sequence_index=8, **kw)
    assert a1.tolist() == a2.tolist() != a3.tolist()
    assert len(set(a1.tolist())) == 10 and a1.min() >= 1 and a1.max() <= 28
    a, v = sample_anchors(mask, sequence_index=0, block_size=4, num_anchors=40, seed=0)
    assert a[v].tolist() == list(range(1, 29)) and v.sum() == 28  # all positions, no repeats


# ---------------------------------------------------------------------------- arguments


def test_bad_arguments(files, tokenizer):
    corpus = Corpus(files["gsm8k"])
    with pytest.raises(ValueError, match="block_size"):
        make_iter(corpus, tokenizer, seq_len=4, block_size=4)
    make_iter(corpus, tokenizer, seq_len=5, block_size=4)  # one anchor position: fine
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        make_iter(corpus, tokenizer, block_size=1)
    with pytest.raises(ValueError, match="anchors_per_seq"):
        make_iter(corpus, tokenizer, anchors_per_seq=0)
    with pytest.raises(ValueError, match="batch_size"):
        make_iter(corpus, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="unknown_roles"):
        Corpus(files["gsm8k"], unknown_roles="drop")
    with pytest.raises(ValueError, match="beyond"):
        make_iter(corpus, tokenizer, position={"epoch": 0, "index": 99, "offset": 0,
                                               "sequence": 0})
    with pytest.raises(ValueError, match="bad data position"):
        DataPosition.from_dict({"epoch": 0})
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ChatEncoder(tokenizer, end_of_turn_tokens=["<|eot_id|>"])
