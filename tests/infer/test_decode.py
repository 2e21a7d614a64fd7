"""The decode loops through :class:`infer.generate.Generator`, on tiny random models (CPU).

- greedy Orthrus equals greedy AR token for token (float32), with EOS hits inside a block;
- a model whose diffusion view often agrees with the AR view (accepted lengths > 1);
- batched rows equal each row alone; sharded equals unsharded;
- compiled programs are reused within a shape bucket and across sampling values;
- streaming, bad input, a cache that fills.

Compiling is most of the cost: one Generator per model is shared by all tests (its
programs are cached per bucketed shape), and the tests reuse the same shapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infer.engine import Generator
from orthrus_jax.checkpoint import load_model, save_model
from orthrus_jax.sharding import make_mesh, shard_model
from tests.hf_reference import hf_model, to_orthrus

MAX_NEW = 24
N_PROMPTS = 10

# name: (model_type, tied, block_size, seed). Tied models use initializer_range 0.2 (HF
# default 0.02): with small weights the tied embedding dominates the logits and greedy
# output degenerates into repeating the input token.
SPECS = {
    "qwen3-untied-K8": ("qwen3", False, 8, 0),
    "qwen3-tied-K16": ("qwen3", True, 16, 1),
    "llama-untied-K4": ("llama", False, 4, 2),
    "llama-tied-K8": ("llama", True, 8, 3),
    "agree": ("qwen3", False, 8, 2),  # + a shared embedding component, see _agreeing_model
}
_HF: dict = {}
_GENS: dict[str, Generator] = {}


def _hf(name: str):
    model_type, tied, _, seed = SPECS[name]
    if (model_type, tied, seed) not in _HF:
        extra = dict(initializer_range=0.2) if tied else {}
        _HF[model_type, tied, seed] = hf_model(model_type, tied, seed, **extra)
    return _HF[model_type, tied, seed]


def _model(name: str):
    """A fresh OrthrusLM (diffusion weights = copies of the AR ones)."""
    model = to_orthrus(_hf(name), block_size=SPECS[name][2])
    if name == "agree":
        _make_agreeing(model)
    return model


def _make_agreeing(model, alpha: float = 1.0) -> None:
    """Add one shared direction ``alpha * s`` to every embedding row and make the MASK row
    just that: the model's prediction then depends less on the input token at a position
    (a MASK slot of the draft looks much like any real token), so the drafts often agree
    with the verifier, but not always (alpha tuned for a mix of accepted lengths)."""
    E = np.asarray(model.embed_tokens[...]).copy()
    s = np.random.default_rng(1).standard_normal(E.shape[1]).astype(np.float32)
    s *= np.linalg.norm(E, axis=1).mean() / np.linalg.norm(s)
    E += alpha * s
    E[model.config.mask_token_id] = alpha * s
    model.embed_tokens.set_value(jnp.asarray(E))


def _gen(name: str) -> Generator:
    if name not in _GENS:
        _GENS[name] = Generator(_model(name))
    return _GENS[name]


def _prompts(seed: int, n: int = N_PROMPTS, vocab: int = 512) -> list[list[int]]:
    """Mixed lengths in [1, 16] (one prompt-length bucket), including both ends."""
    rng = np.random.default_rng(seed)
    lengths = [1, 16] + rng.integers(2, 16, n - 2).tolist()
    rng.shuffle(lengths)
    return [rng.integers(0, vocab, n_).tolist() for n_ in lengths]


def _run(gen, prompts, mode, batch_size, eos=(), **kwargs):
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return gen.generate(prompts, mode=mode, batch_size=batch_size, eos_ids=list(eos), **kwargs)


def _streamed(gen, prompts, mode, batch_size, eos=(), stream_every=1, **kwargs):
    """Results and, per prompt, the list of streamed chunks (with ``stream_every=1``: the
    prefill token, then what each loop iteration committed)."""
    chunks: dict[int, list[list[int]]] = {i: [] for i in range(len(prompts))}
    res = _run(gen, prompts, mode, batch_size, eos,
               stream=lambda i, new: chunks[i].append(list(new)), stream_every=stream_every,
               **kwargs)
    return res, [chunks[i] for i in range(len(prompts))]


def _summary(results):
    return [(r.token_ids, r.finish_reason) for r in results]


def _truncate(tokens, eos, max_new=MAX_NEW):
    """What a run with ``eos`` must give, from a run without EOS of ``max_new`` tokens."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1], "eos"
    assert len(tokens) == max_new
    return tokens, "length"


