"""``python -m train.distill``: self-distilled training data.

The frozen model answers a prompt set, and its answers are written as chat JSONL that
``python -m train.main --data`` reads. One record per line, in input order::

    {"messages": [..prompt.., {"role": "assistant", "content": ANSWER}],
     "finish_reason": "eos" | "length", "source_index": I, "source": FILE_NAME, "line": L}

``source_index`` is the record's index in the prompt set (the files in the given order, bad
records included); ``line`` is the line of the file where it starts. ANSWER is the decoded
text of the generated ids, end-of-sequence token excluded.

Prompt files (read with ``train.records``' readers): GSM8K-style JSONL (``question``; the
``answer`` is ignored), chat JSONL (``messages``), ShareGPT (``conversations``), one object
per line or a JSON array that may be cut off at the end. The prompt is the conversation up to
its first answer (an assistant message after the first non-assistant one): system prompt and
first user turn. A conversation without an answer is all prompt. The prompt must end with a
non-empty user message.

Bad records are counted and skipped with a message naming file and line. They are: a record
that is not JSON or not UTF-8, a record with no question or conversation, an empty prompt, a
chat-template error, and a prompt that leaves no room in the context (``--max-len``) for
``--max-new-tokens`` (so no answer is cut short by the cache).

Resuming: re-running the same command keeps the records already in OUT and appends the
missing ones. Each record is written as one line, then flushed and fsynced, so a kill loses
at most the batches in flight. A last line cut off by a kill is removed on start.

Batches: the prompt set is cut into fixed windows of ``--batch-size * --sort-window``
consecutive records. Each window's prompts are sorted by length (with ``--sort-window`` 1,
the default, they keep their order) and cut into batches. A batch depends only on the prompt
set, never on ``--start``/``--end``/``--limit`` or on what OUT already holds: a batch that
holds a missing record runs whole. Greedy answers (the default) do not depend on the batch.
Sampled answers (``--temperature`` > 0) do, because the engine draws one random stream per
batch, not per row. Each batch is seeded from (``--seed``, window, batch), so the same command
and prompt set give the same answers. A split run and a resumed run give them too. Another
``--batch-size`` or ``--sort-window`` gives other samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from orthrus_jax.cli import non_negative_int, positive_int, run_command
from orthrus_jax.config import DTYPE_NAMES
from train.records import (
    BadRecord,
    Message,
    ReadStats,
    RecordScanner,
    answer_turns,
    expand_paths,
    file_kind,
    parse_messages,
)

PROMPT_KEYS = ("question", "messages", "conversations")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One record of the prompt set: its prompt messages, or why it is bad."""

    index: int  # source_index: position in the prompt set
    source: str  # file path
    line: int  # 1-based line where the record starts
    messages: tuple[Message, ...] | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def prompt_messages(obj: Any) -> list[Message]:
    """The prompt of one JSON record (raises ``BadRecord``): GSM8K ``question``, or the
    ``messages`` / ``conversations`` up to the first answer (all of them if none)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if not any(k in obj for k in PROMPT_KEYS):
        raise BadRecord("no 'question', 'messages' or 'conversations' field")
    if "question" in obj and "messages" not in obj and "conversations" not in obj:
        if not isinstance(obj["question"], str):
            raise BadRecord("'question' must be a string")
        msgs = [{"role": "user", "content": obj["question"]}]
    else:
        msgs, _ = parse_messages(obj, "error")
    turns = answer_turns(msgs)
    prompt = msgs[:turns[0]] if turns else msgs
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("empty prompt: the conversation has no user message before its "
                        "first answer")
    if not prompt[-1]["content"].strip():
        raise BadRecord("empty prompt: the user message is blank")
    return prompt


class _PromptScanner(RecordScanner):
    """``train.records``' file reader, yielding every record in order, bad ones included:
    ``(line, messages, None)`` or ``(line, None, reason)``."""

    def __init__(self, path: Path, stats: ReadStats):
        super().__init__(path, True, "error", stats)
        self._bad: list[tuple[int, str]] = []

    def bad(self, line: int, why: str) -> None:  # kept in order instead of only counted
        self.stats.malformed += 1
        self._bad.append((line, why))

    def convert(self, obj: Any, line: int) -> tuple[int, list[Message] | None, str | None]:
        try:
            return line, prompt_messages(obj), None
        except BadRecord as e:
            return line, None, str(e)

    def items(self) -> Iterator[tuple[int, list[Message] | None, str | None]]:
        for _, _, item in self.scan():
            yield from self._drain()
            yield item
        yield from self._drain()

    def _drain(self) -> Iterator[tuple[int, None, str]]:
        bad, self._bad = self._bad, []
        for line, why in bad:
            yield line, None, why


def read_prompts(paths: str | Path | Iterable[str | Path],
                 stats: ReadStats | None = None) -> list[Prompt]:
    """Every record of the prompt files, in order; bad ones carry ``error``. The truncated
    tail of a JSON array is no record (it counts in ``stats.truncated``)."""
    stats = ReadStats() if stats is None else stats
    out: list[Prompt] = []
    for path in expand_paths(paths):
        try:
            if file_kind(path) == "text":
                raise ValueError(f"{path}: not a prompt file (expected .jsonl, .ndjson or "
                                 ".json records)")
            for line, msgs, error in _PromptScanner(path, stats).items():
                out.append(Prompt(len(out), str(path), line,
                                  None if msgs is None else tuple(msgs), error))
        except (PermissionError, IsADirectoryError) as e:
            raise FileNotFoundError(f"cannot read prompt file {path}: {e}") from e
    return out


# --------------------------------------------------------------------------------------------
# Output file
# --------------------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_done(path: Path, log: Callable[[str], None] = _stderr) -> set[int]:
    """``source_index`` of the records already in ``path``. A last line cut off by a kill (no
    newline, or not a JSON record) is truncated away; any other bad line is an error."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise FileNotFoundError(f"output {path} is not a file")
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    cut = len(data) - keep
    lines = data[:keep].split(b"\n")[:-1]
    done: set[int] = set()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            index = rec["source_index"] if isinstance(rec, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            index = None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            if n == len(lines):  # a damaged last line: the write a kill interrupted
                keep -= len(raw) + 1
                cut += len(raw) + 1
                break
            raise ValueError(f"{path}:{n}: not a distilled record (expected JSON with an "
                             "integer 'source_index'); fix or move the output file")
        if index in done:
            raise ValueError(f"{path}:{n}: source_index {index} appears twice")
        done.add(index)
    if cut:
        log(f"{path}: removing an incomplete last line ({cut} bytes, left by an "
            "interrupted run)")
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return done


def make_record(prompt: Prompt, text: str, finish_reason: str | None) -> dict:
    return {"messages": [*prompt.messages, {"role": "assistant", "content": text}],
            "finish_reason": finish_reason, "source_index": prompt.index,
            "source": Path(prompt.source).name, "line": prompt.line}


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def batch_seed(seed: int, window: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` of window ``window``."""
    return int(np.random.SeedSequence([seed, window, batch]).generate_state(1)[0])


@dataclass
class Totals:
    written: int = 0
    skipped: int = 0  # already in the output
    bad: int = 0
    tokens: int = 0  # generated by the engine (rows run only to complete a batch included)
    decode_seconds: float = 0.0
    batches: int = 0


def distill(gen, prompts: Sequence[Prompt], out: Path, *, start: int = 0,
            end: int | None = None, mode: str = "ar", max_new_tokens: int = 256,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            batch_size: int = 32, sort_window: int = 1, progress: bool = True,
            done: set[int] | None = None, log: Callable[[str], None] = _stderr) -> Totals:
    """Answer ``prompts[start:end]`` with ``gen`` (an ``infer.engine.Generator``) and append
    the records missing from ``out`` (see the module docstring). ``done``: the result of
    ``load_done(out)`` when the caller has it already."""
    from jinja2 import TemplateError
    from tqdm import tqdm

    end = len(prompts) if end is None else min(end, len(prompts))
    totals = Totals()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(out, log) if done is None else done
    pending = [i for i in range(start, end) if i not in done]
    totals.skipped = (end - start) - len(pending) if end > start else 0
    if done and pending and pending[0] < max(done):
        log(f"note: {out} already holds records after source_index {pending[0]}; the new "
            "ones are appended after them, out of source_index order")
    limit = gen.max_len - max_new_tokens  # longest prompt whose answer fits the cache
    window_len = batch_size * sort_window
    bar = tqdm(total=len(pending), unit="rec", disable=not progress or None, file=sys.stderr,
               dynamic_ncols=True)

    def say(message: str) -> None:  # a message above the progress bar
        with tqdm.external_write_mode(file=sys.stderr):
            log(message)

    t0 = time.perf_counter()

    def encode(p: Prompt) -> list[int] | str:
        """Prompt ids, or why the record is bad."""
        try:
            ids = gen.encode(list(p.messages), chat=True)
        except TemplateError as e:
            return f"chat template error: {e}"
        if len(ids) > limit:
            return (f"prompt too long: {len(ids)} tokens + {max_new_tokens} new tokens do "
                    f"not fit the context of {gen.max_len} tokens")
        return ids

    with out.open("a", encoding="utf-8") as f:
        todo = set(pending)
        for w in sorted({i // window_len for i in pending}):
            lo, hi = w * window_len, min((w + 1) * window_len, len(prompts))
            ids: dict[int, list[int] | str] = {
                i: encode(prompts[i]) for i in range(lo, hi) if prompts[i].messages is not None}
            rows = [i for i in range(lo, hi) if isinstance(ids.get(i), list)]
            if sort_window > 1:
                rows.sort(key=lambda i: (len(ids[i]), i))
            answers = {}
            for j in range(0, len(rows), batch_size):
                batch = rows[j:j + batch_size]
                if not todo.intersection(batch):
                    continue
                results = gen.generate(
                    [ids[i] for i in batch], mode=mode, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=batch_seed(seed, w, j // batch_size), batch_size=batch_size)
                answers.update(zip(batch, results, strict=True))
                totals.tokens += sum(len(r.token_ids) for r in results)
                totals.decode_seconds += results[0].seconds
                totals.batches += 1
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{totals.tokens / elapsed:.1f} tok/s", refresh=False)
            for i in range(lo, hi):
                if i not in todo:
                    continue
                p = prompts[i]
                why = p.error if p.messages is None else ids[i]
                if isinstance(why, str):
                    say(f"{p.where}: bad record (source_index {i}), skipped: {why}")
                    totals.bad += 1
                else:
                    r = answers[i]
                    line = json.dumps(make_record(p, r.text, r.finish_reason),
                                      ensure_ascii=False)
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    totals.written += 1
                bar.update(1)
    bar.close()
    return totals


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (convert.from_hf/from_gguf)")
    p.add_argument("--prompts", nargs="+", required=True,
                   help="prompt files: GSM8K / chat JSONL, ShareGPT JSON arrays")
    p.add_argument("--out", required=True, help="output JSONL (appended to when resuming)")
    p.add_argument("--mode", choices=("ar", "orthrus"), default="ar",
                   help="decoder (same output; ar is the faster exact path on a CPU)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per compiled batch")
    p.add_argument("--sort-window", type=positive_int, default=1,
                   help="sort prompts by length within windows of this many batches "
                        "(1: no sorting)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="context (KV cache) limit; default: the model's "
                        "max_position_embeddings. Each batch's cache is sized to its prompt "
                        "bucket plus --max-new-tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (>= 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter and compute dtype (default: as stored; bfloat16 and "
                        "float16 decode in float32 on CPU)")
    p.add_argument("--start", type=non_negative_int, default=0, help="first source_index to answer")
    p.add_argument("--end", type=non_negative_int, default=None, help="source_index to stop before")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="answer at most the first N records from --start")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compile_cache_args(p)
    return p


def load_generator(model_dir: str, max_len: int | None, dtype: str | None):
    """The engine for ``model_dir`` (tests replace this to share one compiled engine)."""
    from infer.engine import Generator

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    gen = Generator.load(model_dir, dtype=dtype, max_len=max_len)
    if gen.tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer in the model folder")
    return gen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)
    return run_command(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from infer.sampling import SamplingParams

    SamplingParams.check(args.temperature, args.top_k, args.top_p)  # fail before loading
    if args.max_len is not None and args.max_len < 2:
        raise ValueError("--max-len must be >= 2")

    log = _stderr
    stats = ReadStats()
    prompts = read_prompts(args.prompts, stats)
    if stats.truncated:
        log(f"note: {stats.truncated} prompt file(s) end in a truncated record (ignored)")
    end = len(prompts) if args.end is None else min(args.end, len(prompts))
    if args.limit is not None:
        end = min(end, args.start + args.limit)
    out = Path(args.out)
    done = load_done(out, log)  # a damaged output stops the run before the model loads
    gen = load_generator(args.model, args.max_len, args.dtype)
    if gen.max_len - args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"in the context of {gen.max_len} tokens")

    t0 = time.perf_counter()
    t = distill(gen, prompts, out, done=done, start=args.start, end=end, mode=args.mode,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                batch_size=args.batch_size, sort_window=args.sort_window,
                progress=not args.no_progress, log=log)
    wall = time.perf_counter() - t0
    compile_s = sum(gen.compile_seconds.values())
    rate = t.tokens / t.decode_seconds if t.decode_seconds > 0 else 0.0
    log(f"[distill] {t.written} records written, {t.skipped} skipped (already done), "
        f"{t.bad} bad, {t.tokens} tokens generated in {t.batches} batches, "
        f"{rate:.1f} tokens/s (decode {t.decode_seconds:.1f} s, compile {compile_s:.1f} s, "
        f"total {wall:.1f} s), batch size {args.batch_size}, mode {args.mode} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
