"""Attention of a few new queries over a KV cache, with the new keys/values appended in the same op.

The decode step of generation (Lq = 1) and its small multi-token variants (speculative decoding,
chunked prefill, Lq up to 16 or so). The CUDA kernels split the cache length over thread blocks
("flash-decoding") so that one sequence still reads its cache with the whole GPU; the CPU kernel is
parallel over batch x KV heads (and over key ranges when that leaves cores idle). Both read each
K/V head once for its whole group of query heads (GQA/MQA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    acc_dtype,
    check_heads,
    check_same_device,
    check_type,
    check_value,
    declare_kernels,
    softmax_scale,
)

__all__ = ["attention_with_kvcache"]

declare_kernels(
    ["attention_with_kvcache"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)

_OP = "attention_with_kvcache"


def _must_not_sync(t: Tensor) -> bool:
    """True where reading device values on the host is not allowed: while tracing for
    torch.compile, or while a CUDA graph is being captured on the current stream."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate_values(
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    added: int,
    capacity: int,
    num_blocks: int,
    block_size: int,
) -> None:
    """Lengths within the capacity and the blocks each sequence uses inside the pool, with one
    device-to-host copy of B rows (sequence length, first bad block column or -1, its value)."""
    lens = cache_seqlens.to(torch.int64)
    if block_table is not None and block_table.numel() > 0:
        bt = block_table.to(device=lens.device, dtype=torch.int64)
        n_used = ((lens + added).clamp(0, capacity) + block_size - 1) // block_size
        used = torch.arange(bt.shape[1], device=bt.device)[None] < n_used[:, None]
        bad = used & ((bt < 0) | (bt >= num_blocks))
        col = torch.where(bad.any(1), bad.to(torch.int64).argmax(1), torch.full_like(lens, -1))
        val = bt.gather(1, col.clamp(min=0)[:, None])[:, 0]
        rows = torch.stack([lens, col, val], 1).tolist()
    else:
        rows = [[n, -1, 0] for n in lens.tolist()]
    for b, (n, col, val) in enumerate(rows):
        if n < 0:
            raise ValueError(f"{_OP}: cache_seqlens[{b}] = {n} is negative")
        if n + added > capacity:
            new = f" plus Lq = {added} new" if added else ""
            where = "max_blocks * block_size" if block_table is not None else "k_cache.shape[1]"
            raise ValueError(
                f"{_OP}: sequence {b} would hold {n + added} tokens (cache_seqlens[{b}] = {n}{new}), "
                f"past the cache capacity of {capacity} ({where})"
            )
        if col >= 0:
            raise ValueError(
                f"{_OP}: block_table[{b}, {col}] = {val} is outside the pool of {num_blocks} blocks "
                f"(sequence {b} uses its first {-(-(n + added) // block_size)} entries)"
            )


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | int,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_table: Tensor | None = None,
    return_lse: bool = False,
    *,
    check_values: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q over a KV cache, appending k_new/v_new to the cache first.

    Args:
        q: ``(B, Lq, Hq, D)``, the new queries of each sequence (Lq = 1 for a decode step).
        k_cache, v_cache: ``(B, Lmax, Hk, D)`` (contiguous cache), or with ``block_table`` a
            paged pool ``(num_blocks, block_size, Hk, D)``. Last dim contiguous, other strides
            free. Hk must divide Hq: query head h uses K/V head ``h // (Hq // Hk)``.
        cache_seqlens: int32 ``(B,)`` on q's device, the tokens already cached per sequence (an
            int means the same length for every sequence). The op never changes it: advance it
            yourself (``genext.KVCache`` does) after a step that appended.
        k_new, v_new: ``(B, Lq, Hk, D)`` or None. When given they are written into the caches at
            positions ``[cache_seqlens[b], cache_seqlens[b] + Lq)`` (k_cache and v_cache are
            modified in place), and the queries attend over those ``cache_seqlens[b] + Lq`` keys.
            Without them the queries attend over the first ``cache_seqlens[b]`` keys.
        causal: query i sees key j iff ``j <= len_k - Lq + i`` (bottom-right aligned: the new
            queries are the last Lq positions of the sequence), as flash-attn's
            ``flash_attn_with_kvcache``. A query that sees no key gets a zero output.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        block_table: int32 ``(B, max_blocks)`` for a paged cache: key j of sequence b is slot
            ``j % block_size`` of block ``block_table[b, j // block_size]``. Only the first
            ``ceil(len_k / block_size)`` entries of a row are read.
        return_lse: also return the log-sum-exp of the scaled scores, ``(B, Hq, Lq)`` float32
            (float64 for float64 inputs), ``-inf`` for a query that sees no key.

    Returns:
        out ``(B, Lq, Hq, D)`` contiguous in q's dtype, and lse when ``return_lse``.

        check_values: read cache_seqlens and block_table on the host and check them (below).
            False skips that, and its device sync on CUDA (benchmarks, decode loops whose lengths
            are known to be valid, e.g. :class:`genext.KVCache`).

    Checks: every length must fit (``cache_seqlens[b] (+ Lq) <= capacity``, with capacity
    ``Lmax`` or ``max_blocks * block_size``) and every block a sequence uses must be in the pool;
    otherwise a ValueError names the sequence and the value. These checks read the lengths and
    the block table on the host (a few small reductions and one copy of B rows, so a device sync
    on CUDA); they are skipped while torch.compile traces and while a CUDA graph is captured,
    where a sync is not allowed, and with ``check_values=False``. On the CPU the kernel makes
    them itself, with the same messages, before it writes anything (always, since reading the
    values costs it nothing). The CUDA kernels never touch memory past the capacity or outside the pool, but their
    results for invalid lengths or block indices are undefined.

    Inference only: no gradient flows through this op (as with flash-attn's
    ``flash_attn_with_kvcache``). It runs as under ``torch.no_grad()``, so it may be called on
    tensors that require grad, and its outputs never do. Use :func:`genext.ops.flash_attention`
    for training.

    Devices and dtypes: CUDA float16/bfloat16 (split-KV kernels), CUDA float32; CPU float32,
    float64, float16 and bfloat16 (the 16-bit types computed in float32).
    """
    if q.dim() != 4:  # before q's sizes are read below
        raise ValueError(f"{_OP}: q must be 4-D (B, Lq, Hq, D), got shape {tuple(q.shape)}")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= 2**31 - 1:
            raise ValueError(
                f"{_OP}: cache_seqlens must be in [0, 2**31 - 1] (lengths are int32), "
                f"got {cache_seqlens}"
            )
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        got = (
            cache_seqlens.dtype
            if isinstance(cache_seqlens, Tensor)
            else type(cache_seqlens).__name__
        )
        raise TypeError(f"{_OP}: cache_seqlens must be an int32 tensor (B,), got {got}")
    if not q.is_cpu:
        # The CPU op makes the same checks itself (kvcache_checks.h; worded a little differently)
        # at no cost; elsewhere they are made here, before the values are read on the host.
        _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
        added = q.shape[1] if k_new is not None else 0
        # values are read only where they are on q's device (else the op raises its device
        # error) and exist (meta tensors: the fake kernel checks shapes only)
        if (
            check_values
            and not _must_not_sync(q)
            and cache_seqlens.device == q.device
            and (block_table is None or block_table.device == q.device)
            and q.device.type != "meta"
        ):
            if block_table is not None:
                capacity = block_table.shape[1] * k_cache.shape[1]
                num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
            else:
                capacity, num_blocks, block_size = k_cache.shape[1], 0, 1
            _validate_values(cache_seqlens, block_table, added, capacity, num_blocks, block_size)
    return attention_with_kvcache_unchecked(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, block_table, return_lse
    )


def _any_requires_grad(q, k_cache, v_cache, k_new, v_new) -> bool:
    # spelled out: a generator over the five costs a decode step about half a microsecond
    return (
        q.requires_grad
        or k_cache.requires_grad
        or v_cache.requires_grad
        or (k_new is not None and k_new.requires_grad)
        or (v_new is not None and v_new.requires_grad)
    )


def attention_with_kvcache_unchecked(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, block_table, return_lse
):
    """The op alone, without the Python-side argument and value checks above, for callers that own
    their tensors and lengths (:class:`genext.nn.KVCache`); the C++ checks still run."""
    scale = softmax_scale(q, scale, _OP)
    args = (q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, bool(causal))
    if torch.is_grad_enabled() and _any_requires_grad(q, k_cache, v_cache, k_new, v_new):
        with torch.no_grad():  # entering it costs microseconds a decode step need not pay
            out, lse = torch.ops.genext.attention_with_kvcache.default(*args)
    else:
        out, lse = torch.ops.genext.attention_with_kvcache.default(*args)
    return (out, lse) if return_lse else out


def _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table) -> None:
    """The shape checks of the op's C++ binding (q's rank aside, checked first), in Python, for
    devices whose values are read here before the op runs."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            want = "num_blocks, block_size, Hk, D" if block_table is not None else "B, Lmax, Hk, D"
            raise ValueError(f"{_OP}: {name} must be 4-D ({want}), got shape {tuple(t.shape)}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_OP}: k_new and v_new come together (got only one of them)")
    if cache_seqlens.shape != (q.shape[0],):
        raise ValueError(
            f"{_OP}: cache_seqlens must have shape (B,) = ({q.shape[0]},), "
            f"got {tuple(cache_seqlens.shape)}"
        )
    if block_table is not None:
        if block_table.dtype != torch.int32:
            raise TypeError(f"{_OP}: block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
            raise ValueError(
                f"{_OP}: block_table must have shape (B, max_blocks) with B = "
                f"{q.shape[0]}, got {tuple(block_table.shape)}"
            )
        if k_cache.shape[1] == 0:
            raise ValueError(
                f"{_OP}: a paged cache needs a positive block size (k_cache.size(1)), got shape "
                f"{list(k_cache.shape)}"
            )


# ---- torch.library registrations ------------------------------------------------------------------


def _check_last_dim(name: str, t: Tensor) -> None:
    check_value(
        t.shape[-1] <= 1 or t.stride(-1) == 1,
        lambda: f"{_OP}: {name} must have a contiguous last dim, got strides {list(t.stride())}",
    )


def _check_problem(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table) -> None:
    """The checks of csrc/kvcache_attention/kvcache_checks.h (check_problem) and of the CUDA
    binding, with the same exception types and messages, for the fake kernel: it runs for meta and
    fake tensors, and for a meta tensor beside real ones (which must raise, as the real kernel
    would, not return an uninitialised result)."""
    dev = q.device.type
    on_cuda = dev == "cuda"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + (() if on_cuda else (torch.float64,))
    check_type(
        q.dtype in dtypes,
        lambda: (
            f"{_OP}: q must be float16, bfloat16, float32{'' if on_cuda else ' or float64'} "
            f"on {dev}, got {q.dtype}"
        ),
    )
    check_type(
        k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
        lambda: (
            f"{_OP}: q, k_cache and v_cache must share a dtype, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        ),
    )
    check_same_device(
        _OP,
        "q",
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens},
    )
    check_value(
        q.dim() == 4, lambda: f"{_OP}: q must be 4-D (B, Lq, Hq, D), got shape {list(q.shape)}"
    )
    check_value(
        k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
        lambda: (
            f"{_OP}: k_cache and v_cache must have one 4-D shape, got {list(k_cache.shape)} "
            f"and {list(v_cache.shape)}"
        ),
    )
    b, lq, hq, d = q.shape
    hk = k_cache.shape[2]
    check_value(
        k_cache.shape[3] == d,
        lambda: f"{_OP}: q and the caches must share the head dim, got {d} and {k_cache.shape[3]}",
    )
    check_heads(_OP, hq, hk, d, on_cuda)
    _check_last_dim("q", q)
    _check_last_dim("k_cache", k_cache)
    _check_last_dim("v_cache", v_cache)
    check_type(
        cache_seqlens.dtype == torch.int32,
        lambda: f"{_OP}: cache_seqlens must be int32, got {cache_seqlens.dtype}",
    )
    check_value(
        cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == b,
        lambda: (
            f"{_OP}: cache_seqlens must have shape (B,) = ({b},), got {list(cache_seqlens.shape)}"
        ),
    )
    if block_table is not None:
        check_type(
            block_table.dtype == torch.int32,
            lambda: f"{_OP}: block_table must be int32, got {block_table.dtype}",
        )
        check_same_device(_OP, "q", {"q": q, "block_table": block_table})
        check_value(
            block_table.dim() == 2 and block_table.shape[0] == b,
            lambda: (
                f"{_OP}: block_table must have shape (B, max_blocks) with B = {b}, got "
                f"{list(block_table.shape)}"
            ),
        )
        check_value(
            k_cache.shape[1] > 0,
            lambda: (
                f"{_OP}: a paged cache needs a positive block size (k_cache.size(1)), got "
                f"shape {list(k_cache.shape)}"
            ),
        )
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        check_value(
            k_cache.shape[0] == b,
            lambda: (
                f"{_OP}: a contiguous cache must have shape (B, Lmax, Hk, D) with B = {b}, "
                f"got {list(k_cache.shape)} (pass block_table for a paged cache)"
            ),
        )
        capacity = k_cache.shape[1]
    check_value((k_new is None) == (v_new is None), lambda: f"{_OP}: k_new and v_new come together")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_type(
                t.dtype == q.dtype,
                lambda name=name, t=t: (
                    f"{_OP}: {name} must have q's dtype {q.dtype}, got {t.dtype}"
                ),
            )
            check_same_device(_OP, "q", {"q": q, name: t})
            check_value(
                t.dim() == 4 and t.shape == (b, lq, hk, d),
                lambda name=name, t=t: (
                    f"{_OP}: {name} must have shape (B, Lq, Hk, D) = ({b}, {lq}, {hk}, {d}), "
                    f"got {list(t.shape)}"
                ),
            )
            _check_last_dim(name, t)
    if on_cuda:
        check_value(
            capacity < 2**31 and b < 65536,
            lambda: f"{_OP}: cache capacity must be below 2^31 keys and the batch below 65536",
        )


@torch.library.register_fake("genext::attention_with_kvcache")
def _fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, causal):
    _check_problem(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    b, lq, hq, d = q.shape
    out = q.new_empty((b, lq, hq, d))
    lse = q.new_empty((b, hq, lq), dtype=acc_dtype(q))
    return out, lse