def _pick_eos(outputs, chunks, target=5):
    """EOS ids for a rerun of the prompts whose EOS-free outputs are ``outputs``.

    The first id first occurs in some row ``r`` at a position ``p`` near ``target`` that is
    not the last token of the Orthrus iteration that committed it (``chunks``): the rerun
    must cut that iteration mid-block. A second id is the very first (prefill) token of
    another row, when that leaves some row without any EOS. Returns ``(eos, r, p)``.
    """
    cands = []
    for r, toks in enumerate(outputs):
        block_ends = set((np.cumsum([len(c) for c in chunks[r]]) - 1).tolist())
        for p, t in enumerate(toks):
            if p == 0 or t in toks[:p] or p in block_ends:
                continue
            if all(t in o for o in outputs):
                continue
            cands.append((abs(p - target), r, p, t))
    assert cands, "no token of the outputs is committed mid-block: cannot place an EOS there"
    _, r, p, t = min(cands)
    eos = [t]
    for r2, toks in enumerate(outputs):
        t2 = toks[0]
        trial = eos + [t2]
        if r2 != r and t2 not in eos and t2 not in outputs[r][:p + 1] and \
                any(not set(o) & set(trial) for o in outputs):
            eos = trial
            break
    return eos, r, p


def _check_stats(results, mode, block_size):
    """Statistics agree with the tokens: each iteration commits 1..K tokens (the first
    token comes from prefill); ``accepted_hist[i]`` counts iterations whose verify
    accepted ``i`` drafts, so ``i + 1`` tokens before any cut at EOS or the budget, which
    only the last iteration of a row can have."""
    for r in results:
        n = len(r.token_ids)
        hist = r.accepted_hist
        assert len(hist) == (block_size if mode == "orthrus" else 1)
        assert sum(hist) == r.iterations
        accepted = sum((i + 1) * h for i, h in enumerate(hist))
        if r.finish_reason in ("eos", "length") and r.iterations:
            assert n - 1 <= accepted <= n - 1 + block_size - 1
        else:
            assert accepted == n - 1
        if mode == "ar":
            assert r.iterations == n - 1
        if r.iterations:
            assert r.tokens_per_iteration == pytest.approx((n - 1) / r.iterations)


# --------------------------------------------------------------------------- 1

CASES = [("qwen3-untied-K8", 4), ("qwen3-untied-K8", 1), ("qwen3-tied-K16", 4),
         ("llama-untied-K4", 4), ("llama-untied-K4", 1), ("llama-tied-K8", 4)]


@pytest.mark.slow
@pytest.mark.parametrize("name,batch_size", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_greedy_orthrus_equals_ar(name, batch_size):
    gen = _gen(name)
    K = SPECS[name][2]
    prompts = _prompts(seed=100 + SPECS[name][3])

    ar = _run(gen, prompts, "ar", batch_size)
    orthrus, chunks = _streamed(gen, prompts, "orthrus", batch_size)
    assert _summary(orthrus) == _summary(ar)
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_NEW for r in ar)
    _check_stats(ar, "ar", K)
    _check_stats(orthrus, "orthrus", K)
    for r, c in zip(orthrus, chunks, strict=True):
        assert len(c) == r.iterations + 1 and len(c[0]) == 1

    eos, row, pos = _pick_eos([r.token_ids for r in ar], chunks)
    want = [_truncate(r.token_ids, eos) for r in ar]
    assert want[row] == (ar[row].token_ids[:pos + 1], "eos")
    assert {"eos", "length"} <= {w[1] for w in want}
    for mode in ("ar", "orthrus"):
        res = _run(gen, prompts, mode, batch_size, eos)
        assert _summary(res) == want, mode
        _check_stats(res, mode, K)


# --------------------------------------------------------------------------- 2


