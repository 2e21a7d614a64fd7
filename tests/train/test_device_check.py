"""``python -m train.device_check``: every section's numbers (the draft trees' verify pass
and loop among them), failures recorded without stopping the run, the time budget, and the
shipped Qwen3-8B shape; the plan: every program sized before anything is allocated (and
equal to the compiled programs), sections that would not fit shrunk or skipped, every
program lowered for CUDA."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.device_check import (
    CONFIG_DIR,
    PRESETS,
    Checks,
    build_parser,
    resolve_config,
    settings_from_args,
    trees_shrink,
)
from infer.device_plan import FIT_FRACTION, export_for, plan_programs
from infer.engine import Generator
from orthrus_jax.config import ModelConfig
from orthrus_jax.memory import tree_bytes
from train import device_check
from train.device_check import SECTIONS, main, peak_flops, synthetic_batch, train_step_flops

TINY = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "block_size": 4,
        "mask_token_id": 3}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


SHAPES = ["--small", "--contexts", "16", "--blocks", "4"]


def _run(config, out, *extra):
    # One context and block keep the compiles few; the preset's other shapes are the same code.
    return main(["--config", str(config), *SHAPES, "--out", str(out), *extra])


def _checks(config, *extra) -> Checks:
    args = build_parser("test", "", list(SECTIONS)).parse_args(
        ["--config", str(config), *SHAPES, *extra])
    return Checks(args, settings_from_args(args), budget=None)


def _programs(checks: Checks) -> dict[str, list]:
    return {name: section.programs(checks, checks.settings)
            for name, section in SECTIONS.items() if section.programs is not None}


def _positive(x) -> bool:
    return isinstance(x, float) and x > 0 and np.isfinite(x)


@pytest.mark.slow
def test_every_section_reports_numbers(config, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _run(config, out) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and set(r["sections"]) == set(SECTIONS)
    assert r["order"][0] == "model" and sorted(r["order"]) == sorted(SECTIONS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partials
    s = {name: e["result"] for name, e in r["sections"].items() if e["status"] == "ok"}
    assert set(s) == set(SECTIONS), {n: e.get("error") for n, e in r["sections"].items()}
    assert all(_positive(e["seconds"]) for e in r["sections"].values())
    assert r["model"]["built"] and r["model"]["params"] > r["model"]["diffusion_params"] > 0
    assert s["model"]["param_bytes"] == r["model"]["param_bytes"] > 0
    for name, entry in r["sections"].items():  # the plan beside what ran
        assert entry["plan"]["peak_bytes"] >= r["model"]["param_bytes"], name
        assert entry["plan"]["fits"] is None  # a CPU has no allocator limit
        assert entry["memory"]["host_peak_rss_bytes"] > 0

    assert s["device"]["backend"] == "cpu" and _positive(s["device"]["copy_bandwidth_gb_s"])
    ctx = s["passes"]["contexts"]["16"]
    for p in (ctx["ar_step"], ctx["blocks"]["4"]["diffusion_pass"],
              ctx["blocks"]["4"]["verify_pass"]):
        assert all(_positive(p[k]) for k in ("seconds", "floor_seconds", "ratio_to_floor"))
    assert _positive(ctx["blocks"]["4"]["iteration_to_ar_step"])
    # the compiled decode loop's iteration beside its two passes
    loop = ctx["blocks"]["4"]
    assert _positive(loop["loop_iteration_seconds"]) and _positive(ctx["ar_loop_step_seconds"])
    assert loop["loop_to_passes"] == pytest.approx(
        loop["loop_iteration_seconds"] / loop["iteration_seconds"])
    for mode in ("orthrus", "ar"):
        m = s["decode_loop"]["modes"][mode]
        assert m["tokens"] == 2 * 8  # two prompts, no EOS: every row runs to its budget
        assert all(_positive(m[k]) for k in ("tokens_per_second", "iterations_per_second",
                                             "tokens_per_iteration"))
        assert m["compile_seconds"] and all(_positive(b["seconds"]) for b in m["compile_seconds"])
        assert {b["bucket"]["mode"] for b in m["compile_seconds"]} == {mode}
    # draft trees of the small preset's budgets at the passes' block: verify pass and loop
    tr = s["trees"]
    assert (tr["context"], tr["block"], tr["tree_budgets"]) == (16, 4, [3, 7])
    assert all(_positive(tr["ar_step"][k]) for k in ("seconds", "floor_seconds",
                                                     "ratio_to_floor"))
    assert _positive(tr["ar_loop_step_seconds"])
    assert (tr["chain"]["nodes"], tr["chain"]["rows"]) == (3, 4)
    assert _positive(tr["chain"]["to_ar_step"]) and _positive(tr["chain"]["loop_to_passes"])
    assert sorted(tr["budgets"]) == ["3", "7"]
    for n in (3, 7):
        b = tr["budgets"][str(n)]
        assert (b["nodes"], b["rows"]) == (n, n + 1)
        assert all(_positive(b[k]) for k in (
            "seconds", "floor_seconds", "ratio_to_floor", "to_ar_step", "to_chain_verify",
            "loop_iteration_seconds", "loop_to_ar_loop_step", "loop_to_chain_loop",
            "loop_to_passes")), b
        assert b["to_ar_step"] == pytest.approx(b["seconds"] / tr["ar_step"]["seconds"])
        assert b["loop_to_ar_loop_step"] == pytest.approx(
            b["loop_iteration_seconds"] / tr["ar_loop_step_seconds"])
    planned = [p["name"] for p in r["sections"]["trees"]["plan"]["programs"]]
    assert {"tree_verify_pass@16/N=7", "loop@16/K=4/N=7"} <= set(planned)
    assert s["decode_loop"]["modes"]["ar"]["tokens_per_iteration"] == 1.0
    assert _positive(s["decode_loop"]["speedup"])
    for form in ("scan", "unrolled"):
        assert _positive(s["layers"][form]["step_seconds"])
        assert _positive(s["layers"][form]["compile_seconds"])
    t = s["train_step"]
    assert all(_positive(t[k]) for k in ("compile_seconds", "step_seconds", "flops_per_step",
                                         "achieved_flops_per_second"))
    assert np.isfinite(t["loss"]) and t["positions"] == 4 * 3  # 4 anchors x (K - 1)
    assert t["mfu"] is None and "CPU" in t["mfu_reason"]
    err = capsys.readouterr().err
    assert "[" in err and "s] train_step: ok" in err  # progress lines with elapsed seconds
    assert "s] trees: N=7 (8 rows): verify " in err


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_rest_run(config, tmp_path, monkeypatch):
    def boom(checks):
        raise RuntimeError("boom")

    monkeypatch.setitem(SECTIONS, "passes", dataclasses.replace(SECTIONS["passes"], run=boom))
    out = tmp_path / "report.json"
    assert _run(config, out, "--sections", "device,passes,layers") == 1
    sec = json.loads(out.read_text())["sections"]
    assert sec["passes"]["status"] == "error" and sec["passes"]["error"] == "RuntimeError: boom"
    assert "boom" in sec["passes"]["traceback"]
    assert sec["device"]["status"] == sec["layers"]["status"] == "ok"
    assert _positive(sec["layers"]["result"]["unrolled"]["step_seconds"])
    assert sec["decode_loop"] == sec["train_step"] == sec["model"] == {
        "status": "skipped", "reason": "not selected (--sections)"}


def test_a_model_that_cannot_be_built_fails_its_sections_only(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report.json"
    assert main(["--model", str(tmp_path / "empty"), "--small", "--out", str(out),
                 "--sections", "device,layers,train_step"]) == 1
    r = json.loads(out.read_text())
    assert r["sections"]["device"]["status"] == "ok"
    for name in ("layers", "train_step"):  # their plans fail: there is no config
        assert r["sections"][name]["status"] == "error"
        assert r["sections"][name]["error"].startswith("plan: ")
    assert "no config.json" in r["sections"]["train_step"]["error"]


def test_budget_zero_skips_every_section(config, tmp_path, monkeypatch):
    def never(checks):
        raise AssertionError("a skipped section ran")

    for name in SECTIONS:
        monkeypatch.setitem(SECTIONS, name, dataclasses.replace(SECTIONS[name], run=never))
    out = tmp_path / "report.json"
    assert _run(config, out, "--budget-seconds", "0") == 0
    r = json.loads(out.read_text())
    assert r["complete"] and not r["model"]["built"]
    for entry in r["sections"].values():
        assert entry["status"] == "skipped" and "budget" in entry["reason"]
        assert entry["plan"]["peak_bytes"] > 0  # planned all the same


def test_bad_arguments_exit_2(config, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _run(config, out, "--sections", "device,nope") == 2
    assert main(["--config", "no-such-shape", "--out", str(out)]) == 2
    assert _run(config, out, "--plan-only", "--device-kind", "abacus") == 2
    err = capsys.readouterr().err
    assert "nope" in err and "qwen3-8b" in err
    assert "--device-kind abacus" in err and "h100" in err
    with pytest.raises(SystemExit) as exit_:
        _run(config, out, "--tree-budgets", "16,300")
    assert exit_.value.code == 2 and "tree budgets from 1 to 255" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _run(config, out, "--plan-only", "--device-memory", "lots")
    assert exit_.value.code == 2 and "'lots' is not a size" in capsys.readouterr().err
    assert not out.exists()


def test_the_shipped_qwen3_8b_shape():
    path = resolve_config("qwen3-8b")
    assert path == CONFIG_DIR / "qwen3-8b.json"
    c = ModelConfig.from_json_file(path)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        151936, 4096, 12288, 36, 32, 8, 128)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-6, 40960)
    assert (c.block_size, c.mask_token_id, c.tie_word_embeddings) == (32, 151669, False)
    assert c.qk_norm and c.model_type == "qwen3"
    # ~8.2B backbone parameters: embeddings, LM head, 36 layers of attention and MLP.
    attn = 4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096
    backbone = 2 * 151936 * 4096 + 36 * (attn + 3 * 4096 * 12288)
    assert 8.1e9 < backbone < 8.3e9


def test_peak_flops():
    assert peak_flops("NVIDIA H200", "gpu", "bfloat16") == (989e12, "dense bf16 peak of 'h200' "
                                                                    "(datasheet)")
    assert peak_flops("NVIDIA H100 PCIe", "gpu", "bfloat16")[0] == 756e12
    assert peak_flops("cpu", "cpu", "float32")[0] is None
    assert peak_flops("NVIDIA H200", "gpu", "float32")[0] is None
    assert peak_flops("Mystery", "gpu", "bfloat16")[0] is None


@pytest.mark.slow
def test_train_step_flops_match_xla_on_one_layer():
    """With one layer XLA's count is whole (its scan has one iteration): the analytic
    count agrees within what it leaves out (masked attention, elementwise ops)."""
    from flax import nnx

    from orthrus_jax.model import OrthrusLM
    from orthrus_jax.sharding import make_mesh
    from train.step import TrainConfig, Trainer

    c = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, block_size=4, mask_token_id=3, max_position_embeddings=512)
    trainer = Trainer(OrthrusLM(c, rngs=nnx.Rngs(0)), TrainConfig(total_steps=10),
                      make_mesh("data=1"))
    batch = synthetic_batch(c, batch_size=2, seq_len=128, anchors=16)
    compiled = trainer._step.lower(trainer.init_state(), trainer.backbone,
                                   jax.tree.map(jax.numpy.asarray, batch)).compile()
    xla = device_check.cost_analysis(compiled)["flops"]
    ours = train_step_flops(c, 128, batch["anchors"])["total"]
    assert 0.85 < ours / xla < 1.05


def test_plan_only_sizes_every_program_and_allocates_nothing(config, tmp_path):
    before = sum(a.nbytes for a in jax.live_arrays())
    out = tmp_path / "plan.json"
    assert _run(config, out, "--plan-only", "--device-memory", "1GB") == 0
    assert sum(a.nbytes for a in jax.live_arrays()) - before < 1000  # no model, no cache
    r = json.loads(out.read_text())
    assert r["plan_only"] and r["complete"] and not r["model"]["built"]
    params = r["model"]["param_bytes"]
    assert params == 4 * r["model"]["params"] > 0  # from the config alone (float32)
    assert r["plan"]["device_memory_bytes"] == 10**9
    assert r["plan"]["limit_bytes"] == int(FIT_FRACTION * 10**9)
    assert r["plan"]["target"]["name"] == "h100"  # a CPU has no figures: the default target
    names = {}
    for name in SECTIONS:
        entry = r["sections"][name]
        assert entry["status"] == "planned" and "result" not in entry, name
        plan = entry["plan"]
        assert plan["fits"] and params <= plan["peak_bytes"] <= plan["limit_bytes"]
        assert plan["estimated_seconds"] >= plan["compile_seconds"] >= 0
        names[name] = [p["name"] for p in plan["programs"]]
        for p in plan["programs"]:
            assert p["peak_bytes"] == (p["input_bytes"] + p["output_bytes"] - p["alias_bytes"]
                                       + p["temp_bytes"] + p["held_bytes"])
            assert p["input_bytes"] >= p["argument_bytes"] > 0
            assert p["estimated_run_seconds"] > 0 and p["compile_seconds"] > 0
    assert names["model"] == [] and r["sections"]["model"]["plan"]["peak_bytes"] == params
    assert names["device"] == ["copy"] and names["train_step"] == ["train_step"]
    assert names["passes"] == ["ar_step@16", "diffusion_pass@16/K=4", "verify_pass@16/K=4",
                               "loop@16/K=1", "loop@16/K=4"]
    assert names["trees"] == ["ar_step@16", "diffusion_pass@16/K=4", "verify_pass@16/K=4",
                              "loop@16/K=1", "loop@16/K=4", "tree_verify_pass@16/N=3",
                              "loop@16/K=4/N=3", "tree_verify_pass@16/N=7",
                              "loop@16/K=4/N=7"]
    trees = {p["name"]: p for p in r["sections"]["trees"]["plan"]["programs"]}
    # N + 1 rows of logits: the larger tree's verify pass outputs more
    assert trees["tree_verify_pass@16/N=7"]["output_bytes"] > \
        trees["tree_verify_pass@16/N=3"]["output_bytes"] > 0
    assert trees["loop@16/K=4/N=7"]["held_bytes"] == trees["ar_step@16"]["held_bytes"]
    assert names["layers"] == ["ar_step:scan@32", "ar_step:unrolled@32"]
    assert [n.split("@")[0] for n in names["decode_loop"]] == [
        "start:orthrus", "run:orthrus", "start:ar", "run:ar"]
    order = r["order"]
    assert order[0] == "model" and sorted(order) == sorted(SECTIONS)
    seconds = [r["sections"][n]["plan"]["estimated_seconds"] for n in order[1:]]
    assert seconds == sorted(seconds)  # cheapest first


@pytest.mark.slow
def test_the_plan_equals_the_compiled_programs(config):
    """Each planned program, lowered with real arrays in place of its abstract inputs,
    compiles to the same memory analysis; the decode loop's and the train step's also
    equal the programs the engine and the trainer compile for the real model."""
    checks = _checks(config)
    fields = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")

    def real(tree):
        def one(x):
            if not isinstance(x, jax.ShapeDtypeStruct):
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.key(0)
            zeros = jnp.zeros(x.shape, x.dtype)
            return zeros if x.sharding is None else jax.device_put(zeros, x.sharding)
        return jax.tree.map(one, tree)

    def analysis(compiled) -> dict:
        m = compiled.memory_analysis()
        return dict(zip(fields, (m.argument_size_in_bytes, m.output_size_in_bytes,
                                 m.alias_size_in_bytes, m.temp_size_in_bytes), strict=True))

    planned = {}
    for name, programs in _programs(checks).items():
        for p, entry in zip(programs, plan_programs(programs, None), strict=True):
            sized = {k: entry[k] for k in fields}
            if entry["name"] in planned:  # a program of another section (trees, passes)
                assert planned[entry["name"]] == sized, p.name
                continue
            planned[entry["name"]] = sized
            args = real(p.args)
            assert tree_bytes(args) == entry["input_bytes"], (name, p.name)
            assert analysis(p.fn.lower(*args).compile()) == sized, p.name

    gen = Generator(checks.model())  # the engine's own programs for the real model
    settings = checks.settings
    prompts = [[1] * settings.prompt_len] * settings.prompts
    for mode in ("orthrus", "ar"):
        (key,) = gen.program_keys(prompts, mode=mode, max_new_tokens=settings.max_new_tokens,
                                  eos_ids=[], batch_size=settings.batch_size)
        start_c, run_c = gen.compile(key)
        name = f"{mode}@prompt{key.prompt_len}/cache{key.max_len}"
        assert analysis(start_c) == planned[f"start:{name}"]
        assert analysis(run_c) == planned[f"run:{name}"]


@pytest.mark.slow
def test_a_section_that_would_not_fit_is_shrunk_or_skipped_and_the_others_run(config,
                                                                             tmp_path):
    def plan(*extra):
        out = tmp_path / "plan.json"
        assert _run(config, out, "--plan-only", *extra) == 0
        return {n: e["plan"]["peak_bytes"] for n, e in
                json.loads(out.read_text())["sections"].items() if "plan" in e}

    one = plan("--sections", "passes,train_step,layers", "--train-remat")
    two = plan("--sections", "passes", "--contexts", "16,128")
    assert two["passes"] > one["passes"]
    others = max(v for n, v in one.items() if n != "train_step")
    assert one["train_step"] > max(others, two["passes"])
    # Room for everything but the train step (remat on, it cannot shrink below its
    # sequence of 32).
    limit = (max(others, two["passes"]) + one["train_step"]) // 2
    out = tmp_path / "report.json"
    assert main(["--config", str(config), "--small", "--blocks", "4", "--contexts", "16,128",
                 "--train-remat", "--sections", "passes,train_step,layers",
                 "--device-memory", str(int(limit / FIT_FRACTION) + 1),
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())["sections"]
    train = r["train_step"]
    assert train["status"] == "skipped" and "result" not in train
    assert "exceeds 90% of the device memory" in train["reason"]
    assert train["plan"]["shrunk"] == [] and "cannot be shrunk" in train["reason"]
    for name in ("passes", "layers"):
        assert r[name]["status"] == "ok" and r[name]["plan"]["shrunk"] == [], r[name]
    assert list(r["passes"]["result"]["contexts"]) == ["16", "128"]

    # Room for the passes at context 16, not at 128: the section is shrunk, and runs.
    limit = (one["passes"] + two["passes"]) // 2
    assert main(["--config", str(config), "--small", "--blocks", "4", "--contexts", "16,128",
                 "--sections", "passes", "--device-memory", str(int(limit / FIT_FRACTION) + 1),
                 "--out", str(out)]) == 0
    passes = json.loads(out.read_text())["sections"]["passes"]
    assert passes["status"] == "ok" and passes["plan"]["shrunk"] == ["context 128 dropped"]
    assert passes["settings"]["contexts"] == [16]
    assert list(passes["result"]["contexts"]) == ["16"]


def test_every_program_lowers_for_cuda(config):
    """jax.export for CUDA needs no GPU: a lowering that only fails there fails here."""
    checks = _checks(config, "--dtype", "bfloat16")
    exported = 0
    for name, programs in _programs(checks).items():
        for p in programs:
            e = export_for(p, ["cuda"])
            assert e.platforms == ("cuda",), (name, p.name)
            assert "stablehlo" in e.mlir_module()
            exported += 1
    # device, passes (2 loops), trees (the passes' 5 and 2 per budget), decode loop, layers,
    # train
    assert exported == 1 + 5 + (5 + 2 * 2) + 4 + 2 + 1


def test_a_model_folder_is_planned_and_loaded_in_the_decoding_form(config, tmp_path):
    from orthrus_jax.checkpoint import save_model
    from orthrus_jax.random_weights import random_model

    folder = tmp_path / "model"
    folder.mkdir()
    save_model(random_model(ModelConfig.from_json_file(config), per_layer=False), folder)
    out = tmp_path / "report.json"
    assert main(["--model", str(folder), *SHAPES, "--sections", "model,device",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    model = r["sections"]["model"]
    assert model["status"] == "ok" and model["result"]["built"]
    assert model["plan"]["peak_bytes"] == model["result"]["param_bytes"] > 0
    assert r["sections"]["device"]["plan"]["programs"][0]["held_bytes"] == \
        model["result"]["param_bytes"]


def test_the_trees_preset_and_shrink():
    assert PRESETS["full"].tree_budgets == (16, 32, 64, 128)
    assert PRESETS["full"].tree_context in PRESETS["full"].contexts
    s = dataclasses.replace(PRESETS["small"], tree_budgets=(7, 3, 7))
    smaller, change = trees_shrink(s)
    assert smaller.tree_budgets == (3,) and change == "tree budget 7 dropped"
    assert trees_shrink(smaller) is None
