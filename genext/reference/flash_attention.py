"""Attention step by step in plain PyTorch: the reference of ``genext.ops.flash_attention``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_reference"]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    bottom_right: bool = True,
    seqused_k: Tensor | None = None,
    return_lse: bool = False,
):
    """Attention step by step in q's dtype (use float64 for a reference), on ``(B, H, L, D)``.

    k and v are ``(B, Hk, Lk, D)`` with Hk dividing Hq (query head h uses K/V head
    ``h // (Hq // Hk)``). Query i of batch b sees key j iff ``j < seqused_k[b]`` (all keys when
    seqused_k is None) and, when causal, ``j <= i + off`` with ``off = len_k - Lq`` for
    ``bottom_right`` (flash-attn's convention) or 0 (PyTorch's ``is_causal``). A query that sees
    no key gets out = 0 and lse = -inf (PyTorch's SDPA would give NaN there); NaN scores give NaN
    rows (masked keys do not count, as in the kernels), and so does an infinite or NaN scale. The
    (Lq, Lk) score matrix is materialised: this is for tests and small benchmarks.
    """
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    finite_scale = math.isfinite(scale)
    s = (q @ k.transpose(-1, -2)) * (scale if finite_scale else 1.0)
    lens = (
        torch.full((b,), lk, device=q.device)
        if seqused_k is None
        else seqused_k.to(device=q.device, dtype=torch.long)
    )
    j = torch.arange(lk, device=q.device)
    i = torch.arange(lq, device=q.device)
    visible = j.view(1, 1, lk) < lens.view(b, 1, 1)  # (B, 1, Lk)
    if causal:
        off = lens - lq if bottom_right else torch.zeros_like(lens)
        visible = visible & (j.view(1, 1, lk) <= i.view(1, lq, 1) + off.view(b, 1, 1))
    visible = visible.unsqueeze(1)  # (B, 1, Lq, Lk)
    if not finite_scale:  # an infinite or NaN scale: NaN for every row that sees a key
        s = s + float("nan")  # (added, not multiplied: rows that see no key keep a 0 gradient)
    s = s.masked_fill(~visible, float("-inf"))
    # shift by the row maximum (detached: the result does not depend on it), 0 for empty rows; a
    # NaN or +inf maximum stays, so that NaN reaches every weight of the row, as in PyTorch's SDPA
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m).masked_fill(~visible, 0.0)  # 0 where masked, even when m is NaN
    denom = e.sum(dim=-1, keepdim=True)
    # weights exactly 0 where masked, also in a NaN row (whose denom is NaN), so that a masked
    # key gets no NaN gradient through them; a NaN score leaves the row's weights, output and
    # gradients NaN, as PyTorch's SDPA gives
    p = (e / torch.where(denom == 0, torch.ones_like(denom), denom)).masked_fill(~visible, 0.0)
    # a row that sees no key (or only -inf scores) is 0, with zero gradients, even where v holds
    # NaN or inf: its weights are detached (else 0 * NaN in p @ v's backward) and its output
    # replaced (else 0 * NaN in the product)
    empty = denom == 0
    p = torch.where(empty, p.detach(), p)
    out = torch.where(empty, 0.0, p @ v)
    if not return_lse:
        return out
    return out, (torch.log(denom) + m).squeeze(-1)