@pytest.mark.slow
def test_agreeing_model_accepts_several_drafts():
    gen = _gen("agree")
    K = SPECS["agree"][2]
    prompts = _prompts(seed=7)
    ar = _run(gen, prompts, "ar", 4)
    orthrus, chunks = _streamed(gen, prompts, "orthrus", 4)
    assert _summary(orthrus) == _summary(ar)
    _check_stats(orthrus, "orthrus", K)

    hist = np.sum([r.accepted_hist for r in orthrus], axis=0)
    iterations = sum(r.iterations for r in orthrus)
    tpi = sum(len(r.token_ids) - 1 for r in orthrus) / iterations
    assert tpi > 1.5, (tpi, hist)
    assert np.count_nonzero(hist[2:]) >= 2, hist  # several accepted lengths >= 2 drafts
    assert hist[:-1].sum() > 0 and hist[-1] < iterations, hist  # partial, not always K

    # an EOS inside a block of several accepted drafts
    eos, row, pos = _pick_eos([r.token_ids for r in ar], chunks)
    want = [_truncate(r.token_ids, eos) for r in ar]
    assert want[row] == (ar[row].token_ids[:pos + 1], "eos")
    for mode in ("ar", "orthrus"):
        assert _summary(_run(gen, prompts, mode, 4, eos)) == want, mode


# --------------------------------------------------------------------------- 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-untied-K8", "agree"])
def test_batched_rows_equal_rows_alone(name):
    gen = _gen(name)
    prompts = _prompts(seed=11)
    alone = _run(gen, prompts, "orthrus", 1)
    eos = [alone[0].token_ids[5]]  # some rows stop early, the others ride along
    alone = _run(gen, prompts, "orthrus", 1, eos)
    batched = _run(gen, prompts, "orthrus", 4, eos)
    assert {"eos", "length"} <= {r.finish_reason for r in alone}
    assert _summary(batched) == _summary(alone)
    assert [r.iterations for r in batched] == [r.iterations for r in alone]
    assert [r.accepted_hist for r in batched] == [r.accepted_hist for r in alone]


# --------------------------------------------------------------------------- 4


@pytest.mark.slow
def test_sharded_equals_unsharded(tmp_path):
    name = "qwen3-untied-K8"
    prompts = _prompts(seed=100 + SPECS[name][3])
    ref = _summary(_run(_gen(name), prompts, "orthrus", 4))

    mesh = make_mesh({"data": 2, "tensor": 2, "fsdp": 2})
    sharded = shard_model(_model(name), mesh)
    assert len(sharded.layers.attn.q_proj[...].sharding.device_set) == 8
    gen = Generator(sharded)
    # The decoder's per-layer weights keep the stacked weights' sharding, minus the layers
    # axis; on CPU they are held [out, in], the axes moved with the weight's.
    _, d, q, h = sharded.layers.attn.q_proj[...].sharding.spec
    assert gen.model.out_in
    assert gen.model.layers.attn.q_proj.get_value()[1].sharding.spec == P(q, h, d)
    assert _summary(_run(gen, prompts, "orthrus", 4)) == ref
    assert _summary(_run(gen, prompts, "ar", 4)) == ref

    save_model(_model(name), tmp_path)
    loaded = load_model(tmp_path, mesh=make_mesh({"tensor": 2, "data": 4}))
    assert len(loaded.layers.diff_attn.k_proj[...].sharding.device_set) == 8
    assert _summary(_run(Generator(loaded), prompts, "orthrus", 4)) == ref


# --------------------------------------------------------------------------- 5


