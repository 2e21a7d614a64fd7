"""A model folder's ``generation_config.json`` (Hugging Face's generation defaults, copied
with the tokenizer files): its end-of-sequence ids and its sampling defaults, read and
checked.

As in transformers: without ``do_sample: true`` decoding is greedy, and the file's
``temperature``, ``top_k`` and ``top_p`` do not apply (they are still checked); with it,
a key left out takes transformers' default (temperature 1, top-k 50, top-p 1). Keys this
module does not read are ignored. A value of the wrong type or out of range is an
:class:`~orthrus_jax.cli.InputError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from infer.prompts import read_json_object
from infer.sampling import MAX_TOP_K
from orthrus_jax.cli import InputError

FILE_NAME = "generation_config.json"
# transformers' values for a sampling key the file leaves out (with do_sample true)
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings and where they came from (``source``: ``"default"``,
    ``"flags"``, ``"--greedy"``, ``"generation_config.json"``). ``temperature`` 0 is
    greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    source: str = "default"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def kwargs(self) -> dict[str, Any]:
        """``temperature``, ``top_k`` and ``top_p`` as :meth:`Generator.generate` takes
        them."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def describe(self) -> str:
        """E.g. ``"temperature 0.6, top-k 20, top-p 0.95 (generation_config.json)"`` or
        ``"greedy (default)"``; filters that are off are left out."""
        if self.greedy:
            what = "greedy"
        else:
            parts = [f"temperature {self.temperature:g}"]
            if self.top_k:
                parts.append(f"top-k {self.top_k}")
            if self.top_p < 1.0:
                parts.append(f"top-p {self.top_p:g}")
            what = ", ".join(parts)
        return f"{what} ({self.source})"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What decoding takes from ``generation_config.json``: ``eos_token_id`` (added to
    ``config.json``'s) and the sampling defaults. The default instance is a folder without
    the file: no extra ids, greedy."""

    eos_token_id: tuple[int, ...] = ()
    sampling: Sampling = Sampling()
    path: str | None = None  # the file read, None without one


def read_generation_config(model_dir: str | Path,
                           vocab_size: int | None = None) -> GenerationConfig:
    """The ``generation_config.json`` of a model folder, checked (end-of-sequence ids
    inside ``[0, vocab_size)`` when given); the default :class:`GenerationConfig` when the
    folder has none."""
    path = Path(model_dir) / FILE_NAME
    if not path.exists():
        return GenerationConfig()
    return generation_config_from_dict(read_json_object(path), str(path), vocab_size)


def generation_config_from_dict(d: dict[str, Any], source: str = FILE_NAME,
                                vocab_size: int | None = None) -> GenerationConfig:
    """Build from a parsed ``generation_config.json`` object; errors start with
    ``source``."""
    try:
        eos = _eos_ids(d.get("eos_token_id"), vocab_size)
        do_sample = d.get("do_sample", False)
        if do_sample is None:
            do_sample = False
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample={do_sample!r:.60} must be true or false")
        values = {k: d.get(k) for k in HF_SAMPLING_DEFAULTS}
        temperature = _number(values["temperature"], "temperature")
        top_k = _top_k(values["top_k"])
        top_p = _number(values["top_p"], "top_p")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={values['top_p']!r:.60} must be in (0, 1] (1 = off)")
        if not do_sample:
            return GenerationConfig(eos, Sampling(source=_greedy_source(d)), source)
        if temperature == 0.0:
            raise ValueError("temperature=0 must be > 0 with do_sample true (do_sample "
                             "false is greedy)")
        if top_k is not None and top_k > MAX_TOP_K:
            raise ValueError(f"top_k={top_k} must be at most {MAX_TOP_K} (0 = off): this "
                             f"decoder filters among the {MAX_TOP_K} most likely tokens")
        sampling = Sampling(
            temperature=HF_SAMPLING_DEFAULTS["temperature"] if temperature is None
            else temperature,
            top_k=HF_SAMPLING_DEFAULTS["top_k"] if top_k is None else top_k,
            top_p=HF_SAMPLING_DEFAULTS["top_p"] if top_p is None else top_p,
            source=FILE_NAME)
        return GenerationConfig(eos, sampling, source)
    except (ValueError, OverflowError) as e:
        raise InputError(f"{source}: {e}") from e


def _greedy_source(d: dict) -> str:
    """``do_sample: false`` in the file says greedy; without the key, it is the default."""
    return FILE_NAME if d.get("do_sample") is False else "default"


def _eos_ids(value: Any, vocab_size: int | None) -> tuple[int, ...]:
    """``eos_token_id``: null, one id or a list of ids (each an integer >= 0, inside the
    vocabulary when its size is known)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"eos_token_id={value!r:.60} must be a token id (an integer >= 0) "
                         "or a list of them")
    outside = [v for v in values if vocab_size is not None and v >= vocab_size]
    if outside:
        raise ValueError(f"eos_token_id={value!r:.60}: {outside[:4]} outside the vocabulary "
                         f"[0, {vocab_size})")
    return tuple(values)


def _number(value: Any, key: str) -> float | None:
    """A finite number >= 0, or None (null or left out)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value < math.inf:
        raise ValueError(f"{key}={value!r:.60} must be a finite number >= 0")
    return float(value)


def _top_k(value: Any) -> int | None:
    """An integer >= 0 (a float with an integer value accepted), or None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"top_k={value!r:.60} must be an integer >= 0 (0 = off)")
    return value
