"""Tests for convert.from_gguf: tiny GGUF files written with gguf.GGUFWriter, read back."""

from __future__ import annotations

import inspect
from pathlib import Path

import gguf
import numpy as np
import pytest

from convert.from_gguf import GGUFModel, main, read_gguf
from tests.convert.gguf_fixtures import (
    CHATML_TEMPLATE,
    Q,
    expected_after_roundtrip,
    gguf_tensor_name,
    llama_cpp_permute,
    random_hf_state,
    tiny_config,
    write_tiny_gguf,
)


def _read_all(model: GGUFModel) -> dict[str, np.ndarray]:
    out = {}
    for key, w in model.tensors():
        assert key not in out, key
        assert w.dtype == np.float32, key
        out[key] = w
    return out


def _load_tokenizer(model: GGUFModel, folder: Path):
    from transformers import AutoTokenizer

    folder.mkdir()
    for name, text in model.tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_f32_roundtrip_is_exact(tmp_path: Path, tied: bool) -> None:
    config = tiny_config(tie_word_embeddings=tied)
    state = random_hf_state(config, seed=1)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", state, config)

    model = read_gguf(path)
    assert model.config == config
    assert inspect.isgenerator(model.tensors())
    got = _read_all(model)
    assert set(got) == set(state)
    assert model.tensor_shapes() == {k: v.shape for k, v in got.items()}
    assert list(model.tensor_shapes()) == list(got)
    for key, w in state.items():
        np.testing.assert_array_equal(got[key], w, err_msg=key)

    # The file really holds llama.cpp's permuted rows, so the equality above proves the undo.
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    q = raw["blk.0.attn_q.weight"].data.reshape(hf_q.shape)
    assert not np.array_equal(q, hf_q)
    np.testing.assert_array_equal(q, llama_cpp_permute(hf_q, config["num_attention_heads"]))


