"""Rotary position embeddings: the frequencies of each RoPE type and the tables of a pass.

A config's RoPE is its base ``rope_theta`` and, optionally, a :class:`RopeScaling` that
stretches the frequencies past the pre-training window, as Hugging Face transformers
computes them:

- ``linear``: every inverse frequency divided by ``factor``;
- ``llama3``: wavelengths longer than ``original_max_position_embeddings / low_freq_factor``
  divided by ``factor``, shorter than ``... / high_freq_factor`` kept, a smooth blend
  between the two;
- ``yarn``: per frequency, a ramp between interpolation (divided by ``factor``) and
  extrapolation (kept) over the dimensions that turn between ``beta_slow`` and
  ``beta_fast`` times in the original window; ``cos`` and ``sin`` multiplied by the
  attention factor (default ``0.1 ln(factor) + 1``, or the ratio of the two ``mscale``
  terms when ``mscale`` and ``mscale_all_dim`` are both given).

The frequencies are host constants (numpy, float32, from the static config), so a pass
computes only ``positions * inv_freq`` and its ``cos``/``sin``, once for all layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# The scaled RoPE types this implementation computes (``default`` is no scaling).
ROPE_TYPES = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One scaled RoPE: ``rope_type`` (one of :data:`ROPE_TYPES`) and its parameters.

    ``original_max_position_embeddings`` is the pre-training window (``llama3``, ``yarn``);
    ``attention_factor`` ``None`` means the YaRN default; ``low_freq_factor`` and
    ``high_freq_factor`` are ``llama3``'s, the rest ``yarn``'s.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: choose one of {list(ROPE_TYPES)}")
        numbers = {"factor": self.factor, "beta_fast": self.beta_fast,
                   "beta_slow": self.beta_slow, "attention_factor": self.attention_factor,
                   "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
                   "low_freq_factor": self.low_freq_factor,
                   "high_freq_factor": self.high_freq_factor}
        for name, value in numbers.items():
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ValueError(f"{name}={value!r:.60} must be a positive finite number")
        window = self.original_max_position_embeddings
        if self.rope_type in ("llama3", "yarn") and (
                isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"original_max_position_embeddings={window!r:.60} must be a "
                             f"positive integer for rope_type={self.rope_type!r}")
        if self.rope_type == "llama3":
            low, high = self.low_freq_factor, self.high_freq_factor
            if low is None or high is None:
                raise ValueError("rope_type='llama3' needs low_freq_factor and high_freq_factor")
            if not low < high:
                raise ValueError(f"low_freq_factor={low} must be below high_freq_factor={high}")
        if not isinstance(self.truncate, bool):
            raise ValueError(f"truncate={self.truncate!r:.60} must be true or false")

    def cos_sin_factor(self) -> float:
        """What ``cos`` and ``sin`` are multiplied by (YaRN's attention factor; 1 otherwise)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor,
                                                                        self.mscale_all_dim)
        return _yarn_mscale(self.factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
    """The ``[head_dim / 2]`` float32 inverse frequencies of RoPE with base ``theta``."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    base = np.float32(theta) ** exponents  # as transformers: float32 powers
    inv_freq = (np.float32(1.0) / base).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return _yarn(base, head_dim, theta, scaling)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    window = float(s.original_max_position_embeddings)
    low_wavelen = window / s.low_freq_factor
    high_wavelen = window / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    factor = np.float32(s.factor)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (window / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(base: np.ndarray, head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    window = s.original_max_position_embeddings
    if not theta > 1:
        raise ValueError(f"rope_theta={theta} must exceed 1 for rope_type='yarn'")

    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns ``rotations`` times over the window."""
        return head_dim * math.log(window / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)  # 1: keep the frequency, 0: divide it
    inv_extra = np.float32(1.0) / base
    inv_inter = np.float32(1.0) / (np.float32(s.factor) * base)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """The RoPE ``(cos, sin)`` tables of ``positions [B, T]``, each ``[B, T, 1, head_dim / 2]``
    float32 (YaRN's attention factor included): computed once per pass and shared by every
    layer's queries and keys."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta, scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim / 2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    factor = 1.0 if scaling is None else scaling.cos_sin_factor()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos[:, :, None, :], sin[:, :, None, :]


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """HF "rotate half" RoPE of ``x [B, T, H, D]`` with :func:`rope_tables` of its positions."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
