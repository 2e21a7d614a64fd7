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

from infer.buckets import MAX_TREE_BUDGET
from infer.default_model import cache_root
from infer.tree import SCORE_BINS, SCORE_EDGES
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
# Draft-tree budgets a profile measures and ``--tree-budget auto`` chooses among (trees of
# depth up to the head's block size less one).
TREE_BUDGETS = (3, 5, 7, 15, 31, 63)
# A tree drafts the shortest block that keeps this share of the tokens per iteration the
# profile measured for it at the head's block size (AcceptanceProfile.tree_block).
TREE_DEPTH_KEEP = 0.99


@dataclasses.dataclass(frozen=True)
class AcceptanceProfile:
    """Iterations that accepted ``j`` drafts (``accepted_hist[j]``) when decoding at
    ``block_size``: enough to give the conditional acceptance of each draft position.
    ``trees``: ``(budget, accepted_hist)`` pairs, the same histogram (accepted depth ``j``)
    when verifying draft trees of that many nodes at ``block_size``.
    ``tree_calibration``: the head's fitted tree scoring, ``[block_size - 1][SCORE_BINS]``
    log hit rates (:func:`infer.tree_calibration.fit`; empty: trees score candidates by
    their log-probabilities); the trees' histograms were measured with it."""

    block_size: int
    accepted_hist: tuple[int, ...]
    source: str = ""
    trees: tuple[tuple[int, tuple[int, ...]], ...] = ()
    tree_calibration: tuple[tuple[float, ...], ...] = ()

    @property
    def tree_budgets(self) -> tuple[int, ...]:
        return tuple(n for n, _ in self.trees)

    def tree_expected_tokens(self, budget: int, block: int | None = None) -> float:
        """Expected tokens per iteration verifying trees of ``budget`` nodes: one plus the
        mean accepted depth, as measured at ``block_size``, or with the depth cut at
        ``block - 1`` (a lower bound: a shallower tree spends the nodes it cannot place
        deep on more candidates near the anchor)."""
        hist = np.asarray(dict(self.trees)[budget], np.float64)
        depth = np.arange(len(hist))
        if block is not None:
            depth = np.minimum(depth, block - 1)
        return float(1.0 + np.dot(depth, hist) / hist.sum())

    def tree_block(self, budget: int, keep: float = TREE_DEPTH_KEEP) -> int:
        """The block a tree of ``budget`` nodes drafts: the smallest whose depth keeps
        ``keep`` of the expected tokens measured at ``block_size`` (a shorter diffusion
        pass is cheaper, and the deep nodes of most trees are seldom reached)."""
        full = self.tree_expected_tokens(budget)
        return next(k for k in range(2, self.block_size + 1)
                    if self.tree_expected_tokens(budget, k) >= keep * full)

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
            trees = tuple(sorted((int(n), tuple(int(h) for h in th))
                                 for n, th in d.get("trees", {}).items()))
            calibration = d.get("tree_calibration")
            table = () if calibration is None else tuple(
                tuple(float(x) for x in row) for row in calibration["log_hit_rate"])
            profile = cls(int(d["block_size"]), hist, str(d.get("source", "")), trees, table)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not an acceptance profile ({e})") from e
        if calibration is not None:
            edges = calibration.get("edges")
            if edges != list(SCORE_EDGES):
                raise ValueError(
                    f"{path}: tree_calibration.edges {edges} are not this version's "
                    f"{list(SCORE_EDGES)}; measure the profile again with python -m "
                    "infer.calibrate")
            a = np.asarray(table, np.float64)
            if (a.shape != (profile.block_size - 1, SCORE_BINS) or not np.isfinite(a).all()
                    or (a > 0).any() or (np.diff(a, axis=1) < 0).any()):
                raise ValueError(
                    f"{path}: tree_calibration.log_hit_rate must be {profile.block_size - 1} "
                    f"rows of {SCORE_BINS} finite values <= 0, non-decreasing along each row")
        for name, h in [("accepted_hist", hist)] + [(f"trees[{n}]", th) for n, th in trees]:
            if len(h) != profile.block_size or min(h) < 0 or sum(h) == 0:
                raise ValueError(f"{path}: {name} must hold {profile.block_size} "
                                 "non-negative counts, not all zero")
        if any(not 1 <= n <= MAX_TREE_BUDGET for n in profile.tree_budgets):
            raise ValueError(f"{path}: tree budgets {list(profile.tree_budgets)} must be in "
                             f"[1, {MAX_TREE_BUDGET}]")
        return profile

    def to_json(self) -> dict:
        d = {"block_size": self.block_size, "accepted_hist": list(self.accepted_hist),
             "source": self.source}
        if self.trees:
            d["trees"] = {str(n): list(h) for n, h in self.trees}
        if self.tree_calibration:
            d["tree_calibration"] = {"edges": list(SCORE_EDGES), "log_hit_rate": [
                [round(x, 6) for x in row] for row in self.tree_calibration]}
        return d

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / ACCEPTANCE_FILE
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
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


