"""The decoding engine: :class:`Generator`, a model in its decoding form with its compiled
decode programs, used by every caller (``infer.generate``, ``infer.bench``, training
evaluation, self-distillation).

Shapes are bucketed (batch, prompt length, cache length, output length), so prompts of
different lengths inside one bucket reuse one compiled program, and sampling parameters
are traced values, never recompiled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jinja2
import numpy as np
from jax.sharding import Mesh

from infer.block_size import (
    CANDIDATE_BLOCKS,
    AcceptanceProfile,
    BlockPlan,
    CostTable,
    plan,
    table_len,
)
from infer.buckets import (
    MAX_TREE_BUDGET,
    MODES,
    NO_LIMIT,
    DecodeSpec,
    bucket,
    cache_len,
    check_prompt_ids,
    default_batch_size,
    eos_array,
    max_block,
    prompt_bucket,
)
from infer.decode import FINISH_REASONS, DecodeInputs, row_keys, run, start
from infer.generation_config import GenerationConfig, read_generation_config
from infer.prompts import (
    check_messages,
    check_prompt_item,
    check_template_kwargs,
    load_tokenizer,
)
from infer.sampling import SamplingParams
from infer.tree import TreeScoring
from orthrus_jax.checkpoint import load_model
from orthrus_jax.cli import InputError
from orthrus_jax.config import DTYPE_NAMES, ModelConfig
from orthrus_jax.memory import peak_memory, tree_bytes
from orthrus_jax.model import (
    OrthrusLM,
    copy_diffusion,
    decoding_form,
    default_attention_kernel,
    set_attention_kernel,
)
from orthrus_jax.sharding import Rules

# A prompt of at least this many prefill chunks reports its progress (prefill_progress).
PROGRESS_CHUNKS = 4


@dataclasses.dataclass
class GenerationResult:
    """One prompt's output and statistics."""

    prompt: Any
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids only (EOS included when hit)
    text: str | None
    finish_reason: str | None  # "eos", "length" or "cache_full"
    iterations: int  # decode-loop iterations (the first token comes from prefill)
    tokens_per_iteration: float  # tokens committed per iteration, first token excluded
    tokens_per_second: float  # generated tokens / wall time of the batch, compile excluded
    accepted_hist: list[int]  # [K] iterations whose verify accepted 0 .. K-1 drafts
    block_hist: list[int]  # [K] iterations run at block size 1 .. K (1: plain AR steps)
    seconds: float  # wall time of the batch this prompt ran in
    time_to_first_token: float  # prefill + first token, wall time of the batch
    batch: int = 0  # index of that batch within the generate call
    # With block size "auto": the seconds plain AR steps would have taken for the batch's
    # loop (its longest row's tokens after the first, at the cost table's AR step), to set
    # against its loop seconds (``seconds - time_to_first_token``).
    ar_loop_seconds: float | None = None
    # Rows of the verify pass of the batch's drafting iterations: the block for a chain,
    # the tree budget + 1 for trees (1: the batch ran plain AR steps only).
    verify_rows: int = 1

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "iterations": self.iterations,
                "tokens_per_iteration": round(self.tokens_per_iteration, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "finish_reason": self.finish_reason}


def summarize(results: Sequence[GenerationResult]) -> dict:
    """Totals of one ``generate`` call. Each batch's results share its timings, so time
    is summed (and time to first token averaged) over batches, not prompts."""
    batches = {r.batch: r for r in results}.values()
    tokens = sum(len(r.token_ids) for r in results)
    iterations = sum(r.iterations for r in results)
    seconds = sum(r.seconds for r in batches)
    predicted_ar = [r.ar_loop_seconds for r in batches]
    loop = sum(r.seconds - r.time_to_first_token for r in batches)
    return {
        "tokens": tokens,
        "iterations": iterations,
        # the decode loop against AR steps at the measured cost (block size "auto" only)
        "loop_speedup_vs_cost_table": sum(predicted_ar) / loop
        if None not in predicted_ar and loop > 0 else None,
        # the first token of each prompt comes from prefill, not from an iteration
        "tokens_per_iteration": (tokens - len(results)) / iterations if iterations else 0.0,
        "seconds": seconds,
        "loop_seconds": loop,  # after each batch's prefill and first token
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "time_to_first_token": float(np.mean([r.time_to_first_token for r in batches])),
        "accepted_hist": np.sum([r.accepted_hist for r in results], axis=0).tolist(),
        "block_hist": np.sum([r.block_hist for r in results], axis=0).tolist(),
        "verify_rows": sorted({r.verify_rows for r in results}),
    }


