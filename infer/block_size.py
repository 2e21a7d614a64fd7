"""Choosing the block size at inference: what a head accepts, what a pass costs here.

Expected tokens per second at block size ``k`` is ``E[tokens | k] / cost(k)``:

- ``E[tokens | k] = 1 + sum_{i < k} prod_{m <= i} alpha_m`` from the head's
  :class:`AcceptanceProfile` (``alpha_i`` = P(draft ``i`` accepted | drafts before it
  were), measured by decoding calibration prompts, saved as ``acceptance.json`` in the
  model folder);
- ``cost(k)`` = seconds of one iteration of the compiled decode loop at size ``k`` on this
  machine (the AR loop's step for ``k = 1``), over a cache of the length the batch will
  decode over, from a :class:`CostTable` measured with :func:`infer.passes.time_passes`
  (the loop itself, not its passes alone) and cached per machine, model shape, dtype,
  batch size and cache length (under the user cache folder,
  :func:`infer.default_model.cache_root`).

:func:`plan` picks the best size, or plain AR steps when no block is predicted to beat
them by at least ``MIN_GAIN`` (a block that only breaks even under the profile loses
as soon as the text accepts a little less), and, for greedy decoding, the sizes the loop
may switch between as it sees the acceptance of the text at hand (see
:mod:`infer.decode`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from infer.default_model import cache_root
from orthrus_jax.checkpoint import ACCEPTANCE_FILE
from orthrus_jax.config import ModelConfig
from orthrus_jax.model import OrthrusLM

COST_FORMAT = 2  # 2: the decode loop's own iterations (1: the passes alone)
# The least predicted gain over AR steps for which ``auto`` drafts at all.
MIN_GAIN = 0.03
# Timed rounds of a cost table's measurement (each round times every size once).
COST_REPEATS = 5
# Block sizes whose cost is measured for ``auto`` (those up to the head's own size).
CANDIDATE_BLOCKS = (2, 3, 4, 5, 6, 8, 12, 16, 24, 32)


@dataclasses.dataclass(frozen=True)
class AcceptanceProfile:
    """Iterations that accepted ``j`` drafts (``accepted_hist[j]``) when decoding at
    ``block_size``: enough to give the conditional acceptance of each draft position."""

    block_size: int
    accepted_hist: tuple[int, ...]
    source: str = ""

    def alpha(self, positions: int) -> np.ndarray:
        """``[positions]`` P(draft ``i`` accepted | drafts ``< i`` were), ``i = 1..``;
        positions the profile never tried (past its block) count as never accepted."""
        hist = np.asarray(self.accepted_hist, np.float64)
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[j] = iterations accepting >= j
        out = np.zeros(positions)
        for i in range(1, min(positions, len(hist) - 1) + 1):
            out[i - 1] = at_least[i] / at_least[i - 1] if at_least[i - 1] else 0.0
        return out

    def expected_tokens(self, k: int) -> float:
        """Expected tokens per iteration at block size ``k``."""
        return float(1.0 + np.sum(np.cumprod(self.alpha(k - 1)))) if k > 1 else 1.0

    @classmethod
    def load(cls, model_dir: str | Path) -> AcceptanceProfile | None:
        """The profile saved in a model folder, None if it has none."""
        path = Path(model_dir) / ACCEPTANCE_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            hist = tuple(int(h) for h in d["accepted_hist"])
            profile = cls(int(d["block_size"]), hist, str(d.get("source", "")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not an acceptance profile ({e})") from e
        if len(hist) != profile.block_size or min(hist) < 0 or sum(hist) == 0:
            raise ValueError(f"{path}: accepted_hist must hold {profile.block_size} "
                             "non-negative counts, not all zero")
        return profile

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / ACCEPTANCE_FILE
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def machine_key() -> dict:
    """What makes pass costs differ between machines."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cpus": os.cpu_count(), "backend": jax.default_backend(),
            "device_kind": getattr(dev, "device_kind", str(dev)),
            "devices": jax.device_count(), "jax": jax.__version__,
            "python": sys.version.split()[0]}


def model_key(config: ModelConfig) -> dict:
    hf = config.to_hf_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "tie_word_embeddings")
    return {**{k: hf.get(k) for k in keys}, "dtype": config.dtype,
            "param_dtype": config.param_dtype}