@pytest.mark.slow
def test_one_compile_per_bucket_and_sampling_values_do_not_recompile(backend_compiles):
    gen = _gen("llama-tied-K8")
    B = 2  # a batch size no other greedy test uses: these programs are new here
    rng = np.random.default_rng(5)
    for mode in ("orthrus", "ar"):
        before = set(gen._compiled)
        calls = [dict(length=3, max_new_tokens=MAX_NEW, eos=()),
                 dict(length=9, max_new_tokens=MAX_NEW - 4, eos=(7,)),  # same out bucket
                 dict(length=15, max_new_tokens=MAX_NEW, eos=(7, 9, 11))]  # same eos bucket
        for i, call in enumerate(calls):
            n0 = backend_compiles()
            prompt = rng.integers(0, 512, call["length"]).tolist()
            _run(gen, [prompt, prompt[:2]], mode, B, call["eos"],
                 max_new_tokens=call["max_new_tokens"])
            if i == 0:
                assert backend_compiles() > n0  # the counter sees compiles at all
            else:
                assert backend_compiles() == n0, (mode, call)
        new = set(gen._compiled) - before
        assert len(new) == 1 and next(iter(new)).mode == mode, new

    before = set(gen._compiled)
    prompt = rng.integers(0, 512, 12).tolist()
    settings = [dict(temperature=0.7, top_p=1.0, top_k=0, seed=0),
                dict(temperature=1.3, top_p=0.9, top_k=0, seed=1),
                dict(temperature=1.0, top_p=0.5, top_k=5, seed=2),
                dict(temperature=2.0, top_p=1.0, top_k=1, seed=3)]
    outputs = []
    for i, s in enumerate(settings):
        n0 = backend_compiles()
        res = _run(gen, [prompt], "orthrus", B, **s)
        outputs.append(res[0].token_ids)
        if i:
            assert backend_compiles() == n0, s
        assert len(res[0].token_ids) == MAX_NEW
    assert len(set(gen._compiled) - before) == 1
    # top_k = 1 leaves one candidate: sampling must then be the greedy output
    assert outputs[-1] == _run(gen, [prompt], "orthrus", B)[0].token_ids
    assert len({tuple(o) for o in outputs}) > 1  # the values reach the program


def test_requests_within_a_cache_length_share_one_program(backend_compiles):
    """Past the least cache (256 positions) a batch's cache follows its longest prompt and
    its budget in eight lengths per octave: requests that fall in one length (and one
    prompt and output bucket) compile nothing new, the next length its own program."""
    gen = Generator(_gen("qwen3-untied-K8").model, max_len=1024)
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, 512, 300).tolist()
    n0 = backend_compiles()
    first = _run(gen, [prompt[:270]], "ar", 1, max_new_tokens=10)  # 279 positions -> 288
    assert backend_compiles() > n0
    assert [s.max_len for s in gen._compiled] == [288]
    n1 = backend_compiles()
    for length, new in ((279, 9), (262, 16), (275, 14)):  # outputs in one bucket (16)
        _run(gen, [prompt[:length]], "ar", 1, max_new_tokens=new)
    assert backend_compiles() == n1  # 287, 277, 288 positions: the same program
    _run(gen, [prompt], "ar", 1, max_new_tokens=10)  # 309 positions -> 320
    assert sorted(s.max_len for s in gen._compiled) == [288, 320]
    # the same row in a batch with the longer prompt, over a 320-position cache
    pair = _run(gen, [prompt[:270], prompt], "ar", 2, max_new_tokens=10)
    assert first[0].token_ids == pair[0].token_ids


@pytest.mark.slow
def test_warm_up_compiles_what_generate_needs_running_one_batch_per_bucket(backend_compiles):
    gen = _gen("llama-untied-K4")
    B = 3  # a batch size no other test uses: the warm-up must compile these programs
    rng = np.random.default_rng(6)
    lengths = [3, 5, 6, 20, 4, 2, 7, 1, 2]  # batches pad to prompt buckets 16, 32, 16
    prompts = [rng.integers(0, 512, n).tolist() for n in lengths]
    n0 = backend_compiles()
    warm = gen.warm_up(prompts, mode="ar", batch_size=B, max_new_tokens=MAX_NEW, eos_ids=[])
    assert sorted(warm) == [0, 1, 2, 3, 4, 5]  # the third batch shares the first's bucket
    assert backend_compiles() > n0
    n1 = backend_compiles()
    results = _run(gen, prompts, "ar", B)
    assert backend_compiles() == n1
    assert all(warm[i].token_ids == results[i].token_ids for i in warm)


# --------------------------------------------------------------------------- 6