def decode_dtype(stored: str, backend: str | None = None) -> str:
    """The dtype a model stored in ``stored`` decodes in on ``backend`` (default: JAX's):
    as stored, except 16-bit floats on CPU, which decode in float32. XLA's CPU dots have no
    16-bit kernels: it converts the weights to float32 inside the program and keeps those
    copies for the whole decode loop, so 16-bit weights there cost more memory in all
    (weights plus copies: 3x their bytes) and run about 3x slower than float32 ones."""
    backend = backend or jax.default_backend()
    return "float32" if backend == "cpu" and stored in ("bfloat16", "float16") else stored


def check_dtypes(param_dtype: str, compute_dtype: str | None = None) -> str:
    """The compute dtype for weights held in ``param_dtype`` (default: ``param_dtype``),
    checked. Allowed: the same dtype, or float32 computation over 16-bit weights (the
    fidelity option: every activation, the KV cache and accumulation in float32, so a
    K-token verify and a 1-token step round alike). A compute dtype narrower than the
    weights is refused (float32 weights rounded to bfloat16 at every use compute exactly
    what bfloat16 weights do, at twice the memory: give ``--dtype`` instead), and so is
    mixing bfloat16 with float16 (each loses what the other keeps)."""
    for flag, name in (("--dtype", param_dtype), ("--compute-dtype", compute_dtype)):
        if name is not None and name not in DTYPE_NAMES:
            raise InputError(f"{flag} {name!r}: choose one of {list(DTYPE_NAMES)}")
    compute_dtype = compute_dtype or param_dtype
    if compute_dtype != param_dtype and compute_dtype != "float32":
        hint = (f"give --dtype {compute_dtype} to store the weights in it" if
                param_dtype == "float32" else "use float32 or the parameter dtype")
        raise InputError(f"--compute-dtype {compute_dtype} with {param_dtype} weights "
                         f"(--dtype {param_dtype}): the compute dtype must be float32 or the "
                         f"parameter dtype; {hint}")
    return compute_dtype