class CostTable:
    """Seconds per decode-loop iteration by block size, for one machine, model shape,
    batch size and cache length; measured on first need and kept in a JSON file under
    :func:`cache_root` ``/costs/``."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 root: str | Path | None = None):
        self.key = {"format": COST_FORMAT, "machine": machine_key(), "model": model_key(config),
                    "batch_size": batch_size, "max_len": max_len}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(root or cache_root()) / "costs" / f"{digest}.json"
        self.seconds: dict[int, float] = {}
        if self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
                if d.get("key") == self.key:
                    self.seconds = {int(k): float(v) for k, v in d["seconds"].items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                print(f"warning: ignoring unreadable cost table {self.path}", file=sys.stderr)

    def ensure(self, model: OrthrusLM, blocks: Sequence[int],
               repeats: int = COST_REPEATS) -> CostTable:
        """Measure the sizes in ``blocks`` (and the AR step) that the table lacks: one
        iteration of the greedy decode loop at each, over a cache of ``max_len``
        positions."""
        missing = sorted({1, *blocks} - set(self.seconds))
        if not missing:
            return self
        print(f"measuring decode-loop iteration costs for block sizes {missing} (batch "
              f"{self.key['batch_size']}, cache {self.key['max_len']}); cached in {self.path}",
              file=sys.stderr)
        max_k = max(missing)
        context = max(self.key["max_len"] - max_k, 1)  # a cache of max_len positions
        t = _time(model, missing, self.key["batch_size"], context, repeats)
        for k in missing:
            self.seconds[k] = t["ar_iteration"] if k == 1 else t["iteration"][k]
        self.save()
        return self

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps({"key": self.key, "seconds": self.seconds}, indent=1)
                       + "\n")
        os.replace(tmp, self.path)
        return self.path


def _time(model: OrthrusLM, blocks: Sequence[int], batch_size: int, context: int,
          repeats: int) -> dict:
    from infer.passes import time_passes

    return time_passes(model, blocks=blocks, batch_size=batch_size, context=context,
                       repeats=repeats, passes=False)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The block sizes a decode loop runs: ``blocks[0]`` alone, or a choice among all of
    them per iteration (with ``prior`` and ``costs``, as :func:`infer.decode.run` takes)."""

    blocks: tuple[int, ...]
    best: int  # the size with the most expected tokens/s under the profile
    prior: tuple[float, ...] = ()  # expected tokens per iteration at sizes 1, 2, ..
    costs: tuple[float, ...] = ()  # seconds per iteration at sizes 1, 2, .. (0: unmeasured)
    predicted_tokens_per_iteration: float | None = None
    predicted_speedup: float | None = None  # expected tokens/s over AR tokens/s
    best_block: int | None = None  # the best drafting size, chosen or not
    best_block_speedup: float | None = None  # its predicted speedup over AR steps
    min_gain: float = 0.0  # the least predicted gain for which it drafts

    @property
    def adaptive(self) -> bool:
        return len(self.blocks) > 1

    @property
    def ar_step_seconds(self) -> float | None:
        """The measured cost of an AR step of the loop (None for a plan not from costs)."""
        return self.costs[0] if self.costs else None

    def describe(self) -> str:
        if self.predicted_speedup is None:
            return f"block size {self.best}"
        if self.best == 1:
            why = ("no block pays" if self.best_block is None else
                   f"block {self.best_block} predicted {self.best_block_speedup:.3f}x, below "
                   f"the {1 + self.min_gain:.3f}x that drafting needs")
            return f"auto: plain AR steps ({why})"
        how = (f", switching among {list(self.blocks)} by the acceptance seen"
               if self.adaptive else "")
        return (f"auto: block size {self.best}{how}; predicted "
                f"{self.predicted_tokens_per_iteration:.2f} tokens/iteration, "
                f"{self.predicted_speedup:.2f}x AR")


def plan(profile: AcceptanceProfile, seconds: dict[int, float], *, max_block: int,
         adaptive: bool = True, min_gain: float = MIN_GAIN) -> BlockPlan:
    """The block plan maximising expected tokens/s. Deterministic in its inputs.

    ``seconds``: cost per iteration by block size (must include 1, the AR step); sizes
    above ``max_block`` (the head's trained size) are not considered. Drafting is chosen
    only when its predicted speedup is at least ``1 + min_gain``. With ``adaptive``, the
    loop may also run plain AR steps where the text at hand accepts less than the
    profile."""
    if 1 not in seconds:
        raise ValueError("the cost table has no AR step (block size 1)")
    sizes = sorted(k for k in seconds if 1 <= k <= max_block)
    rate = {k: profile.expected_tokens(k) / seconds[k] for k in sizes}
    drafting = [k for k in sizes if k > 1]
    top = max(drafting, key=lambda k: (rate[k], -k)) if drafting else None  # ties: smaller
    best = top if top is not None and rate[top] >= (1 + min_gain) * rate[1] else 1
    blocks = (best,) if best == 1 or not adaptive else (best, 1)
    return BlockPlan(
        blocks=blocks, best=best,
        prior=tuple(profile.expected_tokens(k) for k in range(1, best + 1)),
        costs=tuple(float(seconds.get(k, 0.0)) for k in range(1, best + 1)),
        predicted_tokens_per_iteration=profile.expected_tokens(best),
        predicted_speedup=rate[best] / rate[1], best_block=top,
        best_block_speedup=None if top is None else rate[top] / rate[1], min_gain=min_gain)