@pytest.mark.parametrize("mode", ["orthrus", "ar"])
def test_stream_equals_final_and_unstreamed(mode):
    name = "qwen3-untied-K8"
    gen = _gen(name)
    prompts = _prompts(seed=13)
    eos = [_run(gen, prompts, "ar", 4)[1].token_ids[6]]
    plain = _run(gen, prompts, mode, 4, eos)
    for every in (1, 3):
        streamed, chunks = _streamed(gen, prompts, mode, 4, eos, stream_every=every)
        assert _summary(streamed) == _summary(plain)
        assert [r.iterations for r in streamed] == [r.iterations for r in plain]
        assert [r.accepted_hist for r in streamed] == [r.accepted_hist for r in plain]
        for r, c in zip(streamed, chunks, strict=True):
            assert sum(c, []) == r.token_ids
            assert len(c[0]) == 1 and all(c)  # the prefill token first, no empty chunks
        assert max(len(c) for c in chunks) > 2  # it did stream


def test_stream_with_sampling_equals_unstreamed():
    gen = _gen("llama-tied-K8")
    prompts = _prompts(seed=17, n=2)
    kw = dict(temperature=0.9, top_p=0.95, seed=4)
    plain = _run(gen, prompts, "orthrus", 2, **kw)
    streamed, chunks = _streamed(gen, prompts, "orthrus", 2, **kw)
    assert _summary(streamed) == _summary(plain)
    assert [sum(c, []) for c in chunks] == [r.token_ids for r in plain]


# --------------------------------------------------------------------------- 7


