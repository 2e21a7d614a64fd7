"""Synthetic Qwen3-shaped HF checkpoints (random bf16, with ``*_diff`` tensors) and peak
resident memory of a command run in a child process (``os.wait4``'s ``ru_maxrss``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

# About 1.1 GB of bf16 weights: 8 layers of Qwen3 width 2048 (diffusion tensors included)
# and a 32768-row tied embedding.
LARGE = dict(vocab_size=32768, hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128)
# The same architecture and layer count at a negligible size: the runtime's baseline.
SMALL = dict(LARGE, vocab_size=512, hidden_size=64, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def hf_config(**shape) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "eos_token_id": 1, "bos_token_id": 0,
            "block_size": 4, "mask_token_id": 2, **shape}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F)}
        for sfx in ("", "_diff"):
            a = p + "self_attn."
            out |= {a + f"q_proj{sfx}.weight": (q, D), a + f"k_proj{sfx}.weight": (kv, D),
                    a + f"v_proj{sfx}.weight": (kv, D), a + f"o_proj{sfx}.weight": (D, q),
                    a + f"q_norm{sfx}.weight": (c["head_dim"],),
                    a + f"k_norm{sfx}.weight": (c["head_dim"],)}
    return out


def write_checkpoint(directory: Path, shape: dict, seed: int = 0) -> int:
    """An HF checkpoint folder (config.json, model.safetensors) of random bf16 weights;
    returns the tensors' bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(**shape)
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, s in tensor_shapes(config).items():
        if len(s) == 1:
            tensors[key] = np.ones(s, ml_dtypes.bfloat16)
        else:
            w = rng.standard_normal(s, np.float32) * s[-1] ** -0.5
            tensors[key] = w.astype(ml_dtypes.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"))
    return sum(t.nbytes for t in tensors.values())


# Runs a module as ``python -m`` would and records the peak resident memory of this
# process image (``VmHWM``: unlike ``ru_maxrss``, it starts afresh at exec, so the parent's
# size at fork does not count) into the file named by ``ORTHRUS_PEAK_FILE`` at exit.
_RUNNER = """
import atexit, os, runpy, sys
def _record():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["ORTHRUS_PEAK_FILE"], "w").write(line.split()[1])
atexit.register(_record)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def peak_rss(module: str, args: list[str], cwd: str | Path | None = None) -> tuple[int, str]:
    """Run ``python -m module args...`` in a child process; return its peak resident
    memory in bytes and its output."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                   ORTHRUS_PEAK_FILE=peak.name)
        env.pop("XLA_FLAGS", None)  # one device, as a user runs it
        proc = subprocess.run([sys.executable, "-c", _RUNNER, module, *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"python -m {module} {' '.join(args)} failed "
                                 f"({proc.returncode}):\n{proc.stdout}")
        return int(peak.read()) * 1024, proc.stdout
