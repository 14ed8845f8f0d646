"""An attention processor for diffusers' ``Attention`` that runs genext's flash attention
(``genext.patch``)."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.functional import scaled_dot_product_attention, sdpa_route, sdpa_with_route
from ._swap import defined_by, runs_diffusers

# an additive-mask entry at or below this hides its key: diffusers writes -10000 (bfloat16 rounds
# it to -9984), and exp(score - 9000) is 0 in float32 and float64 for any score range below ~8900
MASKED_AT_MOST = -9000.0

# the count of calls the routing rule gave PyTorch's SDPA: genext's kernel cannot run them, or
# PyTorch's kernel is the faster one at that shape (see genext.nn.functional.sdpa_backend)
_TORCH_CHOSEN = "torch: not served, or faster in PyTorch"

_SDPA_PROCESSOR = "diffusers.models.attention_processor.AttnProcessor2_0"


def attention(m: object) -> str | None:
    """For a diffusers ``Attention``: '' when its processor can be replaced by
    :class:`GenextAttnProcessor` (diffusers' ``AttnProcessor2_0``, whose computation it
    reproduces), else the reason; None for other modules."""
    if not runs_diffusers(m, "attention_processor", "Attention"):
        return None
    proc = m.processor
    if isinstance(proc, GenextAttnProcessor):
        return ""
    owner = defined_by(type(proc), "__call__")
    if owner != _SDPA_PROCESSOR:
        return f"processor {type(proc).__name__} (only AttnProcessor2_0 is reproduced)"
    return ""


def key_padding(mask: Tensor, batch: int, lk: int) -> Tensor | None:
    """Keys used per batch entry (int32, ``(B,)``) when the additive mask ``mask`` (``(B, H, Lq or
    1, Lk)``) is, in every row of a batch entry, 0 on a prefix of n >= 1 keys and at most
    MASKED_AT_MOST after it; None otherwise. Reads the mask's values (one device sync)."""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[3] != lk:
        return None
    if not mask.is_floating_point():
        return None
    first = mask[:, :1, :1, :]
    keep = first == 0
    n = keep.sum(dim=-1, keepdim=True)
    prefix = torch.arange(lk, device=mask.device) < n
    ok = (
        torch.equal(mask, first.expand_as(mask))
        and torch.equal(keep, prefix)
        and bool(((first <= MASKED_AT_MOST) | prefix).all() & (n > 0).all())
    )
    return n.reshape(batch).to(torch.int32) if ok else None


class GenextAttnProcessor:
    """Computes what diffusers' ``AttnProcessor2_0`` computes (self- and cross-attention, the
    module's ``group_norm``, ``spatial_norm``, ``norm_cross``, ``norm_q``/``norm_k``,
    ``residual_connection``, ``rescale_output_factor``, ``(B, C, H, W)`` inputs) with genext's
    :func:`~genext.nn.functional.scaled_dot_product_attention`.

    A mask that hides a tail of keys per batch entry (diffusers' padded-prompt mask, 0 then
    -10000) runs as key lengths in genext's kernel; other masks, a mask that hides every key of
    an entry, shapes or dtypes genext does not serve, and CPU shapes where PyTorch's kernel is the
    faster one (the drop-in's routing rule, asked once per call) go to PyTorch's SDPA, counted in
    ``calls`` with the reason (not under torch.compile, where masks go to PyTorch uncounted).
    ``original`` is the processor ``genext.unpatch`` sets back.
    """

    def __init__(self, original: object) -> None:
        self.original = original
        self.calls: Counter = Counter()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """SDPA of ``(B, H, L, D)`` q, k, v with diffusers' prepared ``mask``, choosing genext's
        kernel or PyTorch's once per call (and counting the choice: not compiling here)."""
        if torch.compiler.is_compiling():  # masks go to PyTorch, uncounted
            return scaled_dot_product_attention(q, k, v, attn_mask=mask)
        calls = self.calls
        if mask is not None and mask.dtype != torch.bool:
            same_device = mask.device == q.device
            lengths = key_padding(mask, q.shape[0], k.shape[2]) if same_device else None
            if lengths is None:
                calls["torch: mask is not a key-padding mask"] += 1
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            # the unmasked call's choice: a key-padding mask does not change which kernel is
            # faster (the routing rule's shapes), only whether genext's can run
            runs, _ = sdpa_route(q, k, v, None, 0.0, False, False)
            if not runs:
                calls[_TORCH_CHOSEN] += 1
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            calls["genext"] += 1
            return sdpa_with_route(True, lengths, q, k, v)
        runs, lengths = sdpa_route(q, k, v, mask, 0.0, False, False)
        calls["genext" if runs else _TORCH_CHOSEN] += 1
        return sdpa_with_route(runs, lengths, q, k, v, mask)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        # (extra positional arguments and `scale` are deprecated by diffusers and ignored there)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.dim() == 4
        if image:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, src_len = src.shape[0], src.shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, src_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # the default 1/sqrt(D) softmax scale, as AttnProcessor2_0 (which ignores attn.scale)
        out = self._attend(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
