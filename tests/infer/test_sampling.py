"""Sampling: the temperature / top-k / top-p transform against numpy and against the
full-vocabulary sort it replaced, the acceptance rules on hand-made distributions, and end
to end: Orthrus sampling is distributed exactly as AR sampling (docs/decoding.md), with a
test statistic shown to catch wrong acceptance rules.

All statistical checks use fixed seeds, so they are deterministic; their thresholds are
p-values of 1e-4 (must pass) and 1e-6 (a wrong rule must fail).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from infer import decode
from infer.engine import Generator
from infer.sampling import (
    MAX_TOP_K,
    SamplingParams,
    argmax,
    filtered_log_probs,
    greedy_accept,
    sample,
    speculative_accept,
)
from tests.hf_reference import hf_logits, hf_model, to_orthrus

PASS_P = 1e-4  # a correct sampler must give a p-value above this
FAIL_P = 1e-6  # a wrong one must give a p-value below this


# --------------------------------------------------------------------------- references


def ref_probs(logits: np.ndarray, temperature: float, top_k: int = 0,
              top_p: float = 1.0) -> np.ndarray:
    """Straightforward float64 numpy version of the transform, row by row: divide by the
    temperature, keep the ``top_k`` largest, then the smallest prefix (by descending
    probability) whose renormalised mass reaches ``top_p``; renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    flat = x.reshape(-1, x.shape[-1])
    out = np.zeros_like(flat)
    V = flat.shape[-1]
    for r, row in enumerate(flat):
        order = np.argsort(-row, kind="stable")
        kept = order[:top_k] if 0 < top_k < V else order
        p = np.exp(row[kept] - row[kept].max())
        p /= p.sum()
        if top_p < 1.0:
            n = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # first prefix reaching top_p
            kept, p = kept[:n], p[:n] / p[:n].sum()
        out[r, kept] = p
    return out.reshape(x.shape)


def probs_of(logits, temperature, top_k=0, top_p=1.0) -> np.ndarray:
    lp = filtered_log_probs(jnp.asarray(logits, jnp.float32),
                            SamplingParams.make(temperature, top_k, top_p))
    return np.exp(np.asarray(lp, np.float64))


def chi2_pvalue(observed: dict, expected_probs: dict, n: int, min_expected: float = 5.0):
    """Goodness of fit of ``observed`` counts (outcome -> count, ``n`` in all) to
    ``expected_probs`` (outcome -> probability). Outcomes expected fewer than
    ``min_expected`` times, and any outcome outside ``expected_probs``, are pooled in one
    cell. Returns ``(p_value, statistic, degrees_of_freedom)``."""
    obs, exp = [], []
    pooled_obs, pooled_exp = 0, 0.0
    for outcome, prob in expected_probs.items():
        if prob * n >= min_expected:
            obs.append(observed.get(outcome, 0))
            exp.append(prob * n)
        else:
            pooled_obs += observed.get(outcome, 0)
            pooled_exp += prob * n
    pooled_obs += sum(c for o, c in observed.items() if o not in expected_probs)
    pooled_exp += max(0.0, n - sum(exp) - pooled_exp)  # mass outside expected_probs
    if pooled_obs or pooled_exp:
        obs.append(pooled_obs)
        exp.append(max(pooled_exp, 1e-9))  # an impossible outcome seen: p-value 0
    obs, exp = np.asarray(obs, np.float64), np.asarray(exp)
    statistic = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(stats.chi2.sf(statistic, df)), statistic, df


def counts(rows: np.ndarray) -> dict:
    return collections.Counter(map(tuple, np.asarray(rows).tolist()))


def total_variation(observed: dict, expected_probs: dict, n: int) -> float:
    keys = set(observed) | set(expected_probs)
    return 0.5 * sum(abs(observed.get(k, 0) / n - expected_probs.get(k, 0.0)) for k in keys)


# --------------------------------------------------------------------------- transform

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0.0, 3.0, (3, 5, 40)).astype(np.float32)  # distinct values: no ties


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_only(temperature):
    got = probs_of(LOGITS, temperature)
    want = ref_probs(LOGITS, temperature)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
    assert (got > 0).all()  # nothing filtered
    lp = filtered_log_probs(jnp.asarray(LOGITS), SamplingParams.make(temperature))
    np.testing.assert_allclose(lp, jax.nn.log_softmax(LOGITS / temperature), atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2, 7, 39, 40, 100])