class Generator:
    """A model with its compiled decode programs, cached per bucketed shape.

    ``max_len`` caps the KV cache (default: the model's ``max_position_embeddings``);
    prompts longer than ``chunk_size`` are prefilled in chunks of that size. ``profile``
    (the head's acceptance, see :mod:`infer.block_size`) enables ``block_size="auto"``;
    its pass-cost tables are kept under ``cost_root`` (default: the user cache folder).
    ``generation`` holds the model folder's ``generation_config.json`` (default: none):
    its end-of-sequence ids join the config's in :attr:`eos_ids`, and its sampling
    defaults are ``generation.sampling``. ``weights_out_in``: hold the projections
    ``[out, in]`` for decoding (default: where the weights live on CPU; see
    :func:`orthrus_jax.model.decoding_form`); a per-layer model given is changed in place.
    ``attention_kernel``: decode passes attend through the CPU kernel
    (:mod:`orthrus_jax.cpu_attention`; default: where the weights live on one CPU device,
    the compute dtype is float32 and the kernel builds).
    """

    def __init__(self, model: OrthrusLM, tokenizer: Any = None, *, chunk_size: int = 512,
                 max_len: int | None = None, mesh: Mesh | None = None,
                 rules: Rules | None = None, profile: AcceptanceProfile | None = None,
                 cost_root: str | Path | None = None, unstack: bool = True,
                 generation: GenerationConfig | None = None, weights_out_in: bool | None = None,
                 attention_kernel: bool | None = None):
        self._model = model
        self._kernel = attention_kernel
        self._unstack = unstack
        self._out_in = weights_out_in
        self.config = model.config
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        # called with (tokens prefilled, tokens in all) after each chunk of a long prompt
        self.prefill_progress: Callable[[int, int], None] | None = None
        self._warming = False
        self.max_len = max_len or self.config.max_position_embeddings
        self.mesh, self.rules = mesh, rules
        self.profile, self.cost_root = profile, cost_root
        self.generation = generation or GenerationConfig()
        self._compiled: dict[tuple, tuple[Callable, Callable]] = {}
        self.plans: dict[tuple, BlockPlan] = {}  # block plans chosen by "auto", by key
        self.compile_seconds: dict[tuple, float] = {}

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str | None = None,
             compute_dtype: str | None = None, mesh: Mesh | None = None,
             **kwargs) -> Generator:
        """The engine for a model folder: its weights (cast to ``dtype``, default
        :func:`decode_dtype`; placed on ``mesh``), tokenizer, acceptance profile and
        ``generation_config.json`` (checked before the weights are read).
        ``compute_dtype`` is the dtype of activations, the KV cache and matmul
        accumulation (default: ``dtype``); see :func:`check_dtypes` for the pairs allowed.
        ``kwargs`` go to the constructor."""
        if dtype is not None:
            check_dtypes(dtype, compute_dtype)  # a bad pair fails before the folder is read
        config = ModelConfig.from_json_file(model_dir)
        generation = read_generation_config(model_dir, config.vocab_size)
        dtype = dtype or decode_dtype(config.param_dtype)
        compute_dtype = check_dtypes(dtype, compute_dtype)
        # the tokenizer (transformers' imports, mostly) is read while the weights load
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            tokenizer = pool.submit(load_tokenizer, model_dir)
            model = load_model(model_dir, param_dtype=dtype, dtype=compute_dtype, mesh=mesh,
                               per_layer=True)
            return cls(model, tokenizer.result(), mesh=mesh,
                       profile=AcceptanceProfile.load(model_dir), generation=generation,
                       **kwargs)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end an answer unless a caller gives its own: ``config.json``'s
        ``eos_token_id`` and ``generation_config.json``'s, together."""
        return tuple(dict.fromkeys(self.config.eos_token_id + self.generation.eos_token_id))

    @property
    def model(self) -> OrthrusLM:
        """The model in its decoding form (:func:`orthrus_jax.model.decoding_form`, made on
        first use; a stacked model given is then let go): per-layer weights, their
        projections held ``[out..., in...]`` where ``weights_out_in`` (default: on CPU).
        With ``unstack=False``, the model as given (a stacked one runs its layers as one
        ``lax.scan``: slower decoding, but no second copy of weights a caller still
        holds)."""
        if self._unstack:
            self._model = decoding_form(self._model, self._out_in)
        if self._kernel is None:
            self._kernel = self.mesh is None and default_attention_kernel(self._model)
        if self._model.attention_kernel != self._kernel:
            set_attention_kernel(self._model, self._kernel)
        return self._model

    def describe_dtypes(self) -> str:
        """``"bfloat16"`` when weights and computation share a dtype, else ``"bfloat16
        weights, float32 compute"``."""
        c = self.config
        return c.param_dtype if c.dtype == c.param_dtype else \
            f"{c.param_dtype} weights, {c.dtype} compute"

    def memory_report(self) -> dict[str, Any]:
        """What the engine holds, in bytes: ``weight_bytes`` (the model in its decoding
        form), ``cache_bytes`` (the largest KV cache of the programs compiled so far) and
        the process's peak (:func:`orthrus_jax.memory.peak_memory`: device statistics
        where the backend keeps them, host peak RSS)."""
        caches = [tree_bytes(start_c.out_info.cache) for start_c, _ in self._compiled.values()]
        return {"weight_bytes": tree_bytes(self.model), "cache_bytes": max(caches, default=0),
                **peak_memory()}

    def update_diffusion(self, source: OrthrusLM) -> None:
        """Swap in the diffusion tensors of ``source`` (same config; stacked or per-layer
        form), keeping every compiled program: training evaluates each checkpoint this way
        without recompiling. The acceptance profile, which belonged to the old tensors,
        is dropped."""
        if source.config.block_size != self.config.block_size:
            raise ValueError(f"block size {source.config.block_size} differs from the "
                             f"engine's {self.config.block_size}")
        copy_diffusion(source, self.model)
        self.profile = None
        self.plans.clear()

    # ----------------------------------------------------------------- prompts
    def encode(self, prompt: str | Sequence[dict], chat: bool = False,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a text prompt (or of chat ``messages``) with the model's tokenizer;
        ``template_kwargs`` are extra variables for the chat template (e.g.
        ``{"enable_thinking": False}`` for Qwen3), checked by
        :func:`infer.prompts.check_template_kwargs`."""
        template_kwargs = check_template_kwargs(template_kwargs)
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: give token ids "
                             "(--prompt-ids, or prompt_ids in --prompts-file)")
        if not isinstance(prompt, str):
            check_messages(prompt)
        if not isinstance(prompt, str) or chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                list(prompt)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("the tokenizer has no chat template (drop --chat, or give "
                                 "a plain prompt)")
            try:
                return list(self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                    **template_kwargs))
            except jinja2.TemplateError as e:  # the template's own raise_exception(...)
                raise InputError(f"the chat template refused the messages: {e}") from e
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def encode_item(self, item: dict, chat: bool = False,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of one prompts-file record: ``{"prompt_ids": [...]}``, ``{"messages":
        [...]}`` (always through the chat template) or ``{"prompt": text}``."""
        check_prompt_item(item)
        if "prompt_ids" in item:
            return [int(t) for t in item["prompt_ids"]]
        if "messages" in item:
            return self.encode(item["messages"], chat=True, template_kwargs=template_kwargs)
        return self.encode(item["prompt"], chat, template_kwargs)

    def decode_text(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the problem unless ``ids`` is a prompt this engine
        can decode (:func:`infer.buckets.check_prompt_ids`)."""
        check_prompt_ids(ids, self.config.vocab_size, self.max_len)

    def _report_prefill(self, done, total) -> None:
        """The host side of a long prefill's progress (a ``jax.debug.callback``)."""
        if self.prefill_progress is not None and not self._warming:
            self.prefill_progress(int(done), int(total))

    # ----------------------------------------------------------------- compile
    def prompt_bucket(self, rows: Sequence[Sequence[int]]) -> int:
        """The padded prompt length of a batch of ``rows`` (:func:`infer.buckets.prompt_bucket`)."""
        return prompt_bucket(max(len(r) for r in rows), self.chunk_size)

    def batch_shape(self, rows: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int]:
        """``(prompt_len, max_len)`` of a batch of ``rows`` that generate up to
        ``max_new_tokens`` each: the padded prompt length its prefill runs
        (:meth:`prompt_bucket`) and the cache length it decodes over
        (:func:`infer.buckets.cache_len`). Batches of one shape share their programs."""
        longest = max(len(r) for r in rows)
        return (prompt_bucket(longest, self.chunk_size),
                cache_len(longest, max_new_tokens, self.max_len))

    def spec(self, mode: str, blocks: tuple[int, ...], greedy: bool, batch: int,
             prompt_len: int, out_len: int, n_eos: int, tree_budget: int = 0,
             max_len: int | None = None) -> DecodeSpec:
        """The :class:`~infer.buckets.DecodeSpec` of a batch of bucketed shape, over a cache
        of ``max_len`` positions (default: ``prompt_len + out_len``, at most the
        engine's)."""
        max_len = min(prompt_len + out_len, self.max_len) if max_len is None else max_len
        return DecodeSpec(mode=mode, blocks=tuple(blocks), greedy=greedy, batch=batch,
                          tree_budget=tree_budget,
                          prompt_len=prompt_len, out_len=out_len,
                          max_len=max_len, n_eos=n_eos,
                          max_block=max_block(mode, self.config.block_size),
                          prefill_chunk=self.chunk_size if prompt_len > self.chunk_size
                          else None,
                          prefill_progress=self.prefill_progress is not None
                          and prompt_len >= PROGRESS_CHUNKS * self.chunk_size)

    def tree_scoring(self, spec: DecodeSpec) -> TreeScoring | None:
        """How a program of ``spec`` scores its draft trees (None without a tree budget):
        with the table the head's acceptance profile fitted (:mod:`infer.tree_calibration`),
        else by the log-probabilities themselves. Always an array pair for a tree
        program, so a program compiled once runs with either."""
        if not spec.tree_budget:
            return None
        depth = max(spec.max_block - 1, 1)
        table = self.profile.tree_calibration if self.profile is not None else ()
        return (TreeScoring.calibrated(table, depth) if table else
                TreeScoring.product(depth))

    def compile(self, spec: DecodeSpec) -> tuple[Callable, Callable]:
        """The compiled (start, run) programs of a spec (:meth:`program_keys`), compiled
        on first use and run once on a dummy batch (the seconds of both recorded in
        ``compile_seconds``).

        XLA's first execution of a program costs more than the next ones (on the CPU
        backend about 0.6 s for SmolLM2's prefill, and a slower first loop iteration):
        paid here, it is part of getting the program ready, and the first real batch
        decodes at the speed of every later one."""
        if spec not in self._compiled:
            t0 = time.perf_counter()
            (start_fn, start_args), (run_fn, run_args) = self.lowering(spec)
            start_c = start_fn.lower(*start_args).compile()
            run_c = run_fn.lower(*run_args).compile()
            model, prompts, lengths, inputs, key, rows = start_args
            inputs = dataclasses.replace(inputs, max_new_tokens=jnp.full((spec.batch,), 2,
                                                                         jnp.int32))
            self._warming = True  # the dummy batch reports no prefill progress
            try:
                state = start_c(model, prompts, lengths, inputs, key, rows)
                jax.block_until_ready(run_c(model, state, inputs, jnp.int32(1)))  # one iteration
            finally:
                self._warming = False
            self._compiled[spec] = (start_c, run_c)
            self.compile_seconds[spec] = time.perf_counter() - t0
        return self._compiled[spec]

    def program_keys(self, prompts: Sequence[Sequence[int]], *, mode: str = "orthrus",
                     max_new_tokens: int = 256, greedy: bool = True,
                     eos_ids: Sequence[int] | None = None, batch_size: int | None = None,
                     block_size: int | None = None, tree_budget: int | None = None
                     ) -> list[DecodeSpec]:
        """The specs of the programs ``generate(prompts, ...)`` with these arguments runs
        (one per batch shape, :meth:`batch_shape`), in order of first use; a fixed block
        size only (``"auto"`` measures costs first)."""
        if block_size == "auto":
            raise ValueError("program_keys takes a fixed block size, not 'auto'")
        self._check_block_size(block_size)
        batch_size = batch_size or default_batch_size(len(prompts))
        out_len = bucket(max_new_tokens)
        n_eos = eos_array(self.eos_ids, eos_ids).shape[0]
        if tree_budget == "auto":
            raise ValueError("program_keys takes a fixed tree budget, not 'auto'")
        chosen = BlockPlan((1,), 1) if mode == "ar" else self.block_plan(
            block_size, tree_budget=tree_budget)
        specs: list[DecodeSpec] = []
        for lo in range(0, len(prompts), batch_size):
            prompt_len, max_len = self.batch_shape(prompts[lo:lo + batch_size], max_new_tokens)
            spec = self.spec(mode, chosen.blocks, greedy, batch_size, prompt_len, out_len,
                             n_eos, chosen.tree_budget, max_len)
            if spec not in specs:
                specs.append(spec)
        return specs

    def lowering(self, spec: DecodeSpec) -> tuple[tuple[Callable, tuple], tuple[Callable, tuple]]:
        """The jitted start and run programs of a spec (:meth:`program_keys`), each
        with the arguments it is lowered with (the run's state abstract). With a model of
        ``ShapeDtypeStruct`` leaves nothing is allocated: that is how a plan sizes them."""
        batch, M = spec.batch, spec.max_block
        inputs = DecodeInputs(jnp.zeros((batch,), jnp.int32), jnp.zeros((spec.n_eos,), jnp.int32),
                              SamplingParams.make(1.0),
                              jnp.zeros((M,), jnp.float32) if spec.adaptive else None,
                              jnp.ones((M,), jnp.float32) if spec.adaptive else None,
                              self.tree_scoring(spec))
        prompts = jnp.zeros((batch, spec.prompt_len), jnp.int32)
        lengths = jnp.ones((batch,), jnp.int32)
        progress = self._report_prefill if spec.prefill_progress else None
        start_fn = jax.jit(lambda m, p, n, i, k, r: start(
            m, p, n, i, row_keys(k, r), spec, mesh=self.mesh, rules=self.rules,
            progress=progress))
        args = (self.model, prompts, lengths, inputs, jax.random.key(0), lengths)
        state = jax.eval_shape(start_fn, *args)
        run_fn = jax.jit(lambda m, s, i, n: run(m, s, i, n, spec), donate_argnums=1)
        return (start_fn, args), (run_fn, (self.model, state, inputs, jnp.int32(0)))

    # ----------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        mode: str = "orthrus",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
        stream: Callable[[int, list[int]], None] | None = None,
        stream_every: int = 1,
        labels: Sequence[Any] | None = None,
        block_size: int | str | None = None,
        adaptive: bool = True,
        first_row: int = 0,
        tree_budget: int | str | None = None,
    ) -> list[GenerationResult]:
        """Generate for each prompt (a list of token ids); results in prompt order.

        ``stream(index, new_ids)`` is called with each prompt's newly committed tokens every
        ``stream_every`` loop iterations; without it the whole loop is one compiled call.

        ``block_size`` (Orthrus mode): the block drafted per iteration, ``1 <= K' <= K``
        (the head's trained ``K``, the default), or ``"auto"``: the size with the most
        expected tokens/s on this machine (see :meth:`block_plan`), switching to AR steps
        and back as the acceptance seen while decoding suggests when ``adaptive`` and
        greedy. The output does not depend on it (greedy: token for token; sampling: in
        distribution).

        ``tree_budget`` (Orthrus mode): ``N > 0`` verifies a draft tree of ``N`` nodes per
        iteration instead of the chain (:mod:`infer.tree`; the verify pass has ``N + 1``
        rows, the tree's depth is at most the block size less one); None: the chain (the
        budget ``K' - 1`` laid out as a path); 0: no drafted node, plain AR steps;
        ``"auto"``: the chain or the tree budget with the most expected tokens/s, chosen with
        the block size (:meth:`block_plan`). Outputs do not depend on it either.

        ``temperature`` 0 (the default) is greedy; ``top_k`` 0 and ``top_p`` 1 are off
        (the model folder's defaults are ``self.generation.sampling.kwargs()``).
        ``eos_ids``: the ids that end an answer (default :attr:`eos_ids`, the model's);
        given, they replace the model's (``[]``: none).

        ``first_row``: the index of ``prompts[0]`` in a larger call split into pieces (a
        multiple of the batch size): row ``i`` draws with the key of row ``first_row + i``
        and its batch is numbered as in the whole call, so the pieces give what the whole
        call would.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        sampling = SamplingParams.make(temperature, top_k, top_p)
        greedy = temperature == 0.0
        if mode == "ar" and block_size not in (None, 1):
            raise ValueError(f"block_size={block_size!r} applies to mode 'orthrus' only")
        if mode == "ar" and tree_budget is not None:
            raise ValueError(f"tree_budget={tree_budget!r} applies to mode 'orthrus' only")
        self._check_block_size(block_size)
        self._check_tree_budget(tree_budget)
        for ids in prompts:
            self.check_ids(ids)
        eos_arr = eos_array(self.eos_ids, eos_ids)
        batch_size = batch_size or default_batch_size(len(prompts))
        out_len = bucket(max_new_tokens)  # tokens past a row's budget are never stored
        key = jax.random.key(seed)  # row i draws with fold_in(key, i) (decode.row_keys)
        results: list[GenerationResult] = []
        for lo in range(0, len(prompts), batch_size):
            rows = list(prompts[lo:lo + batch_size])
            shape = self.batch_shape(rows, max_new_tokens)
            block_plan = BlockPlan((1,), 1) if mode == "ar" else self.block_plan(
                block_size, tree_budget=tree_budget, greedy=greedy, batch_size=batch_size,
                max_len=shape[1], adaptive=adaptive)
            results += self._batch(rows, first_row + lo, batch_size, shape, out_len, mode,
                                   block_plan, greedy, sampling, max_new_tokens, eos_arr, key,
                                   stream, stream_every)
        for r, label in zip(results, labels or [None] * len(results), strict=True):
            r.prompt = label if labels is not None else r.prompt_ids
        return results

    def warm_up(self, prompts: Sequence[Sequence[int]], *, batch_size: int | None = None,
                max_new_tokens: int = 256, **kwargs) -> dict[int, GenerationResult]:
        """Compile and run once every program that ``generate(prompts, ...)`` with the same
        arguments needs, by generating one batch per distinct batch shape
        (:meth:`batch_shape`) only.

        Returns the results of the prompts it ran, by index into ``prompts``.
        """
        batch_size = batch_size or default_batch_size(len(prompts))
        first: dict[tuple[int, int], int] = {}  # batch shape -> offset of its first batch
        for lo in range(0, len(prompts), batch_size):
            first.setdefault(self.batch_shape(prompts[lo:lo + batch_size], max_new_tokens), lo)
        done: dict[int, GenerationResult] = {}
        for lo in first.values():
            results = self.generate(prompts[lo:lo + batch_size], batch_size=batch_size,
                                    first_row=lo, max_new_tokens=max_new_tokens, **kwargs)
            done.update({lo + i: r for i, r in enumerate(results)})
        return done

    # ----------------------------------------------------------------- block size
    def _check_block_size(self, block_size: int | str | None) -> None:
        K = self.config.block_size
        if block_size is None or block_size == "auto":
            if block_size == "auto" and self.profile is None:
                raise ValueError(
                    "block size 'auto' needs the head's acceptance profile (acceptance.json "
                    "in the model folder): measure it with python -m infer.calibrate --model "
                    "DIR, or give a block size")
            return
        if isinstance(block_size, str) or not 1 <= int(block_size) <= K:
            raise ValueError(f"block size {block_size!r}: choose 'auto' or an integer from 1 "
                             f"to {K} (the size this head was trained at)")

    @staticmethod
    def _check_tree_budget(tree_budget: int | str | None) -> None:
        if tree_budget is None or tree_budget == "auto":
            return
        if (isinstance(tree_budget, (str, bool, float))
                or not 0 <= int(tree_budget) <= MAX_TREE_BUDGET):
            raise ValueError(f"tree budget {tree_budget!r}: choose 'auto' or an integer "
                             f"from 0 (plain AR steps) to {MAX_TREE_BUDGET}")

    def block_plan(self, block_size: int | str | None, *, tree_budget: int | str | None = None,
                   greedy: bool = True,
                   batch_size: int = 1, max_len: int | None = None,
                   adaptive: bool = True) -> BlockPlan:
        """The block sizes a batch decodes with. ``"auto"`` measures (once per machine,
        model shape, batch size and cache length; then cached on disk) the cost of an
        iteration at each candidate size up to the head's, and maximises expected
        tokens/s under the head's acceptance profile; sampled batches keep one size.
        ``tree_budget`` ``"auto"`` adds the trees the profile measured (at the head's
        block size) to the candidates; a fixed budget with block size ``"auto"`` chooses
        between those trees and plain AR steps.
        The costs are those of the decode loop itself over a cache of ``max_len``
        positions (default: the engine's), the length the batch will decode over, measured
        at :func:`infer.block_size.table_len` of it."""
        self._check_block_size(block_size)
        self._check_tree_budget(tree_budget)
        K = self.config.block_size
        if tree_budget == 0:  # no drafted node: plain AR steps
            return BlockPlan((1,), 1)
        if block_size != "auto" and tree_budget != "auto":
            k = K if block_size is None else int(block_size)
            if tree_budget and k == 1:
                raise ValueError(f"tree budget {tree_budget} needs a block size of at least 2 "
                                 "(the tree's depth is at most the block size less one)")
            return BlockPlan((k,), k, tree_budget=int(tree_budget or 0))
        if tree_budget == "auto" and block_size not in (None, "auto"):
            raise ValueError(f"tree budget 'auto' chooses the block size too: leave the block "
                             f"size unset or 'auto', not {block_size!r}")
        if tree_budget is not None and self.profile is None:
            raise ValueError(
                "tree budget 'auto' needs the head's acceptance profile (acceptance.json in "
                "the model folder): measure it with python -m infer.calibrate --model DIR")
        budgets = (() if tree_budget is None else self.profile.tree_budgets
                   if tree_budget == "auto" else (int(tree_budget),))
        if tree_budget is not None and not set(budgets) <= set(self.profile.tree_budgets):
            raise ValueError(
                f"tree budget {tree_budget!r}: the head's acceptance profile has no trees"
                f"{' of that size' if self.profile.tree_budgets else ''} (measured: "
                f"{list(self.profile.tree_budgets)}); measure them with python -m "
                "infer.calibrate --model DIR --tree-budgets N,..., or give the block size")
        max_len = table_len(max_len or self.max_len, self.max_len)  # the cost table's
        key = (greedy and adaptive, batch_size, max_len, tree_budget)
        if key not in self.plans:
            table = CostTable(self.config, batch_size, max_len, self.cost_root,
                              weights_out_in=self.model.out_in,
                              attention_kernel=self.model.attention_kernel)
            trees = [(self.profile.tree_block(n), n) for n in budgets
                     if self.profile.block_size <= K]
            table.ensure(self.model, [k for k in CANDIDATE_BLOCKS if k <= K], trees)
            # only the trees asked for: the table may hold others, measured for another call
            self.plans[key] = plan(self.profile, table.seconds, max_block=K,
                                   adaptive=greedy and adaptive,
                                   tree_seconds={t: table.tree_seconds[t] for t in trees},
                                   chains=not isinstance(tree_budget, int))
        return self.plans[key]

    def _batch(self, rows, offset, batch_size, shape, out_len, mode, block_plan, greedy,
               sampling, max_new, eos, key, stream, stream_every) -> list[GenerationResult]:
        n = len(rows)
        prompt_len, max_len = shape
        # A plan of plain AR steps runs the AR program itself (compiled once for both).
        program_mode = "ar" if block_plan.blocks == (1,) else mode
        spec = self.spec(program_mode, block_plan.blocks, greedy, batch_size, prompt_len,
                         out_len, eos.shape[0],
                         block_plan.tree_budget if program_mode == "orthrus" else 0, max_len)
        start_c, run_c = self.compile(spec)
        padded = np.zeros((batch_size, prompt_len), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
            lengths[i] = len(r)
        budget = np.full((batch_size,), max_new, np.int32)
        budget[n:] = 1  # padding rows finish with their first token
        prior = costs = None
        if block_plan.adaptive:
            prior, costs = (np.ones((spec.max_block,), np.float32) for _ in range(2))
            prior[:len(block_plan.prior)] = block_plan.prior
            costs[:len(block_plan.costs)] = block_plan.costs
            prior, costs = jnp.asarray(prior), jnp.asarray(costs)
        inputs = DecodeInputs(jnp.asarray(budget), eos, sampling, prior, costs,
                              self.tree_scoring(spec))

        t0 = time.perf_counter()
        row_ids = np.arange(offset, offset + batch_size, dtype=np.int32)
        state = start_c(self.model, jnp.asarray(padded), jnp.asarray(lengths), inputs, key,
                        row_ids)
        jax.block_until_ready(state.tokens)  # prefill + first token
        ttft = time.perf_counter() - t0
        shown = [0] * n
        if stream is None:
            state = run_c(self.model, state, inputs, jnp.int32(NO_LIMIT))
        else:
            self._emit(stream, offset, shown, np.asarray(state.tokens), np.ones(n, int))
            while True:
                state = run_c(self.model, state, inputs, jnp.int32(stream_every))
                done, counts = np.asarray(state.done), np.asarray(state.num_generated)
                self._emit(stream, offset, shown, np.asarray(state.tokens), counts)
                if done.all():
                    break
        tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
        seconds = time.perf_counter() - t0
        finish = np.asarray(state.finish)
        iterations = np.asarray(state.iterations)
        width = max_block(mode, self.config.block_size)  # [K] in Orthrus mode, whatever ran
        hist = np.zeros((batch_size, width), np.int64)
        block_hist = np.zeros((batch_size, width), np.int64)
        hist[:, :spec.max_block] = np.asarray(state.accepted_hist)
        block_hist[:, :spec.max_block] = np.asarray(state.block_hist)
        verify_rows = spec.tree_budget + 1 if spec.tree_budget else max(spec.blocks)
        ar_loop = None
        if block_plan.ar_step_seconds is not None:
            ar_loop = float(max(counts[:n]) - 1) * block_plan.ar_step_seconds
        out = []
        for i, r in enumerate(rows):
            ids = tokens[i, :counts[i]].tolist()
            it = int(iterations[i])
            out.append(GenerationResult(
                prompt=None, prompt_ids=list(map(int, r)), token_ids=ids,
                text=self.decode_text(ids), finish_reason=FINISH_REASONS[int(finish[i])],
                iterations=it, tokens_per_iteration=(len(ids) - 1) / it if it else 0.0,
                tokens_per_second=len(ids) / seconds, accepted_hist=hist[i].tolist(),
                block_hist=block_hist[i].tolist(),
                seconds=seconds, time_to_first_token=ttft, batch=offset // batch_size,
                ar_loop_seconds=ar_loop, verify_rows=verify_rows))
        return out

    @staticmethod
    def _emit(stream, offset, shown, tokens, counts) -> None:
        for i in range(len(shown)):
            if counts[i] > shown[i]:
                stream(offset + i, tokens[i, shown[i]:counts[i]].tolist())
                shown[i] = int(counts[i])


def generate(model_dir: str | Path, prompts: Sequence[str | Sequence[int]], *,
             chat: bool = False, dtype: str | None = None, compute_dtype: str | None = None,
             **kwargs) -> list[GenerationResult]:
    """Load ``model_dir`` (``dtype``, ``compute_dtype``: see :meth:`Generator.load`) and
    generate for text prompts or token-id lists.

    Keyword arguments are those of :meth:`Generator.generate`. Without any of
    ``temperature``, ``top_k`` and ``top_p`` the folder's sampling defaults apply (its
    ``generation_config.json``; greedy without one, or without ``do_sample: true``);
    with any of them, those given (the others off), as :meth:`Generator.generate` takes
    them.
    """
    gen = Generator.load(model_dir, dtype=dtype, compute_dtype=compute_dtype)
    if not {"temperature", "top_k", "top_p"} & kwargs.keys():
        kwargs.update(gen.generation.sampling.kwargs())
    ids = [gen.encode(p, chat) if isinstance(p, str) else list(p) for p in prompts]
    return gen.generate(ids, labels=list(prompts), **kwargs)
