"""Prompt I/O shared by the engine's callers: the tokenizer saved beside a model, and
prompt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orthrus_jax.cli import InputError

# The JSON files of a saved HF tokenizer, checked before transformers reads them.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "vocab.json")


def load_tokenizer(model_dir: str | Path):
    """The HF tokenizer saved beside the model, or None if the folder has none.

    A damaged tokenizer file (not UTF-8 JSON, not an object, fields transformers or the
    tokenizers library refuse) is an :class:`InputError` naming the file."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and \
            not (model_dir / "tokenizer_config.json").is_file():
        return None
    for name in TOKENIZER_JSON_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        data = read_json_object(path)
        if name == "tokenizer_config.json":
            _check_tokenizer_config(path, data)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        try:
            template.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{template}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from e
    from transformers import AutoTokenizer  # reads the tokenizer files only

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers and tokenizers raise anything)
        raise InputError(f"{_culprit(model_dir)}: not a usable tokenizer file "
                         f"({type(e).__name__}: {_short(e)})") from e


def _check_tokenizer_config(path: Path, config: dict) -> None:
    """The fields transformers would take as they are and fail on later."""
    length = config.get("model_max_length")
    if length is not None and (not isinstance(length, int | float) or isinstance(length, bool)
                               or not length > 0):
        raise InputError(f"{path}: 'model_max_length' must be a positive number, got "
                         f"{_kind(length)}")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(
                isinstance(t, dict) and isinstance(t.get("template"), str) for t in template)):
        raise InputError(f"{path}: 'chat_template' must be a string (or a list of "
                         f"{{\"name\", \"template\"}} objects), got {_kind(template)}")


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _culprit(model_dir: Path) -> Path:
    """The file a failed tokenizer load is most likely about: ``tokenizer.json`` when the
    tokenizers library refuses it alone, else ``tokenizer_config.json`` (else the folder)."""
    fast = model_dir / "tokenizer.json"
    if fast.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(fast))
        except Exception:  # noqa: BLE001
            return fast
    config = model_dir / "tokenizer_config.json"
    return config if config.is_file() else model_dir


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


# apply_chat_template's own arguments: a chat_template_kwargs key may not set them (it
# would change what is returned, not what the template sees).
TEMPLATE_RESERVED = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def check_template_kwargs(kwargs: Any, where: str = "chat_template_kwargs") -> dict[str, Any]:
    """Extra variables for the chat template (e.g. Qwen3's ``{"enable_thinking": false}``):
    an object whose keys are names, none of them an argument of ``apply_chat_template``;
    an :class:`InputError` starting with ``where`` otherwise. ``None`` is no variables."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{where} must be an object of template variables, got "
                         f"{_kind(kwargs)}")
    for key in kwargs:
        if not key.isidentifier():
            raise InputError(f"{where}: {key!r:.40} is not a template variable name")
        if key in TEMPLATE_RESERVED:
            raise InputError(f"{where}: {key!r} is an argument of the chat template call, "
                             "not a template variable")
    return dict(kwargs)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file at ``path``; anything else (not UTF-8, not JSON, not an
    object, unreadable) is an :class:`InputError` naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    """What a JSON value is, for error messages."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