def test_top_k_keeps_exactly_k(top_k):
    got = probs_of(LOGITS, 0.7, top_k=top_k)
    kept = got > 0
    assert (kept.sum(-1) == min(top_k, LOGITS.shape[-1])).all()
    top = np.argsort(-LOGITS, axis=-1)[..., :top_k]
    assert np.take_along_axis(kept, top, -1).all()  # the largest logits, not others
    np.testing.assert_allclose(got, ref_probs(LOGITS, 0.7, top_k), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("top_p", [1e-3, 0.2, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_smallest_prefix(top_p):
    got = probs_of(LOGITS, 1.3, top_p=top_p)
    np.testing.assert_allclose(got, ref_probs(LOGITS, 1.3, top_p=top_p), atol=1e-6, rtol=1e-4)
    full = ref_probs(LOGITS, 1.3)
    kept = got > 0
    mass = np.where(kept, full, 0).sum(-1)
    smallest_kept = np.where(kept, full, np.inf).min(-1)
    largest_dropped = np.where(kept, -np.inf, full).max(-1)
    assert (mass >= top_p - 1e-6).all()  # reaches top_p ...
    assert (mass - smallest_kept < top_p + 1e-6).all()  # ... and no smaller prefix does
    assert (largest_dropped <= smallest_kept).all()  # a prefix in descending order


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(0.5, 5, 0.9), (1.0, 10, 0.5), (2.0, 3, 0.999), (0.8, 40, 0.3),
                          (1.5, 1, 0.5), (1.0, 20, 1.0)])
def test_combined_filters(temperature, top_k, top_p):
    got = probs_of(LOGITS, temperature, top_k, top_p)
    np.testing.assert_allclose(got, ref_probs(LOGITS, temperature, top_k, top_p),
                               atol=1e-6, rtol=1e-4)
    assert ((got > 0).sum(-1) <= top_k).all()  # top-p applies within the top-k survivors


def test_top_p_one_keeps_tiny_probabilities():
    """``top_p = 1`` is "off" even for tokens whose probability float32 cannot add."""
    logits = np.array([0.0, -20.0, -30.0, -5.0], np.float32)
    got = probs_of(logits, 1.0)
    assert (got > 0).all()
    np.testing.assert_allclose(got, ref_probs(logits, 1.0), rtol=1e-4, atol=0)


def test_transform_is_traced_not_static():
    """Changing the sampling parameters does not recompile."""
    traces = []

    @jax.jit
    def f(x, params):
        traces.append(1)
        return filtered_log_probs(x, params)

    for t, k, p in [(1.0, 0, 1.0), (0.5, 3, 0.9), (2.0, 7, 0.3)]:
        f(jnp.asarray(LOGITS), SamplingParams.make(t, k, p))
    assert len(traces) == 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=-1)])
def test_sampling_params_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams.make(**kwargs)


def test_top_k_above_the_limit_is_refused():
    SamplingParams.make(1.0, top_k=MAX_TOP_K)
    with pytest.raises(ValueError, match=rf"top_k={MAX_TOP_K + 1}.*MAX_TOP_K={MAX_TOP_K}"):
        SamplingParams.make(1.0, top_k=MAX_TOP_K + 1)


# ----------------------------------------------------------- against the full-sort version