_TOLERANCE = {Q.Q8_0: 0.01, Q.Q4_0: 0.1, Q.Q4_1: 0.1, Q.F16: 1e-3, Q.BF16: 1e-2}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_llama_quantized_roundtrip(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    config = tiny_config(tie_word_embeddings=False)
    state = random_hf_state(config, seed=2)
    embed_qtype = Q.Q8_0 if qtype not in (Q.F16, Q.BF16) else qtype
    path = write_tiny_gguf(tmp_path / "tiny.gguf", state, config, qtype, embed_qtype=embed_qtype)

    model = read_gguf(path)
    assert model.config == config
    got = _read_all(model)
    assert set(got) == set(state)
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert raw["blk.0.ffn_up.weight"].tensor_type == qtype
    assert raw["token_embd.weight"].tensor_type == embed_qtype
    for key, w in state.items():
        is_embed = key in ("model.embed_tokens.weight", "lm_head.weight")
        qt = embed_qtype if is_embed else qtype
        np.testing.assert_array_equal(got[key], expected_after_roundtrip(w, qt), err_msg=key)
        err = np.abs(got[key] - w).max() / np.abs(w).max()
        assert err <= (_TOLERANCE[qt] if w.ndim == 2 else 0.0), (key, err)
        # Equal to gguf's own dequantization of the stored (permuted) tensor.
        t = raw[gguf_tensor_name(key)]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if key.endswith("q_proj.weight"):
            stored_hf = llama_cpp_permute(got[key], config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            stored_hf = llama_cpp_permute(got[key], config["num_key_value_heads"])
        else:
            stored_hf = got[key]
        np.testing.assert_array_equal(stored_hf, stored, err_msg=key)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_f32_roundtrip_is_exact(tmp_path: Path, model_type: str) -> None:
    config = tiny_config(model_type, head_dim=32 if model_type == "qwen3" else 16)
    state = random_hf_state(config, seed=3)
    model = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", state, config, pre="qwen2"))
    assert model.config == config
    got = _read_all(model)
    assert set(got) == set(state)
    for key, w in state.items():
        np.testing.assert_array_equal(got[key], w, err_msg=key)


def test_tokenizer_roundtrip_and_chat_template(tmp_path: Path) -> None:
    config = tiny_config()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", random_hf_state(config), config)
    model = read_gguf(path)
    files = model.tokenizer_files()
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
    tok = _load_tokenizer(model, tmp_path / "tok")

    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|endoftext|>")
    assert tok.model_max_length == config["max_position_embeddings"]
    ids = tok.encode("Hello world is 42")
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", "Ġis", "Ġ", "4", "2"]
    for text in ["Hello world, the cat is 1234!", "  two  spaces\nnew\tline",
                 "Ünïcödé 中文 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert len(ids) > 0 and max(ids) < config["vocab_size"]
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user<|im_end|>")[-1] == 2

    messages = [{"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "the cat 42"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\nHello world<|im_end|>\n"
                    "<|im_start|>assistant\nthe cat 42<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == text
    plain = tok.decode(ids, skip_special_tokens=True)
    assert plain == "user\nHello world\nassistant\nthe cat 42\nassistant\n"
    assert tok.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("pre,expected", [("gpt2", ["Ġ", "42"]), ("smollm", ["Ġ", "4", "2"]),
                                          ("default", ["Ġ", "42"]), ("qwen2", ["Ġ", "4", "2"])])
def test_pre_tokenizers(tmp_path: Path, pre: str, expected: list[str]) -> None:
    config = tiny_config()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", random_hf_state(config), config, pre=pre)
    tok = _load_tokenizer(read_gguf(path), tmp_path / "tok")
    assert tok.convert_ids_to_tokens(tok.encode(" 42")) == expected
    text = "Hello world, 2024 cats\n\n  and 42!"
    assert tok.decode(tok.encode(text)) == text


def test_add_bos_token(tmp_path: Path) -> None:
    config = tiny_config()
    path = write_tiny_gguf(tmp_path / "t.gguf", random_hf_state(config), config, add_bos=True)
    tok = _load_tokenizer(read_gguf(path), tmp_path / "tok")
    assert tok.encode("Hello world") == [1, *tok.encode("Hello world", add_special_tokens=False)]
    assert tok.decode(tok.encode("Hello world"), skip_special_tokens=True) == "Hello world"


def test_no_tokenizer_metadata_gives_no_files(tmp_path: Path) -> None:
    config = tiny_config()
    path = write_tiny_gguf(tmp_path / "t.gguf", random_hf_state(config), config, tokenizer=False)
    model = read_gguf(path)
    assert model.tokenizer_files() == {}
    assert model.config["bos_token_id"] is None


def _write(tmp_path: Path, **kwargs) -> Path:
    config = kwargs.pop("config", tiny_config())
    state = kwargs.pop("state", random_hf_state(config))
    return write_tiny_gguf(tmp_path / "bad.gguf", state, config, **kwargs)


@pytest.mark.parametrize("kwargs,needles", [
    ({"arch": "mamba"}, ["general.architecture", "'mamba'"]),
    ({"pre": "tekken"}, ["tokenizer.ggml.pre", "'tekken'"]),
    ({"extra_tensors": {"blk.0.attn_sinks.weight": np.zeros(4)}}, ["'blk.0.attn_sinks.weight'"]),
    ({"extra_tensors": {"rope_freqs.weight": np.ones(8)}}, ["'rope_freqs.weight'", "llama3"]),
    ({"extra_metadata": {"llama.rope.scaling.type": "longrope"}},
     ["llama.rope.scaling.type", "'longrope'"]),
    ({"extra_metadata": {"llama.rope.scaling.factor": 4.0}}, ["llama.rope.scaling.factor", "4.0"]),
    ({"extra_metadata": {"llama.expert_count": 8}}, ["llama.expert_count", "8"]),
    ({"extra_metadata": {"llama.attention.sliding_window": 64}},
     ["llama.attention.sliding_window", "64"]),
])
def test_bad_inputs_raise_value_error(tmp_path: Path, kwargs: dict, needles: list[str]) -> None:
    path = _write(tmp_path, **kwargs)
    with pytest.raises(ValueError) as info:
        read_gguf(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_tensor_and_wrong_shape(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_hf_state(config)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight is missing"):
        read_gguf(_write(tmp_path, config=config, state=state))

    state = random_hf_state(config)
    state["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    (tmp_path / "bad.gguf").unlink()
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' has shape \[96, 64\]"):
        read_gguf(_write(tmp_path, config=config, state=state))


def test_unsupported_tensor_type_is_named(tmp_path: Path, monkeypatch) -> None:
    model = read_gguf(_write(tmp_path))

    def fake_dequantize(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr("convert.from_gguf.dequantize", fake_dequantize)
    with pytest.raises(ValueError, match=r"'token_embd\.weight'.*unsupported type F32"):
        next(model.tensors())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    assert main([str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


