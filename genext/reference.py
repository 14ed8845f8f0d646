"""Plain-PyTorch references of every genext op, written for clarity and able to run in float64.

Tests compare the kernels against these (usually on float64 copies of the inputs); benchmarks
use them as the eager baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = "silu",
) -> Tensor:
    """silu(group_norm(x)) computed step by step in x's dtype (use float64 for a reference)."""
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = (xg - mean).square().mean(dim=2, keepdim=True)  # biased, as GroupNorm uses
    z = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        shape = (1, c) + (1,) * (x.dim() - 2)
        z = z * weight.to(x.dtype).reshape(shape) + bias.to(x.dtype).reshape(shape)
    return z * torch.sigmoid(z) if activation == "silu" else z


def group_norm_silu_eager(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = "silu",
) -> Tensor:
    """What users write today: ``F.silu(F.group_norm(...))`` (the eager and torch.compile baseline)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    bottom_right: bool = True,
    seqused_k: Optional[Tensor] = None,
    return_lse: bool = False,
):
    """Attention step by step in q's dtype (use float64 for a reference), on ``(B, H, L, D)``.

    k and v are ``(B, Hk, Lk, D)`` with Hk dividing Hq (query head h uses K/V head
    ``h // (Hq // Hk)``). Query i of batch b sees key j iff ``j < seqused_k[b]`` (all keys when
    seqused_k is None) and, when causal, ``j <= i + off`` with ``off = len_k - Lq`` for
    ``bottom_right`` (flash-attn's convention) or 0 (PyTorch's ``is_causal``). A query that sees
    no key gets out = 0 and lse = -inf (PyTorch's SDPA would give NaN there). The (Lq, Lk) score
    matrix is materialised: this is for tests and small benchmarks.
    """
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    lens = (torch.full((b,), lk, device=q.device) if seqused_k is None
            else seqused_k.to(device=q.device, dtype=torch.long))
    j = torch.arange(lk, device=q.device)
    i = torch.arange(lq, device=q.device)
    visible = j.view(1, 1, lk) < lens.view(b, 1, 1)                       # (B, 1, Lk)
    if causal:
        off = lens - lq if bottom_right else torch.zeros_like(lens)
        visible = visible & (j.view(1, 1, lk) <= i.view(1, lq, 1) + off.view(b, 1, 1))
    visible = visible.unsqueeze(1)                                        # (B, 1, Lq, Lk)
    s = s.masked_fill(~visible, float("-inf"))
    # shift by the row maximum (detached: the result does not depend on it), 0 for empty rows
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)                                                  # 0 where masked
    l = e.sum(dim=-1, keepdim=True)
    out = (e @ v) / torch.where(l > 0, l, torch.ones_like(l))
    if not return_lse:
        return out
    return out, (torch.log(l) + m).squeeze(-1)


def kvcache_keys(
    cache: Tensor, b: int, length: int, block_table: Optional[Tensor] = None
) -> Tensor:
    """The first ``length`` rows ``(length, Hk, D)`` of sequence b of a KV cache, gathered.

    ``cache`` is contiguous ``(B, Lmax, Hk, D)``, or with ``block_table`` a paged pool
    ``(num_blocks, block_size, Hk, D)`` in which row j of sequence b is slot ``j % block_size`` of
    block ``block_table[b, j // block_size]``.
    """
    if block_table is None:
        return cache[b, :length]
    bs = cache.shape[1]
    j = torch.arange(length, device=cache.device)
    blocks = block_table[b].to(device=cache.device, dtype=torch.long)[j // bs]
    return cache[blocks, j % bs]


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    block_table: Optional[Tensor] = None,
    return_lse: bool = False,
):
    """What ``genext.ops.attention_with_kvcache`` returns, one sequence at a time, in q's dtype.

    q ``(B, Lq, Hq, D)``; the caches contiguous or paged (see :func:`kvcache_keys`). Sequence b
    attends over its first ``cache_seqlens[b]`` cached keys followed, when k_new/v_new
    ``(B, Lq, Hk, D)`` are given, by the new ones; causal is bottom-right aligned. Unlike the op,
    this leaves the caches untouched (the new keys are concatenated, not written). Returns out
    ``(B, Lq, Hq, D)`` and, with ``return_lse``, lse ``(B, Hq, Lq)``; a query that sees no key
    gets out = 0, lse = -inf.
    """
    outs, lses = [], []
    lens = cache_seqlens.tolist()
    for b in range(q.shape[0]):
        k = kvcache_keys(k_cache, b, lens[b], block_table).to(q.dtype)
        v = kvcache_keys(v_cache, b, lens[b], block_table).to(q.dtype)
        if k_new is not None:
            k = torch.cat([k, k_new[b].to(q.dtype)])
            v = torch.cat([v, v_new[b].to(q.dtype)])
        if k.shape[0] == 0:  # nothing cached, nothing new: every query sees no key
            outs.append(torch.zeros_like(q[b : b + 1]))
            lses.append(torch.full_like(q[b : b + 1, :, :, 0].transpose(1, 2), float("-inf")))
            continue
        out, lse = attention_reference(
            q[b : b + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
            causal=causal, scale=scale, bottom_right=True, return_lse=True,
        )
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]))
    return out, lse
