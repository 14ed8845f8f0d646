"""Attention over a KV cache, one sequence at a time, in plain PyTorch: the reference of
``genext.ops.attention_with_kvcache``."""

from __future__ import annotations

import torch
from torch import Tensor

from .flash_attention import attention_reference

__all__ = ["attention_with_kvcache", "kvcache_keys"]


def kvcache_keys(cache: Tensor, b: int, length: int, block_table: Tensor | None = None) -> Tensor:
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
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_table: Tensor | None = None,
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
            q[b : b + 1].transpose(1, 2),
            k[None].transpose(1, 2),
            v[None].transpose(1, 2),
            causal=causal,
            scale=scale,
            bottom_right=True,
            return_lse=True,
        )
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]))
    return out, lse
