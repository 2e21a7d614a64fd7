"""Prompt I/O shared by the engine's callers: the tokenizer saved beside a model, and
prompt files."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """The HF tokenizer saved beside the model, or None if the folder has none."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and \
            not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer  # reads the tokenizer files only

    return AutoTokenizer.from_pretrained(str(model_dir))


def read_prompts_file(path: str | Path) -> list[dict]:
    """JSONL: one ``{"prompt": ...}``, ``{"messages": [...]}`` or ``{"prompt_ids": [...]}``
    per line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(item, dict) or not ({"prompt", "messages", "prompt_ids"} & set(item)):
            raise ValueError(f"{path}:{n}: expected an object with 'prompt', 'messages' or "
                             "'prompt_ids'")
        out.append(item)
    return out