def sort_reference(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The transform as it was before ``lax.top_k``: sorts the whole vocabulary."""
    x = logits.astype(jnp.float32) / params.temperature
    V = x.shape[-1]
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]  # descending
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, V), V)
    kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(k - 1, x.shape[:-1])[..., None], -1)
    sorted_x = jnp.where(sorted_x >= kth, sorted_x, -1e30)
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep = ((before < params.top_p) | (params.top_p >= 1.0)) & (sorted_x > -1e30)
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where((x >= cutoff) & (x >= kth), x, -1e30)
    return jax.nn.log_softmax(x, axis=-1)


_new_jit = jax.jit(filtered_log_probs)
_ref_jit = jax.jit(sort_reference)
COMBOS = [(t, k, p) for t in (0.3, 1.0, 2.5) for k in (0, 1, 2, 7, 50, MAX_TOP_K)
          for p in (0.05, 0.5, 0.9, 0.999, 1.0)]


def _logits(kind: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: ties everywhere, at every cutoff
        return (rng.integers(-6, 3, shape) * 0.75).astype(np.float32)
    if kind == "flat":  # near uniform: top-p nuclei far larger than MAX_TOP_K
        return rng.normal(0.0, 0.05, shape).astype(np.float32)
    return rng.normal(0.0, 3.0, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 40), (2, 3, 40), (4, 700), (2, 2, 3000), (1, 4, 5000)],
                         ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "flat"])
def test_matches_full_sort(shape, kind):
    """Same kept set and log-probabilities as sorting the vocabulary, whenever the kept set
    fits in the ``MAX_TOP_K`` largest or nothing is filtered; otherwise exactly those
    ``MAX_TOP_K`` (and ties with the last), renormalised."""
    x = jnp.asarray(_logits(kind, shape, seed=len(shape) * shape[-1]))
    m = min(MAX_TOP_K, shape[-1])
    fits = cut = 0
    for t, k, p in COMBOS:
        params = SamplingParams.make(t, k, p)
        got, want = np.asarray(_new_jit(x, params)), np.asarray(_ref_jit(x, params))
        kept_want = want > -1e29
        mth = np.sort(np.asarray(x), -1)[..., -m:][..., :1]  # the m-th largest logit
        row_fits = (np.where(kept_want, np.asarray(x), np.inf).min(-1, keepdims=True) >= mth)
        row_fits |= k == 0 and p == 1.0  # no filtering: everything is kept
        fits += row_fits.sum()
        cut += (~row_fits).sum()
        # rows that fit: the reference; the others: exactly the m largest (with ties)
        kept = np.where(row_fits, kept_want, np.asarray(x) >= mth)
        np.testing.assert_array_equal(got > -1e29, kept, err_msg=str((t, k, p)))
        assert (got[~kept] <= -1e29).all()
        ref_cut = np.asarray(jax.nn.log_softmax(jnp.where(kept, x / t, -1e30), axis=-1))
        np.testing.assert_allclose(np.where(kept, got, 0), np.where(kept, ref_cut, 0),
                                   rtol=1e-6, atol=1e-5, err_msg=str((t, k, p)))
        np.testing.assert_allclose(np.where(row_fits, got, 0), np.where(row_fits, want, 0),
                                   rtol=1e-6, atol=1e-5, err_msg=str((t, k, p)))
    assert fits > 0
    if kind == "flat" and shape[-1] > MAX_TOP_K:
        assert cut > 0  # the cut-off case is exercised


@pytest.mark.parametrize("shape", [(3, 40), (2, 3, 40), (1, 4, 5000)], ids=str)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_filters_off_is_log_softmax(shape, temperature):
    x = jnp.asarray(_logits("normal", shape, seed=1))
    got = _new_jit(x, SamplingParams.make(temperature))
    np.testing.assert_allclose(got, jax.nn.log_softmax(x / temperature, axis=-1),
                               rtol=1e-6, atol=1e-6)


def test_filters_off_skips_the_filtering():
    """One ``cond``: the branch taken with both filters off has no top_k nor sort."""
    jaxpr = jax.make_jaxpr(filtered_log_probs)(jnp.zeros((2, 3, 5000)), SamplingParams.make(1.0))

    def prims(jx):
        for eqn in jx.eqns:
            yield eqn.primitive.name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from prims(sub)

    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    # branches: (predicate false, predicate true); the predicate is "both filters off"
    filtered, unfiltered = [set(prims(b.jaxpr)) for b in conds[0].params["branches"]]
    assert not unfiltered & {"top_k", "sort", "cumsum"}
    assert "top_k" in filtered and "sort" not in filtered


def test_no_full_sort_when_compiled():
    """XLA on CPU keeps ``top_k`` a top-k, not a sort of the vocabulary."""
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.zeros((2, 3, 5000)), cpu)
    params = jax.device_put(SamplingParams.make(1.0, 5, 0.9), cpu)
    hlo = jax.jit(filtered_log_probs).lower(x, params).compile().as_text()
    assert not [line for line in hlo.splitlines() if " sort(" in line and "5000]" in line]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_argmax_equals_jnp_argmax(dtype):
    """Ties (first index wins), NaN (first NaN wins), +-inf and all -inf rows, signed zeros,
    random rows: every row as ``jnp.argmax``, compiled or not."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=64) for _ in range(20)]
    rows += [rng.integers(-2, 3, size=64).astype(float) for _ in range(20)]  # many ties
    special = np.zeros((8, 64))
    special[0, [5, 9]] = np.nan
    special[1, [3, 40]] = np.inf
    special[2] = -np.inf
    special[3, 7] = np.nan
    special[3, 2] = np.inf
    special[4, 10] = -0.0
    special[5, :] = -0.0
    special[5, 30] = 0.0
    special[6, 63] = 1.0
    special[7, 0] = np.nan
    x = jnp.asarray(np.concatenate([np.stack(rows), special]), dtype).reshape(6, 8, 64)
    want = np.asarray(jnp.argmax(x, axis=-1))
    for fn in (argmax, jax.jit(argmax)):
        got = fn(x)
        assert got.dtype == jnp.int32 and got.shape == (6, 8)
        np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------- acceptance


def test_greedy_accept():
    V = 5  # block K = 4: three drafts, four verify positions
    target = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])
    logits = np.eye(V, dtype=np.float32)[target] * 3.0  # argmax p_i = target[:, i]
    drafts = np.array([[1, 2, 3], [1, 0, 3], [4, 2, 3], [0, 0, 0]])
    j, nxt = greedy_accept(jnp.asarray(drafts, jnp.int32), jnp.asarray(logits))
    assert np.asarray(j).tolist() == [3, 1, 0, 3]
    assert np.asarray(nxt).tolist() == [4, 2, 1, 0]