def table_len(max_len: int, cap: int) -> int:
    """The cache length the cost table for a cache of ``max_len`` positions is measured at:
    the smallest power of two, or three halves of one, at least ``max_len`` (16, 24, 32,
    48, .., 256, 384, 512, 768, ..), at most ``cap`` (the longest cache the engine
    allocates). Caches come in eight lengths per octave (:func:`infer.buckets.cache_len`)
    and a table takes minutes to measure, so nearby lengths share one, measured at the
    longest of them (a pass costs a little more over a longer cache, never less)."""
    n = max(int(max_len), 16)
    power = 1 << (n - 1).bit_length()
    return min(power * 3 // 4 if power * 3 // 4 >= n else power, max(int(cap), int(max_len)))


class CostTable:
    """Seconds per decode-loop iteration by block size, for one machine, model shape,
    batch size and cache length (the engine asks for :func:`table_len` of its caches);
    measured on first need and kept in a JSON file under :func:`cache_root` ``/costs/``."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 root: str | Path | None = None, weights_out_in: bool = False,
                 attention_kernel: bool = False):
        self.key = {"format": COST_FORMAT, "machine": machine_key(), "model": model_key(config),
                    "batch_size": batch_size, "max_len": max_len}
        if weights_out_in:  # the decoder's weight form changes what a pass costs
            self.key["weights"] = "out_in"
        if attention_kernel:  # and so does the CPU attention kernel
            self.key["attention"] = "kernel"
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(root or cache_root()) / "costs" / f"{digest}.json"
        self.seconds: dict[int, float] = {}
        self.tree_seconds: dict[tuple[int, int], float] = {}  # (block, budget) -> seconds
        if self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
                if d.get("key") == self.key:
                    self.seconds = {int(k): float(v) for k, v in d["seconds"].items()}
                    self.tree_seconds = {_tree_key(k): float(v)
                                         for k, v in d.get("tree_seconds", {}).items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                print(f"warning: ignoring unreadable cost table {self.path}", file=sys.stderr)

    def ensure(self, model: OrthrusLM, blocks: Sequence[int],
               trees: Sequence[tuple[int, int]] = (), repeats: int = COST_REPEATS) -> CostTable:
        """Measure, when the table lacks any of them, the sizes in ``blocks`` and the AR
        step (one iteration of the greedy decode loop at each, over a cache of ``max_len``
        positions) and the loop verifying trees at each ``(block, budget)`` of ``trees``
        (one block per budget). All of them are measured again, in the same rounds: costs
        are compared with each other, and a machine's speed drifts from one moment to the
        next (on a shared 2-core machine by 10 to 25 %), so a table never mixes moments."""
        wanted = sorted({1, *blocks})
        wanted_trees = sorted({(int(k), int(n)) for k, n in trees})
        if set(wanted) <= set(self.seconds) and set(wanted_trees) <= set(self.tree_seconds):
            return self
        missing, new_trees = wanted, wanted_trees
        self.seconds, self.tree_seconds = {}, {}
        what = [f"block sizes {missing}"] if missing else []
        what += [f"trees of {n} nodes at block {k}" for k, n in new_trees]
        print(f"measuring decode-loop iteration costs for {', '.join(what)} (batch "
              f"{self.key['batch_size']}, cache {self.key['max_len']}); cached in {self.path}",
              file=sys.stderr)
        tree_blocks = {n: k for k, n in new_trees}
        timed = sorted({*missing, *([max(tree_blocks.values())] if tree_blocks else [])})
        context = max(self.key["max_len"] - max(timed), 1)  # a cache of max_len positions
        t = _time(model, timed, self.key["batch_size"], context, repeats, tree_blocks)
        for k in missing:
            self.seconds[k] = t["ar_iteration"] if k == 1 else t["iteration"][k]
        for k, n in new_trees:
            self.tree_seconds[(k, n)] = t["tree_iteration"][n]
        self.save()
        return self

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        trees = {f"{k}/{n}": v for (k, n), v in sorted(self.tree_seconds.items())}
        tmp.write_text(json.dumps({"key": self.key, "seconds": self.seconds,
                                   "tree_seconds": trees}, indent=1) + "\n")
        os.replace(tmp, self.path)
        return self.path


def _tree_key(text: str) -> tuple[int, int]:
    """``"K/N"`` (a tree cost's key in the file) -> ``(K, N)``."""
    k, n = text.split("/")
    return int(k), int(n)


def _time(model: OrthrusLM, blocks: Sequence[int], batch_size: int, context: int,
          repeats: int, tree_blocks: dict[int, int] | None = None) -> dict:
    """The loop's iteration at ``blocks`` (and the AR loop's step), and with
    ``tree_blocks`` (budget -> block) verifying trees."""
    from infer.passes import time_passes

    tree_blocks = tree_blocks or {}
    return time_passes(model, blocks=blocks, batch_size=batch_size, context=context,
                       repeats=repeats, passes=False, tree_budgets=sorted(tree_blocks),
                       tree_blocks=tree_blocks)


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
    tree_budget: int = 0  # drafted nodes per tree at the drafting size (0: a chain)
    best_tree_budget: int = 0  # the tree budget of the best drafting option (0: a chain)

    @property
    def adaptive(self) -> bool:
        return len(self.blocks) > 1

    @property
    def ar_step_seconds(self) -> float | None:
        """The measured cost of an AR step of the loop (None for a plan not from costs)."""
        return self.costs[0] if self.costs else None

    def describe(self) -> str:
        if self.predicted_speedup is None:
            return f"block size {self.best}" + (f", trees of {self.tree_budget} nodes"
                                                 if self.tree_budget else "")
        if self.best == 1:
            tree = f" tree {self.best_tree_budget}" if self.best_tree_budget else ""
            why = ("no block pays" if self.best_block is None else
                   f"block {self.best_block}{tree} predicted {self.best_block_speedup:.3f}x, "
                   f"below the {1 + self.min_gain:.3f}x that drafting needs")
            return f"auto: plain AR steps ({why})"
        how = (f", switching among {list(self.blocks)} by the acceptance seen"
               if self.adaptive else "")
        tree = f", trees of {self.tree_budget} nodes" if self.tree_budget else ""
        return (f"auto: block size {self.best}{tree}{how}; predicted "
                f"{self.predicted_tokens_per_iteration:.2f} tokens/iteration, "
                f"{self.predicted_speedup:.2f}x AR")


def plan(profile: AcceptanceProfile, seconds: dict[int, float], *, max_block: int,
         adaptive: bool = True, min_gain: float = MIN_GAIN,
         tree_seconds: dict[tuple[int, int], float] | None = None,
         chains: bool = True) -> BlockPlan:
    """The block plan maximising expected tokens/s. Deterministic in its inputs.

    ``seconds``: cost per iteration by block size (must include 1, the AR step); sizes
    above ``max_block`` (the head's trained size) are not considered. ``tree_seconds``:
    cost per iteration verifying trees, by ``(block, budget)``; a tree is a candidate
    where the profile measured its budget (its expected tokens cut at that block's
    depth, :meth:`AcceptanceProfile.tree_expected_tokens`). ``chains``: whether chains are
    candidates too (else only trees and AR steps). Drafting is chosen only when its
    predicted speedup is at least ``1 + min_gain``. With ``adaptive``, the loop may also
    run plain AR steps where the text at hand accepts less than the profile."""
    if 1 not in seconds:
        raise ValueError("the cost table has no AR step (block size 1)")
    sizes = sorted(k for k in seconds if 1 <= k <= max_block)
    # candidates: (block, budget) -> (expected tokens per iteration, seconds); budget 0 = chain
    options = {(k, 0): (profile.expected_tokens(k), seconds[k]) for k in sizes
               if k == 1 or chains}
    for (k, n), sec in (tree_seconds or {}).items():
        if 2 <= k <= min(max_block, profile.block_size) and n in profile.tree_budgets:
            options[(k, n)] = (profile.tree_expected_tokens(n, k), sec)
    rate = {o: e / sec for o, (e, sec) in options.items()}
    ar_rate = rate[(1, 0)]
    drafting = [o for o in options if o[0] > 1]
    # ties: the smaller block, then the smaller budget
    top = max(drafting, key=lambda o: (rate[o], -o[0], -o[1])) if drafting else None
    best = top if top is not None and rate[top] >= (1 + min_gain) * ar_rate else (1, 0)
    k, n = best
    blocks = (k,) if k == 1 or not adaptive else (k, 1)
    prior = [profile.expected_tokens(i) for i in range(1, k + 1)]
    costs = [float(seconds.get(i, 0.0)) for i in range(1, k + 1)]
    prior[-1], costs[-1] = options[best]
    return BlockPlan(
        blocks=blocks, best=k, prior=tuple(prior), costs=tuple(costs),
        predicted_tokens_per_iteration=options[best][0],
        predicted_speedup=rate[best] / ar_rate, best_block=None if top is None else top[0],
        best_block_speedup=None if top is None else rate[top] / ar_rate, min_gain=min_gain,
        tree_budget=n, best_tree_budget=0 if top is None else top[1])
