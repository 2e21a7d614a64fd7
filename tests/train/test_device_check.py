"""``python -m train.device_check``: every section's numbers, failures recorded without
stopping the run, the time budget, and the shipped Qwen3-8B shape."""

import json

import jax
import numpy as np
import pytest

from infer.device_check import CONFIG_DIR, resolve_config
from orthrus_jax.config import ModelConfig
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


def _run(config, out, *extra):
    # One context and block keep the compiles few; the preset's other shapes are the same code.
    return main(["--config", str(config), "--small", "--contexts", "16", "--blocks", "4",
                 "--out", str(out), *extra])


def _positive(x) -> bool:
    return isinstance(x, float) and x > 0 and np.isfinite(x)


@pytest.mark.slow
def test_every_section_reports_numbers(config, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _run(config, out) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and set(r["sections"]) == set(SECTIONS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partials
    s = {name: e["result"] for name, e in r["sections"].items() if e["status"] == "ok"}
    assert set(s) == set(SECTIONS), {n: e.get("error") for n, e in r["sections"].items()}
    assert all(_positive(e["seconds"]) for e in r["sections"].values())
    assert r["model"]["built"] and r["model"]["params"] > r["model"]["diffusion_params"] > 0

    assert s["device"]["backend"] == "cpu" and _positive(s["device"]["copy_bandwidth_gb_s"])
    ctx = s["passes"]["contexts"]["16"]
    for p in (ctx["ar_step"], ctx["blocks"]["4"]["diffusion_pass"],
              ctx["blocks"]["4"]["verify_pass"]):
        assert all(_positive(p[k]) for k in ("seconds", "floor_seconds", "ratio_to_floor"))
    assert _positive(ctx["blocks"]["4"]["iteration_to_ar_step"])
    for mode in ("orthrus", "ar"):
        m = s["decode_loop"]["modes"][mode]
        assert m["tokens"] == 2 * 8  # two prompts, no EOS: every row runs to its budget
        assert all(_positive(m[k]) for k in ("tokens_per_second", "iterations_per_second",
                                             "tokens_per_iteration"))
        assert m["compile_seconds"] and all(_positive(b["seconds"]) for b in m["compile_seconds"])
        assert {b["bucket"]["mode"] for b in m["compile_seconds"]} == {mode}
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


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_rest_run(config, tmp_path, monkeypatch):
    def boom(checks):
        raise RuntimeError("boom")

    monkeypatch.setitem(SECTIONS, "passes", boom)
    out = tmp_path / "report.json"
    assert _run(config, out, "--sections", "device,passes,layers") == 1
    sec = json.loads(out.read_text())["sections"]
    assert sec["passes"]["status"] == "error" and sec["passes"]["error"] == "RuntimeError: boom"
    assert "boom" in sec["passes"]["traceback"]
    assert sec["device"]["status"] == sec["layers"]["status"] == "ok"
    assert _positive(sec["layers"]["result"]["unrolled"]["step_seconds"])
    assert sec["decode_loop"] == sec["train_step"] == {
        "status": "skipped", "reason": "not selected (--sections)"}


def test_a_model_that_cannot_be_built_fails_its_sections_only(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report.json"
    assert main(["--model", str(tmp_path / "empty"), "--small", "--out", str(out),
                 "--sections", "device,layers,train_step"]) == 1
    r = json.loads(out.read_text())
    assert r["sections"]["device"]["status"] == "ok"
    for name in ("layers", "train_step"):
        assert r["sections"][name]["status"] == "error"
    assert str(tmp_path / "empty") in r["model"]["error"]
    assert "could not be built" in r["sections"]["train_step"]["error"]


def test_budget_zero_skips_every_section(config, tmp_path, monkeypatch):
    def never(checks):
        raise AssertionError("a skipped section ran")

    for name in SECTIONS:
        monkeypatch.setitem(SECTIONS, name, never)
    out = tmp_path / "report.json"
    assert _run(config, out, "--budget-seconds", "0") == 0
    r = json.loads(out.read_text())
    assert r["complete"] and not r["model"]["built"]
    for entry in r["sections"].values():
        assert entry["status"] == "skipped" and "budget" in entry["reason"]


def test_bad_arguments_exit_2(config, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _run(config, out, "--sections", "device,nope") == 2
    assert main(["--config", "no-such-shape", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "qwen3-8b" in err
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
    xla = device_check._xla_flops(compiled)
    ours = train_step_flops(c, 128, batch["anchors"])["total"]
    assert 0.85 < ours / xla < 1.05
