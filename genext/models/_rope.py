"""Rotary position embeddings with the frequency schedules transformers offers for Llama-family
models (``rope_parameters["rope_type"]``): ``default``, ``linear``, ``dynamic`` (NTK-aware),
``yarn``, ``longrope`` and ``llama3``.

The inverse frequencies are computed in float32 with the same operations, in the same order, as
transformers' ``ROPE_INIT_FUNCTIONS``, and cos/sin as its rotary embedding does (float32 angles,
times the attention factor, cast to the activations' dtype), so a float64 model rotates by the
same float32-rounded angles as transformers' float64 model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ROPE_TYPES", "RotaryEmbedding", "apply_rotary", "rope_inv_freq", "standardize_rope"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# what each type must find in its parameters (transformers' validation asks for the same keys)
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def standardize_rope(
    rope_parameters: Mapping[str, Any] | None,
    rope_scaling: Mapping[str, Any] | None,
    rope_theta: float | None,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """One flat dict of rope parameters from either layout transformers reads: 5.x's
    ``rope_parameters`` (with ``rope_theta`` and ``rope_type`` inside) or 4.x's ``rope_scaling``
    (``type`` or ``rope_type``) beside a top-level ``rope_theta``. Fills the defaults transformers
    fills: theta 10000, type ``default``, and ``original_max_position_embeddings`` =
    ``max_position_embeddings`` for the types that use it. Raises ValueError for an unknown type,
    a missing field, or a partial rotary factor (Llama rotates the whole head)."""
    params = dict(rope_parameters or rope_scaling or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    theta = rope_theta if rope_theta is not None else 10000.0
    params.setdefault("rope_theta", theta)
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_parameters: rope_type must be one of {ROPE_TYPES} for a Llama-family model, "
            f"got {kind!r}"
        )
    missing = [k for k in _REQUIRED[kind] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_parameters: rope_type {kind!r} needs {missing}")
    if kind in ("yarn", "longrope", "llama3"):
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            "rope_parameters: partial_rotary_factor must be 1.0 for a Llama-family model (its "
            f"attention rotates the whole head), got {params['partial_rotary_factor']}"
        )
    return params


def _arange_ratio(dim: int, device=None) -> Tensor:
    """``[0, 2, 4, ...] / dim`` in float32, as transformers builds the exponents."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def _dynamic_inv_freq(params: Mapping[str, Any], dim: int, mpe: int, seq_len: int) -> Tensor:
    # transformers recomputes with seq_len as a 0-dim int64 tensor (max position + 1), so the new
    # base is a float32 tensor: the same here, for the same rounding
    base, factor = params["rope_theta"], params["factor"]
    n = torch.maximum(torch.tensor(seq_len), torch.tensor(mpe))
    base = base * ((factor * n / mpe) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _arange_ratio(dim))


def rope_inv_freq(
    params: Mapping[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """The inverse frequencies ``(head_dim // 2,)`` float32 and the attention factor (the scale
    of cos and sin) of a standardized rope parameter dict.

    ``seq_len`` (the largest position + 1 of the batch) matters for two types, as at
    transformers' forward: ``dynamic`` raises the base once it exceeds
    ``max_position_embeddings``; ``longrope`` takes ``long_factor`` once it exceeds
    ``original_max_position_embeddings`` (``short_factor`` otherwise, and when None)."""
    kind, base, dim = params["rope_type"], params["rope_theta"], head_dim
    mpe = max_position_embeddings
    if kind == "default":
        return 1.0 / (base ** _arange_ratio(dim)), 1.0
    if kind == "linear":
        return 1.0 / (base ** _arange_ratio(dim)) / params["factor"], 1.0
    if kind == "dynamic":
        if seq_len is not None and seq_len > mpe:
            return _dynamic_inv_freq(params, dim, mpe, seq_len), 1.0
        factor = params["factor"]
        base = base * ((factor * mpe / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** _arange_ratio(dim)), 1.0
    orig = params["original_max_position_embeddings"]
    if kind == "yarn":
        return _yarn(params, dim, mpe, orig)
    if kind == "longrope":
        factor = params.get("factor")
        if factor is None:
            factor = mpe / orig
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        long = seq_len is not None and seq_len > orig
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
        if ext.shape != (dim // 2,):
            raise ValueError(
                f"rope_parameters: longrope's factors must have head_dim // 2 = {dim // 2} "
                f"entries, got {tuple(ext.shape)}"
            )
        return 1.0 / (ext * base ** _arange_ratio(dim)), attention
    # llama3: long wavelengths divided by factor, short ones kept, a smooth ramp between
    inv = 1.0 / (base ** _arange_ratio(dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(params: Mapping[str, Any], dim: int, mpe: int, orig: int) -> tuple[Tensor, float]:
    base = params["rope_theta"]
    factor = params["factor"]
    if factor is None:
        factor = mpe / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (
            float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
        )
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency (high frequencies), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotary angles for given positions.

    ``inv_freq`` is a non-persistent buffer (not in the ``state_dict``, as in transformers), so it
    follows ``.to(device)``; it is read back as float32 whatever the model's dtype.
    """

    def __init__(self, params: Mapping[str, Any], head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.params = dict(params)
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_scaling = rope_inv_freq(params, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the frequencies stay float32 when the model moves to another dtype (bfloat16 would
        # round the angles of every position by up to 2^-8 of their size)
        if self.inv_freq.dtype != torch.float32:
            inv_freq, _ = rope_inv_freq(self.params, self.head_dim, self.max_position_embeddings)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @property
    def depends_on_length(self) -> bool:
        """True for the types whose frequencies change with the batch's largest position
        (``dynamic``, ``longrope``): they need that position on the host at every call."""
        return self.params["rope_type"] in ("dynamic", "longrope")

    def frequencies(self, seq_len: int | None) -> tuple[Tensor, float]:
        if not self.depends_on_length or seq_len is None:
            return self.inv_freq.float(), self.attention_scaling
        inv, scale = rope_inv_freq(
            self.params, self.head_dim, self.max_position_embeddings, seq_len
        )
        if self.params["rope_type"] == "dynamic":
            scale = self.attention_scaling
        return inv.to(self.inv_freq.device), scale

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype, seq_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """cos, sin ``(*position_ids.shape, head_dim)`` in ``dtype``. ``seq_len``: the largest
        position + 1 the batch holds (computed from ``position_ids`` when None and the type
        needs it)."""
        if self.depends_on_length and seq_len is None:
            seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
        inv_freq, scale = self.frequencies(seq_len)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates ``x`` ``(..., L, H, D)`` by the angles of ``cos``/``sin`` ``(..., L, D)``: the
    halves ``(x1, x2)`` of the head become ``(x1 cos - x2 sin, x2 cos + x1 sin)``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
