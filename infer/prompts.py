"""Prompt I/O shared by the engine's callers: the tokenizer saved beside a model, and
prompt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orthrus_jax.cli import InputError


def load_tokenizer(model_dir: str | Path):
    """The HF tokenizer saved beside the model, or None if the folder has none."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and \
            not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer  # reads the tokenizer files only

    return AutoTokenizer.from_pretrained(str(model_dir))


PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
ROLES = ("system", "user", "assistant", "tool")


def read_prompts_file(path: str | Path) -> list[dict]:
    """JSONL: one ``{"prompt": text}``, ``{"messages": [{"role", "content"}, ...]}`` or
    ``{"prompt_ids": [int, ...]}`` per line (other keys are ignored; blank lines skipped).

    Every record is checked (:func:`check_prompt_item`) before anything else runs; an
    :class:`InputError` names the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from e
        out.append(check_prompt_item(item, f"{path}:{n}"))
    if not out:
        raise InputError(f"{path}: no prompts")
    return out


def check_prompt_item(item: Any, where: str = "prompt") -> dict:
    """``item`` itself if it is one well-formed prompt record (see
    :func:`read_prompts_file`); otherwise an :class:`InputError` that starts with
    ``where`` and names the field."""
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object with one of {list(PROMPT_KEYS)}, "
                         f"got {_kind(item)}")
    given = [k for k in PROMPT_KEYS if k in item]
    if len(given) != 1:
        raise InputError(f"{where}: expected exactly one of {list(PROMPT_KEYS)}, got "
                         f"{given or 'none'}")
    key = given[0]
    value = item[key]
    if key == "prompt":
        if not isinstance(value, str):
            raise InputError(f"{where}: 'prompt' must be a string, got {_kind(value)}")
        if not value.strip():
            raise InputError(f"{where}: 'prompt' is empty")
    elif key == "prompt_ids":
        if not isinstance(value, list) or not value:
            raise InputError(f"{where}: 'prompt_ids' must be a non-empty list of token ids, "
                             f"got {_kind(value)}")
        for i, t in enumerate(value):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InputError(f"{where}: 'prompt_ids'[{i}] must be a token id (an "
                                 f"integer >= 0), got {t!r:.40}")
    else:
        check_messages(value, f"{where}: 'messages'")
    return item


def check_messages(messages: Any, where: str = "messages") -> None:
    """A chat: a non-empty list of ``{"role": one of ROLES, "content": text}`` with at least
    one user message; an :class:`InputError` starting with ``where`` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where} must be a non-empty list of {{'role', 'content'}} "
                         f"objects, got {_kind(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"{where}[{i}] must be an object with 'role' and 'content', "
                             f"got {_kind(m)}")
        if m.get("role") not in ROLES:
            raise InputError(f"{where}[{i}]: 'role' must be one of {list(ROLES)}, got "
                             f"{m.get('role')!r:.40}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}[{i}]: 'content' must be a string, got "
                             f"{_kind(m.get('content'))}")
    if not any(m["role"] == "user" for m in messages):
        raise InputError(f"{where} has no 'user' message")


def _kind(value: Any) -> str:
    """What a JSON value is, for error messages."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