# Hand-made distributions over V = 6 tokens, block K = 3 (two drafts). They include tokens
# that p forbids but q proposes (filtered out by top-k / top-p) and the reverse.
V6 = 6
P0 = np.array([0.30, 0.05, 0.25, 0.0, 0.15, 0.25])
Q0 = np.array([0.10, 0.40, 0.10, 0.20, 0.20, 0.0])
Q1 = np.array([0.05, 0.05, 0.30, 0.30, 0.0, 0.30])
# p_1 depends on the first draft (the verify pass is causal): row x is p_1(. | x)
P1 = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
               [0.0, 0.0, 0.6, 0.4, 0.0, 0.0],
               [0.2, 0.2, 0.2, 0.2, 0.2, 0.0],
               [1/6] * 6,
               [0.05, 0.05, 0.05, 0.05, 0.05, 0.75],
               [0.1, 0.3, 0.0, 0.3, 0.0, 0.3]])
P2 = np.array([0.1, 0.2, 0.3, 0.2, 0.1, 0.1])  # p_2, used when both drafts are accepted


def _log(p):
    with np.errstate(divide="ignore"):
        return np.where(p > 0, np.log(p), -1e30).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1)
def _two_tokens(key, rule=speculative_accept):
    """Draw drafts from q, run ``rule``, and return the first two committed tokens of each
    row (a second round, drafted from the same q, supplies token 2 where ``j = 0``)."""
    n = 100_000
    kd, kd2, ka, ka2 = jax.random.split(key, 4)
    lq = jnp.asarray(np.stack([_log(Q0), _log(Q1)]))  # [2, V]
    draft_logp = jnp.broadcast_to(lq, (n, 2, V6))
    drafts = sample(kd, draft_logp)
    p1 = jnp.asarray(_log(P1))[drafts[:, 0]]
    verify = jnp.stack([jnp.broadcast_to(jnp.asarray(_log(P0)), (n, V6)), p1,
                        jnp.broadcast_to(jnp.asarray(_log(P2)), (n, V6))], axis=1)
    j, nxt = rule(ka, drafts, draft_logp, verify)
    first = jnp.where(j >= 1, drafts[:, 0], nxt)
    second_here = jnp.where(j >= 2, drafts[:, 1], nxt)  # valid where j >= 1
    # round 2 for rows with j = 0: the anchor is `first`, p_0 = P1[first]
    drafts2 = sample(kd2, draft_logp)
    verify2 = jnp.stack([jnp.asarray(_log(P1))[first],
                         jnp.asarray(_log(P1))[drafts2[:, 0]],  # any valid rows: unused
                         jnp.broadcast_to(jnp.asarray(_log(P2)), (n, V6))], axis=1)
    j2, nxt2 = rule(ka2, drafts2, draft_logp, verify2)
    second_next = jnp.where(j2 >= 1, drafts2[:, 0], nxt2)
    second = jnp.where(j >= 1, second_here, second_next)
    return j, first, second


