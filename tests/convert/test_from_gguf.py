"""End to end: tiny llama.cpp GGUF -> ``convert.from_gguf.main`` -> ``load_model`` -> logits.

The reference is transformers' ``LlamaForCausalLM`` holding the weights the GGUF file
really stores (dequantized, HF layout), so quantization error is not part of the check.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from convert.from_gguf import main
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.model import prefill, split_trainable
from tests.convert.gguf_fixtures import (
    CHATML_TEMPLATE,
    Q,
    expected_after_roundtrip,
    random_hf_state,
    tiny_config,
    write_tiny_gguf,
)

MASK_ID = 5  # a byte token of tiny_vocab(); any id inside the vocabulary will do
PROMPT_LENGTHS = (1, 7, 20)
TOL = 1e-4

# (matrix qtype, embedding/lm_head qtype, tied): llama.cpp keeps embeddings at Q8_0
# next to Q4 matrices; norms are always F32.
CASES = [
    (Q.F32, Q.F32, True),
    (Q.F32, Q.F32, False),
    (Q.Q8_0, Q.Q8_0, True),
    (Q.Q8_0, Q.Q8_0, False),
    (Q.Q4_0, Q.Q8_0, True),
    (Q.Q4_1, Q.Q8_0, False),
]


def _case_id(case) -> str:
    qtype, embed_qtype, tied = case
    return f"{qtype.name}-emb{embed_qtype.name}-{'tied' if tied else 'untied'}"


def _dequantized_state(state: dict[str, np.ndarray], qtype, embed_qtype) -> dict:
    out = {}
    for key, w in state.items():
        is_embed = key in ("model.embed_tokens.weight", "lm_head.weight")
        out[key] = expected_after_roundtrip(w, embed_qtype if is_embed else qtype)
    return out


def _hf_llama(config: dict, state: dict[str, np.ndarray]) -> transformers.LlamaForCausalLM:
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = transformers.LlamaConfig(**kwargs, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).eval().float()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    if config["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()


# Jitted once per model structure (tied / untied) and shape, reused across cases.
@nnx.jit
def _forward(model, tokens, cache):
    return model(tokens, cache)


@nnx.jit(static_argnames="chunk_size")
def _prefill(model, tokens, cache, lengths, chunk_size):
    return prefill(model, tokens, cache, lengths, chunk_size)


def _prompts(vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    return [rng.integers(0, vocab_size, size=n).astype(np.int32) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def converted(request, tmp_path_factory):
    """(config, dequantized HF state, DST folder, loaded model, main's status) per case."""
    qtype, embed_qtype, tied = request.param
    tmp = tmp_path_factory.mktemp(_case_id(request.param))
    config = tiny_config(tie_word_embeddings=tied)
    state = random_hf_state(config, seed=7)
    src = write_tiny_gguf(tmp / "tiny.gguf", state, config, qtype, embed_qtype=embed_qtype)
    dst = tmp / "model"
    status = main([str(src), str(dst), "--mask-token-id", str(MASK_ID)])
    model = load_model(dst) if status == 0 else None
    return config, _dequantized_state(state, qtype, embed_qtype), dst, model, status


@pytest.mark.slow
def test_logits_match_transformers(converted) -> None:
    config, state, _, model, status = converted
    assert status == 0
    assert model.config.param_dtype == "float32"
    assert (model.lm_head is None) == config["tie_word_embeddings"]
    hf = _hf_llama(config, state)
    for tokens in _prompts(config["vocab_size"]):
        cache = init_cache(model.config, 1, 32)
        logits, cache = _forward(model, jnp.asarray(tokens[None]), cache)
        assert logits.dtype == jnp.float32
        assert int(cache.lengths[0]) == len(tokens)
        want = _hf_logits(hf, tokens)
        diff = float(np.max(np.abs(np.asarray(logits[0]) - want)))
        assert diff <= TOL, f"prompt length {len(tokens)}: max |logit diff| {diff:.3g}"


@pytest.mark.slow
def test_chunked_prefill_then_step_matches_transformers(converted) -> None:
    """Right-padded batch through ``prefill`` (chunks of 8), then one cached decode step."""
    config, state, _, model, _ = converted
    hf = _hf_llama(config, state)
    prompts = _prompts(config["vocab_size"])
    buf = np.zeros((len(prompts), 24), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache = init_cache(model.config, len(prompts), 32)
    last, cache = _prefill(model, jnp.asarray(buf), cache, lengths, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths))
    nxt = np.asarray(jnp.argmax(last, axis=-1), np.int32)
    step, cache = _forward(model, jnp.asarray(nxt[:, None]), cache)
    for i, p in enumerate(prompts):
        want = _hf_logits(hf, np.concatenate([p, nxt[i:i + 1]]))
        for got, ref, what in ((last[i], want[-2], "prefill"), (step[i, 0], want[-1], "step")):
            diff = float(np.max(np.abs(np.asarray(got) - ref)))
            assert diff <= TOL, f"row {i} ({len(p)} tokens) {what}: max |diff| {diff:.3g}"


def test_folder_config_and_tokenizer(converted) -> None:
    config, _, dst, model, _ = converted
    assert sorted(p.name for p in dst.iterdir()) == [
        "checksums.json", "config.json", "params", "tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((dst / "config.json").read_text())
    assert saved["mask_token_id"] == MASK_ID
    assert isinstance(saved["block_size"], int) and saved["block_size"] >= 2
    assert saved["block_size"] == model.config.block_size
    assert saved["model_type"] == "llama"
    assert saved["tie_word_embeddings"] == config["tie_word_embeddings"]
    assert saved["vocab_size"] == config["vocab_size"]
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML_TEMPLATE

    tok = transformers.AutoTokenizer.from_pretrained(dst)
    assert len(tok) == config["vocab_size"]
    ids = tok("Hello world", add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == "Hello world"
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]
    chat = tok.apply_chat_template([{"role": "user", "content": "is the cat"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nis the cat<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "is the cat"}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    assert chat_ids[0] == 1 and 2 in chat_ids  # <|im_start|>, <|im_end|> as single ids
    assert max(chat_ids) < config["vocab_size"]


def test_diffusion_subtree_is_a_copy_of_ar_attention(converted) -> None:
    _, state, _, model, _ = converted
    _, diffusion, backbone = split_trainable(model)
    diff = nnx.to_pure_dict(diffusion)
    back = nnx.to_pure_dict(backbone)
    assert set(diff) == {"layers"} and set(diff["layers"]) == {"diff_attn"}
    assert "diff_attn" not in back["layers"]
    ar, dv = back["layers"]["attn"], diff["layers"]["diff_attn"]
    assert set(ar) == set(dv) and ar
    for name in ar:
        np.testing.assert_array_equal(np.asarray(dv[name]), np.asarray(ar[name]), err_msg=name)
    # and the AR view holds the file's weights: layer 1 q_proj, HF [out, in] vs ours [in, h, d]
    q = np.asarray(ar["q_proj"])[1]
    hf_q = state["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.reshape(q.shape[0], -1).T, hf_q)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_missing_mask_token_id_is_a_clear_error(tmp_path: Path, capsys) -> None:
    config = tiny_config()
    src = write_tiny_gguf(tmp_path / "tiny.gguf", random_hf_state(config), config, Q.Q8_0)
    dst = tmp_path / "model"
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "mask_token_id" in err and "--mask-token-id" in err, err
    assert str(src) in err, err
    assert "Traceback" not in err
    assert not dst.exists()
    assert _leftovers(tmp_path, {"tiny.gguf"}) == []


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.99])
def test_truncated_gguf_is_a_clear_error(tmp_path: Path, capsys, fraction: float) -> None:
    config = tiny_config(tie_word_embeddings=False)
    full = write_tiny_gguf(tmp_path / "full.gguf", random_hf_state(config), config, Q.Q4_1,
                           embed_qtype=Q.Q8_0)
    data = full.read_bytes()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[:int(len(data) * fraction)])
    dst = tmp_path / "model"
    assert main([str(src), str(dst), "--mask-token-id", str(MASK_ID)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(src) in err, err
    assert "Traceback" not in err
    assert not dst.exists()
    assert _leftovers(tmp_path, {"full.gguf", "cut.gguf"}) == []


def test_existing_dst_is_kept_on_error(tmp_path: Path, capsys) -> None:
    """``--force`` onto an existing DST with a bad source: error, old DST untouched."""
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "marker").write_text("old")
    src = tmp_path / "cut.gguf"
    src.write_bytes(b"GGUF" + bytes(60))
    assert main([str(src), str(dst), "--mask-token-id", "3", "--force"]) == 2
    assert str(src) in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == ["marker"]
    assert _leftovers(tmp_path, {"cut.gguf", "model"}) == []



@pytest.mark.parametrize("kind, metadata, rope", [
    ("linear", {"rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ("yarn", {"rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64,
              "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_attn_factor": 0.9},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "beta_fast": 16.0, "attention_factor": 0.9}),
])
def test_rope_scaling_metadata_is_carried_and_computed(tmp_path: Path, kind, metadata,
                                                       rope) -> None:
    config = tiny_config()
    state = random_hf_state(config, seed=9)
    extra = {"llama.rope.scaling.type": kind} | {f"llama.{k}": v for k, v in metadata.items()}
    src = write_tiny_gguf(tmp_path / "tiny.gguf", state, config, extra_metadata=extra)
    assert main([str(src), str(tmp_path / "model"), "--mask-token-id", str(MASK_ID)]) == 0
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["rope_parameters"]
    assert saved == rope | {"rope_theta": 10000.0} | (
        {"beta_slow": 1.0, "truncate": True} if kind == "yarn" else {})
    model = load_model(tmp_path / "model")
    hf = _hf_llama(dict(config, rope_parameters=dict(rope, rope_theta=10000.0)), state)
    tokens = np.random.default_rng(3).integers(0, config["vocab_size"], 200).astype(np.int32)
    logits, _ = _forward(model, jnp.asarray(tokens[None]), init_cache(model.config, 1, 200))
    assert np.abs(np.asarray(logits[0]) - _hf_logits(hf, tokens)).max() <= TOL


@pytest.mark.parametrize("metadata, needle", [
    ({"rope.scaling.type": "longrope"}, "llama.rope.scaling.type='longrope'"),
    ({"rope.scaling.type": "yarn"}, "llama.rope.scaling.factor is missing"),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
      "rope.scaling.yarn_log_multiplier": 0.1}, "llama.rope.scaling.yarn_log_multiplier"),
    ({"rope.scaling.type": "linear", "rope.scaling.factor": -2.0},
     "factor=-2.0 must be a positive finite number"),
])
def test_unsupported_rope_scaling_metadata_is_refused(tmp_path: Path, metadata, needle,
                                                      capsys) -> None:
    config = tiny_config()
    extra = {f"llama.{k}": v for k, v in metadata.items()}
    src = write_tiny_gguf(tmp_path / "tiny.gguf", random_hf_state(config), config,
                          extra_metadata=extra)
    assert main([str(src), str(tmp_path / "model"), "--mask-token-id", str(MASK_ID)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