def test_bad_input_is_a_clear_error():
    model = _gen("qwen3-untied-K8").model
    gen = Generator(model, max_len=64)
    ok = [1, 2, 3]
    cases = [
        (dict(prompts=[[]]), "empty prompt"),
        (dict(prompts=[ok, []]), "empty prompt"),
        (dict(prompts=[list(range(64))]), "does not fit the context of 64"),
        (dict(prompts=["some text"]), "prompt is text"),
        (dict(prompts=[list(range(64))], mode="ar"), "does not fit the context of 64"),
        (dict(prompts=[ok], temperature=-0.1), "temperature"),
        (dict(prompts=[ok], top_p=0.0), "top_p"),
        (dict(prompts=[ok], top_p=1.5), "top_p"),
        (dict(prompts=[ok], top_k=-1), "top_k"),
        (dict(prompts=[[5, 512]]), r"outside the vocabulary"),
        (dict(prompts=[[-1, 5]]), r"outside the vocabulary"),
        (dict(prompts=[ok], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[ok], mode="beam"), "mode"),
    ]
    for kwargs, message in cases:
        prompts = kwargs.pop("prompts")
        with pytest.raises(ValueError, match=message):
            gen.generate(prompts, **kwargs)
    assert gen._compiled == {}  # all rejected before compiling anything
    with pytest.raises(ValueError, match="tokenizer"):
        gen.encode("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        gen.encode([{"role": "user", "content": "hello"}], chat=True)


# --------------------------------------------------------------------------- 8


def test_a_cache_exactly_as_long_as_the_rows_fill():
    """The engine's cache holds what a row can fill and no verify block: 16-token prompts
    with 17 new tokens fill all 32 positions of a cache capped at 32, every row to its
    budget (never ``cache_full``), Orthrus's last blocks running past the end of the
    cache, and the same tokens as AR in a cache with room to spare."""
    roomy = _gen("agree")
    gen = Generator(roomy.model, max_len=32)
    assert gen.batch_shape([[0] * 16], 17) == (16, 32)
    assert roomy.batch_shape([[0] * 16], 17) == (16, 256)
    rng = np.random.default_rng(29)
    prompts = [rng.integers(0, 512, 16).tolist() for _ in range(3)]
    out = {m: _run(gen, prompts, m, 3, max_new_tokens=17) for m in ("orthrus", "ar")}
    ref = _run(roomy, prompts, "ar", 3, max_new_tokens=17)
    for a, o, r in zip(out["ar"], out["orthrus"], ref, strict=True):
        assert a.finish_reason == o.finish_reason == "length"
        assert len(o.token_ids) == 17 and o.token_ids == a.token_ids == r.token_ids
    assert sum(r.iterations for r in out["orthrus"]) < sum(r.iterations for r in out["ar"])


def test_a_cache_shorter_than_the_padded_prompt():
    """Prompts of 33 tokens pad to two prefill chunks of 32 (64 positions) but fill only
    47 with 15 new tokens: the cache has 48, the prefill's writes past it are dropped,
    and both modes give the tokens of a cache that holds the whole padded prompt."""
    roomy = _gen("agree")
    gen = Generator(roomy.model, max_len=48, chunk_size=32)
    assert gen.batch_shape([[0] * 33], 15) == (64, 48)
    rng = np.random.default_rng(31)
    prompts = [rng.integers(0, 512, n).tolist() for n in (33, 20)]
    ref = _run(roomy, prompts, "ar", 2, max_new_tokens=15)
    for mode in ("orthrus", "ar"):
        out = _run(gen, prompts, mode, 2, max_new_tokens=15)
        assert [r.token_ids for r in out] == [r.token_ids for r in ref]
        assert [r.finish_reason for r in out] == ["length", "length"]


@pytest.mark.slow
def test_cache_that_fills():
    name = "qwen3-untied-K8"
    K = SPECS[name][2]
    max_len = 64
    gen = Generator(_gen(name).model, max_len=max_len)
    rng = np.random.default_rng(19)
    prompts = [rng.integers(0, 512, 40).tolist(), rng.integers(0, 512, 21).tolist()]
    out = {m: _run(gen, prompts, m, 2, max_new_tokens=200) for m in ("orthrus", "ar")}
    for i, p in enumerate(prompts):
        a, o = out["ar"][i], out["orthrus"][i]
        assert a.finish_reason == o.finish_reason == "cache_full"
        # AR fills the cache to the last position; the final anchor is never cached
        assert len(a.token_ids) == max_len - len(p) + 1
        # Orthrus commits up to the last cache position too: the same tokens as AR
        assert o.token_ids == a.token_ids
        assert o.iterations < a.iterations or K == 1


@pytest.mark.slow
def test_update_diffusion_swaps_the_drafter_without_recompiling(backend_compiles):
    """An engine given another model's diffusion tensors decodes exactly as an engine built
    on that model (same outputs, same acceptance), reusing its compiled programs; a model
    of another shape is refused, naming the tensor."""
    prompts = _prompts(seed=23)
    trained = _model("agree")  # stacked weights, as training holds them
    fresh = _run(Generator(trained), prompts, "orthrus", 4)
    engine = Generator(_model("agree"))
    diff = engine.model.layers.diff_attn
    diff.o_proj.set_value(tuple(-w for w in diff.o_proj.get_value()))  # another drafter
    other = _run(engine, prompts, "orthrus", 4)  # compiles the engine's programs
    n0 = backend_compiles()
    engine.update_diffusion(trained)
    swapped = _run(engine, prompts, "orthrus", 4)
    assert backend_compiles() == n0
    assert _summary(swapped) == _summary(fresh) == _summary(other)  # lossless either way
    assert [r.accepted_hist for r in swapped] == [r.accepted_hist for r in fresh]
    assert [r.accepted_hist for r in other] != [r.accepted_hist for r in fresh]
    wider = to_orthrus(hf_model("qwen3", False, 0, num_attention_heads=8), block_size=8)
    with pytest.raises(ValueError, match=r"diffusion tensor [qo]_proj: shape 2 x \(8, 16, "):
        engine.update_diffusion(wider)


def test_default_batch_is_bounded():
    from infer.buckets import DEFAULT_MAX_BATCH, default_batch_size

    assert [default_batch_size(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert default_batch_size(1000) == DEFAULT_MAX_BATCH == 8


def test_a_call_in_pieces_gives_the_whole_call():
    """``first_row`` numbers a piece's rows as in the whole call: sampled rows draw the
    same tokens and batches keep their indices (the bench runs the modes batch by batch)."""
    gen = _gen("agree")
    prompts = _prompts(seed=43, n=4)
    kw = dict(max_new_tokens=10, temperature=0.9, seed=3)
    whole = _run(gen, prompts, "orthrus", 2, **kw)
    pieces = [r for lo in (0, 2) for r in
              _run(gen, prompts[lo:lo + 2], "orthrus", 2, first_row=lo, **kw)]
    assert [r.token_ids for r in pieces] == [r.token_ids for r in whole]
    assert [r.batch for r in pieces] == [r.batch for r in whole] == [0, 0, 1, 1]
    shifted = _run(gen, prompts[2:], "orthrus", 2, **kw)  # numbered from 0: other draws
    assert [r.token_ids for r in shifted] != [r.token_ids for r in whole[2:]]