def test_speculative_accept_first_token_is_p0():
    j, first, _ = _two_tokens(jax.random.key(1))
    n = first.shape[0]
    c = counts(np.asarray(first)[:, None])
    want = {(x,): P0[x] for x in range(V6) if P0[x] > 0}
    p, stat, df = chi2_pvalue(c, want, n)
    assert p > PASS_P, (p, stat, df, c)
    assert total_variation(c, want, n) < 0.01
    assert c.get((3,), 0) == 0  # p forbids token 3 although q proposes it
    j = np.asarray(j)
    assert 0 < (j == 0).mean() < 1 and 0 < (j == 2).mean() < 1  # every branch taken
    # acceptance rate of the first draft is sum_x min(p_0, q_0)
    np.testing.assert_allclose((j >= 1).mean(), np.minimum(P0, Q0).sum(), atol=0.005)


def test_speculative_accept_two_tokens_joint():
    _, first, second = _two_tokens(jax.random.key(2))
    n = first.shape[0]
    c = counts(np.stack([first, second], 1))
    want = {(x, y): P0[x] * P1[x, y] for x in range(V6) for y in range(V6)
            if P0[x] * P1[x, y] > 0}
    p, stat, df = chi2_pvalue(c, want, n)
    assert p > PASS_P, (p, stat, df)
    assert total_variation(c, want, n) < 0.015


def test_speculative_accept_all_accepted_draws_from_last():
    """``q = p``: every draft is accepted and the next anchor comes from ``p_{K-1}``."""
    n, K = 20_000, 4

    @jax.jit
    def run(key):
        lp = jnp.asarray(np.stack([_log(P0), _log(P1[0]), _log(P1[4]), _log(P2)]))
        verify = jnp.broadcast_to(lp, (n, K, V6))
        k_draft, k_accept = jax.random.split(key)
        drafts = sample(k_draft, verify[:, :-1])
        return speculative_accept(k_accept, drafts, verify[:, :-1], verify)

    j, nxt = run(jax.random.key(3))
    assert (np.asarray(j) == K - 1).all()
    c = counts(np.asarray(nxt)[:, None])
    assert chi2_pvalue(c, {(x,): P2[x] for x in range(V6)}, n)[0] > PASS_P


