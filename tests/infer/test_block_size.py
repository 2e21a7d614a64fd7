"""Block size chosen at inference: a size other than the trained one, ``auto`` from a cost
table and an acceptance profile, and the loop that switches sizes while decoding.

- drafting ``K' < K`` (and ``K' = 1``) is lossless: greedy output equals AR's;
- the adaptive loop (switching between a block and AR steps) is lossless and really
  switches when the text accepts less than the prior says;
- the ``auto`` plan is deterministic for a given cost table and profile, and follows the
  expected-tokens-per-second arithmetic; cost tables are measured once, then read from
  disk;
- ``infer.calibrate`` writes the profile that ``infer.generate --block-size auto`` uses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from infer import block_size as bs
from infer import calibrate as calibrate_cli
from infer import generate as generate_cli
from infer.block_size import AcceptanceProfile, CostTable, plan, table_len
from infer.buckets import cache_len
from infer.tree import SCORE_BINS
from orthrus_jax.cache import cache_bucket
from tests.infer.test_decode import SPECS, _gen, _prompts, _run, _summary

K = SPECS["agree"][2]  # 8


@pytest.mark.slow
@pytest.mark.parametrize("block", [2, 3, 8, 1])
def test_block_size_override_is_lossless(block):
    gen = _gen("agree")
    prompts = _prompts(seed=21, n=6)
    ar = _run(gen, prompts, "ar", 2)
    res = _run(gen, prompts, "orthrus", 2, block_size=block)
    assert _summary(res) == _summary(ar)
    for r in res:
        assert len(r.accepted_hist) == K and len(r.block_hist) == K
        assert sum(r.accepted_hist[block:]) == 0  # never more than block - 1 drafts
        assert r.block_hist[block - 1] == r.iterations == sum(r.block_hist)
    if block > 2:  # this model's drafts agree often: several accepted at once
        assert max(np.nonzero(np.sum([r.accepted_hist for r in res], 0))[0]) >= 2


@pytest.mark.slow
def test_sampling_with_a_shorter_block_runs_and_is_reproducible():
    gen = _gen("agree")
    prompts = _prompts(seed=22, n=4)
    a = _run(gen, prompts, "orthrus", 2, block_size=3, temperature=0.8, seed=5)
    b = _run(gen, prompts, "orthrus", 2, block_size=3, temperature=0.8, seed=5)
    assert _summary(a) == _summary(b)
    assert all(sum(r.accepted_hist[3:]) == 0 for r in a)


def test_bad_block_sizes_are_refused():
    gen = _gen("agree")
    for bad in (0, K + 1, "fast"):
        with pytest.raises(ValueError, match="block size"):
            gen.generate([[1, 2]], block_size=bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="infer.calibrate"):
        gen.generate([[1, 2]], block_size="auto", max_new_tokens=2)  # no profile
    with pytest.raises(ValueError, match="orthrus"):
        gen.generate([[1, 2]], mode="ar", block_size=4, max_new_tokens=2)


# --------------------------------------------------------------------------- profile, plan


def test_profile_arithmetic():
    p = AcceptanceProfile(3, (2, 3, 5))  # 10 iterations: >=1 accepted 8, >=2 accepted 5
    np.testing.assert_allclose(p.alpha(4), [0.8, 5 / 8, 0.0, 0.0])
    assert p.expected_tokens(1) == 1.0
    assert p.expected_tokens(2) == pytest.approx(1.8)
    assert p.expected_tokens(3) == pytest.approx(2.3)
    assert p.expected_tokens(5) == pytest.approx(2.3)  # past the profile: never accepted


def test_plan_is_deterministic_and_maximises_expected_tokens_per_second():
    profile = AcceptanceProfile(4, (20, 30, 30, 20))
    alpha = profile.alpha(3)
    seconds = {1: 1.0, 2: 1.5, 3: 1.9, 4: 2.6}
    rate = {k: profile.expected_tokens(k) / s for k, s in seconds.items()}
    best = max(rate, key=rate.get)
    p1 = plan(profile, seconds, max_block=4)
    assert p1 == plan(profile, dict(reversed(list(seconds.items()))), max_block=4)
    assert p1.best == best == 3
    assert p1.blocks == (3, 1)  # adaptive: the block, and AR steps to fall back on
    np.testing.assert_allclose(p1.prior, [1.0, 1 + alpha[0], 1 + alpha[0] + alpha[0] * alpha[1]])
    assert p1.costs == (1.0, 1.5, 1.9)
    assert p1.predicted_speedup == pytest.approx(rate[3] / rate[1])
    assert p1.predicted_tokens_per_iteration == pytest.approx(profile.expected_tokens(3))
    assert plan(profile, seconds, max_block=4, adaptive=False).blocks == (3,)
    assert plan(profile, seconds, max_block=2).best == 2  # sizes above the head's: unused
    # no block pays: plain AR steps, nothing to switch to
    slow = plan(profile, {1: 1.0, 2: 3.0, 3: 3.5, 4: 4.0}, max_block=4)
    assert slow.blocks == (1,) and slow.best == 1 and slow.predicted_speedup == 1.0
    assert "plain AR" in slow.describe() and "3" in p1.describe()
    # a block that only breaks even is not worth the risk: AR steps, and the report says so
    even = {1: 1.0, 2: profile.expected_tokens(2) / 1.02, 3: 9.0, 4: 9.0}
    marginal = plan(profile, even, max_block=4)
    assert marginal.blocks == (1,) and marginal.best_block == 2
    assert marginal.best_block_speedup == pytest.approx(1.02)
    assert "block 2 predicted 1.020x, below the 1.030x" in marginal.describe()
    assert plan(profile, even, max_block=4, min_gain=0.0).blocks == (2, 1)
    with pytest.raises(ValueError, match="AR step"):
        plan(profile, {2: 1.0}, max_block=4)


def test_cost_table_is_measured_once_then_read_from_disk(tmp_path, monkeypatch):
    calls = []

    def fake_time(model, blocks, batch_size, context, repeats, tree_budgets=()):
        calls.append(tuple(blocks) + tuple(f"tree{n}" for n in sorted(tree_budgets)))
        return {"ar_step": 0.01, "diffusion_pass": {k: 0.005 * k for k in blocks if k > 1},
                "verify_pass": {k: 0.006 * k for k in blocks if k > 1},
                "iteration": {k: 0.011 * k for k in blocks if k > 1}, "ar_iteration": 0.0105,
                "tree_iteration": {n: 0.001 * n for n in tree_budgets}}

    monkeypatch.setattr(bs, "_time", fake_time)
    config = _gen("agree").config
    t = CostTable(config, 2, 128, tmp_path).ensure(None, [2, 4])
    assert calls == [(1, 2, 4)]
    # the loop's own iterations, not the passes
    assert t.seconds == {1: 0.0105, 2: pytest.approx(0.022), 4: pytest.approx(0.044)}
    t.ensure(None, [2, 4])
    again = CostTable(config, 2, 128, tmp_path).ensure(None, [2, 4, 3])
    assert calls == [(1, 2, 4), (1, 2, 3, 4)]  # a size missing: all again, in the same rounds
    assert again.seconds[3] == pytest.approx(0.033) and again.path == t.path
    assert CostTable(config, 4, 128, tmp_path).path != t.path  # other batch size, other table
    stored = json.loads(t.path.read_text())
    assert stored["key"]["batch_size"] == 2 and stored["key"]["max_len"] == 128
    # trees, each at its own block: measured once, kept beside the chains
    again.ensure(None, [2, 3, 4], [(4, 5), (3, 9)])
    assert calls[-1] == (1, 2, 3, 4, "tree5", "tree9")
    assert again.seconds[3] == pytest.approx(0.033)
    assert again.tree_seconds == {(4, 5): pytest.approx(0.005), (3, 9): pytest.approx(0.009)}
    assert CostTable(config, 2, 128, tmp_path).ensure(None, [2, 3, 4], [(3, 9)]).tree_seconds[
        (3, 9)] == pytest.approx(0.009)
    assert len(calls) == 3  # read from disk
    assert CostTable(config, 2, 128, tmp_path).ensure(None, [2]).seconds == again.seconds


def test_plan_chooses_between_chains_and_trees():
    profile = AcceptanceProfile(4, (20, 30, 30, 20), trees=((3, (10, 30, 30, 30)),
                                                            (7, (5, 25, 30, 40))))
    assert profile.tree_expected_tokens(3) == pytest.approx(1 + (30 + 60 + 90) / 100)
    # cut at a shallower block: deeper acceptances count at the cut
    assert profile.tree_expected_tokens(3, 3) == pytest.approx(1 + (30 + 60 + 60) / 100)
    assert profile.tree_block(3) == 4 and profile.tree_block(3, keep=0.5) == 2
    seconds = {1: 1.0, 2: 1.5, 3: 1.9, 4: 2.6}
    chain = plan(profile, seconds, max_block=4)
    # trees of 3 nodes: more tokens per second than any chain, chosen
    trees = {(4, 3): 2.0, (4, 7): 3.5}
    p = plan(profile, seconds, max_block=4, tree_seconds=trees)
    assert (p.best, p.tree_budget, p.blocks) == (4, 3, (4, 1))
    assert p.predicted_tokens_per_iteration == pytest.approx(profile.tree_expected_tokens(3))
    assert p.prior[-1] == pytest.approx(profile.tree_expected_tokens(3)) and p.costs[-1] == 2.0
    assert p.predicted_speedup > chain.predicted_speedup
    assert "trees of 3 nodes" in p.describe()
    # a dear tree loses to the chain; a tree the profile never measured is no candidate
    assert plan(profile, seconds, max_block=4, tree_seconds={(4, 3): 9.0}) == chain
    assert plan(profile, seconds, max_block=4, tree_seconds={(4, 15): 0.1}) == chain
    # chains=False: trees or AR steps only
    only = plan(profile, seconds, max_block=4, tree_seconds={(4, 7): 9.0}, chains=False)
    assert only.blocks == (1,) and "block 4 tree 7 predicted" in only.describe()


def test_profile_with_trees_round_trips_and_bad_ones_are_refused(tmp_path):
    profile = AcceptanceProfile(3, (2, 3, 5), "calib", ((3, (1, 2, 3)), (7, (0, 1, 5))))
    profile.save(tmp_path)
    assert AcceptanceProfile.load(tmp_path) == profile
    d = json.loads((tmp_path / "acceptance.json").read_text())
    for bad, message in [({"3": [1, 2]}, r"trees\[3\] must hold 3"),
                         ({"0": [1, 2, 3]}, "tree budgets"), ([1, 2], "not an acceptance")]:
        (tmp_path / "acceptance.json").write_text(json.dumps(d | {"trees": bad}))
        with pytest.raises(ValueError, match=message):
            AcceptanceProfile.load(tmp_path)


# --------------------------------------------------------------------------- adaptive loop


def _auto_generator(name, profile, seconds, root):
    """A Generator for ``name`` with ``profile`` whose cost tables (every batch size and
    cache length these tests use: prompts of up to 16 tokens, up to 64 new ones) hold
    ``seconds``: nothing is measured."""
    gen = _gen(name)
    gen.profile, gen.cost_root = profile, root
    for batch in (1, 2, 4):
        t = CostTable(gen.config, batch, _table_len(gen), root,
                      weights_out_in=gen.model.out_in,
                      attention_kernel=gen.model.attention_kernel)
        t.seconds = dict(seconds)
        t.save()
    return gen


def test_cost_tables_are_measured_at_few_cache_lengths():
    # powers of two and three halves of them, at least the cache, at most the cap
    assert [table_len(n, 8192) for n in (1, 16, 17, 25, 240, 256, 288, 384, 385, 704)] == [
        16, 16, 24, 32, 256, 256, 384, 384, 512, 768]
    assert table_len(4608, 8192) == 6144 and table_len(6000, 6000) == 6000
    assert table_len(40_960, 40_960) == 40_960  # never past the engine's longest cache
    assert len({table_len(cache_bucket(n), 1 << 20) for n in range(256, 4097)}) == 9


def _table_len(gen) -> int:
    """The cost table's length of a batch of these tests: every one (prompts of 1-16
    tokens, 1-64 new ones) gets the least cache and so one table."""
    lengths = {table_len(cache_len(n, new, gen.max_len), gen.max_len)
               for n in (1, 16) for new in (1, 64)}
    assert len(lengths) == 1, lengths
    return lengths.pop()


def test_block_plan_considers_only_the_trees_asked_for(tmp_path):
    # The cost table holds trees of 3 and 7 nodes (a call with --tree-budget auto measured
    # them) and they are cheap: chains only ('none', None) must not choose them, a fixed
    # budget only that budget.
    profile = AcceptanceProfile(K, (40, 30, 10, 5, 5, 4, 3, 3),
                                trees=((3, (5, 35, 40, 20, 0, 0, 0, 0)),
                                       (7, (2, 18, 30, 30, 20, 0, 0, 0))))
    seconds = {k: 1.0 + 0.5 * k for k in range(2, K + 1)} | {1: 1.0}
    gen = _auto_generator("qwen3-untied-K8", profile, seconds, tmp_path)
    max_len = _table_len(gen)
    t = CostTable(gen.config, 1, max_len, tmp_path, weights_out_in=gen.model.out_in,
                  attention_kernel=gen.model.attention_kernel)
    t.tree_seconds = {(profile.tree_block(3), 3): 1.2, (profile.tree_block(7), 7): 1.3}
    t.save()
    try:
        chains = gen.block_plan("auto", batch_size=1, max_len=max_len)
        assert chains.tree_budget == 0 and chains.best_tree_budget == 0
        both = gen.block_plan("auto", tree_budget="auto", batch_size=1, max_len=max_len)
        assert both.tree_budget == 7  # the most tokens per second
        seven = gen.block_plan("auto", tree_budget=3, batch_size=1, max_len=max_len)
        assert seven.tree_budget == 3 and seven.best_tree_budget == 3
    finally:
        gen.profile = gen.cost_root = None
        gen.plans.clear()


@pytest.mark.slow
def test_adaptive_loop_switches_and_stays_lossless(tmp_path):
    # The prior promises many accepted drafts; this random model's drafts are seldom
    # accepted, so the loop falls back to AR steps, and later tries the block again.
    optimistic = AcceptanceProfile(K, (1, 1, 1, 1, 1, 1, 1, 93))
    seconds = {k: 1.0 + 0.1 * k for k in range(2, K + 1)} | {1: 1.0}
    gen = _auto_generator("qwen3-untied-K8", optimistic, seconds, tmp_path)
    try:
        prompts = _prompts(seed=23, n=4)
        ar = _run(gen, prompts, "ar", 2, max_new_tokens=40)
        res = _run(gen, prompts, "orthrus", 2, max_new_tokens=40, block_size="auto")
        chosen = gen.block_plan("auto", batch_size=2, max_len=_table_len(gen))
        assert chosen.adaptive and chosen.best == K
        assert _summary(res) == _summary(ar)
        hist = np.sum([r.block_hist for r in res], axis=0)
        assert hist[0] > 0 and hist[K - 1] > 0, hist  # both sizes ran
        assert hist[0] > hist[K - 1], hist  # mostly AR on text that accepts little
        fixed = _run(gen, prompts, "orthrus", 2, max_new_tokens=40, block_size="auto",
                     adaptive=False)
        assert _summary(fixed) == _summary(ar)
        assert all(r.block_hist[K - 1] == r.iterations for r in fixed)
    finally:
        gen.profile = gen.cost_root = None


# --------------------------------------------------------------------------- CLIs


@pytest.mark.slow
def test_calibrate_then_generate_auto(tmp_path, monkeypatch, capsys):
    from tests.hf_reference import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m", block_size=4, seed=4)
    prompts = tmp_path / "calib.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat {i}"}) + "\n" for i in range(3)))
    assert calibrate_cli.main(["--model", str(model), "--prompts-file", str(prompts),
                               "--max-new-tokens", "12", "--batch-size", "4",
                               "--tree-budgets", "5"]) == 0
    profile = AcceptanceProfile.load(model)
    assert profile.block_size == 4 and sum(profile.accepted_hist) > 0
    assert profile.tree_budgets == (5,) and sum(dict(profile.trees)[5]) > 0
    table = np.asarray(profile.tree_calibration)  # the fitted tree scoring, one row per depth
    assert table.shape == (3, SCORE_BINS) and (table <= 0).all()
    assert (np.diff(table, axis=1) >= 0).all()
    out = capsys.readouterr().out
    assert "expected tokens/iteration" in out and "trees of 5 nodes" in out
    assert "tree scoring fitted" in out

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    args = ["--model", str(model), "--prompt", "the cat", "--max-new-tokens", "8",
            "--json", "--eos-id", "-1"]
    assert generate_cli.main(args + ["--mode", "ar"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert generate_cli.main(args) == 0  # auto: the folder has a profile
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == ar["token_ids"]
    assert "measuring decode-loop iteration costs" in out.err
    tables = list((tmp_path / "cache" / "costs").glob("*.json"))
    assert len(tables) == 1 and set(json.loads(tables[0].read_text())["seconds"]) == \
        {"1", "2", "3", "4"}
    assert generate_cli.main(args[:-3] + ["--compare-ar"]) == 0
    err = capsys.readouterr().err
    assert "auto:" in err and "x AR" in err and "1 of 1 outputs identical" in err
    assert "measuring" not in err  # the table is cached
    with pytest.raises(SystemExit):
        generate_cli.main(args + ["--block-size", "0"])
    assert "expected 'auto' or an integer" in capsys.readouterr().err