def next_from_p(key, drafts, draft_logp, verify_logp):
    """WRONG on purpose: the right acceptance test, but after a rejection the next anchor
    is drawn from ``p_j`` instead of ``normalize(max(p_j - q_j, 0))``."""
    k_accept, k_next = jax.random.split(key)
    lp = jnp.take_along_axis(verify_logp[:, :-1], drafts[..., None], -1)[..., 0]
    lq = jnp.take_along_axis(draft_logp, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(k_accept, drafts.shape)
    j = jnp.sum(jnp.cumprod((jnp.log(u) < lp - lq).astype(jnp.int32), -1), -1)
    p_j = jnp.take_along_axis(verify_logp, j[:, None, None], 1)[:, 0]
    return j.astype(jnp.int32), sample(k_next, p_j)


def always_accept(key, drafts, draft_logp, verify_logp):
    """WRONG on purpose: every draft is accepted, the next anchor comes from ``p_{K-1}``."""
    j = jnp.full(drafts.shape[:1], drafts.shape[1], jnp.int32)
    return j, sample(key, verify_logp[:, -1])


@pytest.mark.parametrize("rule", [always_accept, next_from_p], ids=lambda f: f.__name__)
def test_speculative_accept_detects_a_wrong_rule(rule):
    """The unit statistic has power: the same check rejects the wrong rules."""
    _, first, second = _two_tokens(jax.random.key(2), rule)
    c = counts(np.stack([first, second], 1))
    want = {(x, y): P0[x] * P1[x, y] for x in range(V6) for y in range(V6)
            if P0[x] * P1[x, y] > 0}
    assert chi2_pvalue(c, want, first.shape[0])[0] < FAIL_P


# --------------------------------------------------------------------------- end to end
#
# A tiny Qwen3 with a 16-token vocabulary and block size 4. Its weights are scaled up so
# that the distributions are far from uniform and depend on the context; the diffusion
# view is an untrained copy of the AR attention, so its drafts q differ from p (total
# variation about 0.2-0.6 here), which is what gives the wrong rules something to get
# wrong. The reference is the exact distribution of the first N_TOKENS generated tokens,
# enumerated with the transformers model and the numpy transform.

N_ROWS = 4096
N_TOKENS = 5  # token 1 from prefill, 2..5 from draft / verify: with K = 4, j = 3 (all
# accepted) commits tokens 2..4 and draws token 5 from p_3
BLOCK = 4
PROMPT = [5, 7, 1, 9, 12, 4]
CONFIGS = [dict(temperature=1.0, top_k=3, top_p=1.0),
           dict(temperature=0.7, top_k=0, top_p=0.8),
           dict(temperature=1.3, top_k=5, top_p=0.9)]


@pytest.fixture(scope="module")
def tiny():
    hf = hf_model("qwen3", False, seed=0, vocab_size=16)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if w.ndim == 2 and "embed" not in name:
                w.mul_(10.0)
    model = to_orthrus(hf, block_size=BLOCK)
    return hf, model, Generator(model)  # one Generator: compiled once per mode


def exact_joint(hf, prompt, n_tokens, temperature, top_k, top_p) -> dict:
    """Probability of each sequence of the first ``n_tokens`` sampled tokens (pruned below
    1e-9; chi2_pvalue pools the missing mass)."""
    level = {(): 1.0}
    for _ in range(n_tokens):
        prefixes = list(level)
        ids = np.array([prompt + list(pr) for pr in prefixes])
        probs = ref_probs(hf_logits(hf, ids)[:, -1], temperature, top_k, top_p)
        nxt = {}
        for pr, row in zip(prefixes, probs, strict=True):
            for tok in np.nonzero(row > 0)[0]:
                if level[pr] * row[tok] > 1e-9:
                    nxt[pr + (int(tok),)] = level[pr] * row[tok]
        level = nxt
    return level


def sample_rows(gen, mode, seed, **cfg) -> tuple[np.ndarray, np.ndarray]:
    """First N_TOKENS tokens of N_ROWS independent samples (one batch), and the summed
    acceptance histogram."""
    res = gen.generate([PROMPT] * N_ROWS, mode=mode, max_new_tokens=N_TOKENS, seed=seed,
                       eos_ids=[], batch_size=N_ROWS, **cfg)
    assert all(len(r.token_ids) == N_TOKENS for r in res)
    return (np.array([r.token_ids for r in res]),
            np.sum([r.accepted_hist for r in res], axis=0))


@pytest.fixture(scope="module")
def exact(tiny):
    return [exact_joint(tiny[0], PROMPT, N_TOKENS, **cfg) for cfg in CONFIGS]


@pytest.fixture(scope="module")
def ar_samples(tiny):
    return {i: sample_rows(tiny[2], "ar", 100 + i, **cfg)[0] for i, cfg in enumerate(CONFIGS)}


@pytest.mark.parametrize("i", range(len(CONFIGS)),
                         ids=lambda i: "T{temperature}-k{top_k}-p{top_p}".format(**CONFIGS[i]))
@pytest.mark.slow
def test_orthrus_sampling_matches_ar(tiny, exact, ar_samples, i):
    cfg, want = CONFIGS[i], exact[i]
    rows, hist = sample_rows(tiny[2], "orthrus", 200 + i, **cfg)
    # every branch of the rule ran (hist[j]: iterations that accepted j drafts): the
    # first draft rejected, some accepted, all K - 1 accepted
    assert hist[0] > 0 and hist[1:].sum() > 0 and hist[BLOCK - 1] > 0, hist
    c_orthrus, c_ar = counts(rows), counts(ar_samples[i])
    p_orthrus = chi2_pvalue(c_orthrus, want, N_ROWS)
    p_ar = chi2_pvalue(c_ar, want, N_ROWS)
    assert p_ar[0] > PASS_P, ("AR sampling is off", p_ar)
    assert p_orthrus[0] > PASS_P, ("Orthrus sampling is off", p_orthrus, hist)
    # and the two empirical distributions against each other
    keys = sorted(set(c_orthrus) | set(c_ar))
    table = np.array([[c_orthrus.get(k, 0) for k in keys], [c_ar.get(k, 0) for k in keys]])
    table = table[:, table.sum(0) >= 10]
    assert stats.chi2_contingency(table)[1] > PASS_P
    # each generated position separately
    for t in range(1, N_TOKENS):
        marg = collections.defaultdict(float)
        for seq, prob in want.items():
            marg[seq[t]] += prob
        assert total_variation(counts(rows[:, t:t + 1]), {(k,): v for k, v in marg.items()},
                               N_ROWS) < 0.06


@pytest.mark.slow
def test_wrong_acceptance_rule_is_caught(tiny, exact, monkeypatch):
    """The same statistic, same seed, rejects Orthrus with a wrong rule patched into the
    decode loop: ``next_from_p`` (the subtler of the two wrong rules above; alone, as each
    patched rule costs a compile), on the config where its p-value is largest."""
    i = 2
    monkeypatch.setattr(decode, "speculative_accept", next_from_p)
    gen = Generator(tiny[1])  # a fresh one compiles the patched rule in
    rows, _ = sample_rows(gen, "orthrus", 200 + i, **CONFIGS[i])
    p_value = chi2_pvalue(counts(rows), exact[i], N_ROWS)
    assert p_value[0] < FAIL_P, p_value


# --------------------------------------------------------------------------- trees
#
# The same check over a draft tree: the walk samples from the AR view at each row it
# visits (independent keys per row) and follows a child whose token was drawn, so the
# output is distributed exactly as AR sampling whatever tree the diffusion view built.

TREE_BUDGET = 6  # > BLOCK - 1: the tree branches


@pytest.mark.parametrize("i", [0, 2],
                         ids=lambda i: "T{temperature}-k{top_k}-p{top_p}".format(**CONFIGS[i]))
@pytest.mark.slow
def test_tree_sampling_matches_ar(tiny, exact, ar_samples, i):
    cfg, want = CONFIGS[i], exact[i]
    rows, hist = sample_rows(tiny[2], "orthrus", 300 + i, tree_budget=TREE_BUDGET, **cfg)
    assert hist[0] > 0 and hist[1:].sum() > 0, hist  # rejected and accepted nodes
    p_tree = chi2_pvalue(counts(rows), want, N_ROWS)
    assert p_tree[0] > PASS_P, ("tree sampling is off", p_tree, hist)
    c_ar = counts(ar_samples[i])
    keys = sorted(set(counts(rows)) | set(c_ar))
    table = np.array([[counts(rows).get(k, 0) for k in keys], [c_ar.get(k, 0) for k in keys]])
    assert stats.chi2_contingency(table[:, table.sum(0) >= 10])[1] > PASS_P


def _next_from_the_anchor(walk):
    """WRONG on purpose: the right walk, but the next anchor is the token drawn at the
    anchor's row instead of at the deepest accepted node's."""
    def wrong(tree, anchor, chosen, depth):
        new, count, path = walk(tree, anchor, chosen, depth)
        at_j = jnp.arange(new.shape[1])[None, :] == (count - 1)[:, None]
        return jnp.where(at_j, chosen[:, :1], new), count, path
    return wrong


def _shared_draw(walk):
    """WRONG on purpose: every row of a tree reuses the anchor row's draw (one draw per
    tree instead of one per row)."""
    def wrong(tree, anchor, chosen, depth):
        return walk(tree, anchor, jnp.broadcast_to(chosen[:, :1], chosen.shape), depth)
    return wrong


@pytest.mark.parametrize("wrong", [_next_from_the_anchor, _shared_draw],
                         ids=lambda f: f.__name__)
@pytest.mark.slow
def test_wrong_tree_walk_is_caught(tiny, exact, monkeypatch, wrong):
    i = 2
    monkeypatch.setattr(decode.trees, "walk", wrong(decode.trees.walk))
    gen = Generator(tiny[1])  # a fresh one compiles the patched walk in
    rows, _ = sample_rows(gen, "orthrus", 300 + i, tree_budget=TREE_BUDGET, **CONFIGS[i])
    assert chi2_pvalue(counts(rows), exact[i], N_ROWS)[0] < FAIL_P
