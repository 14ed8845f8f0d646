"""KVCache: the key/value buffers, lengths and block table of a batch of sequences being generated.

One decode step is ``out = cache.attend(q, k_new, v_new)``: the new keys/values are written at
the end of each sequence and the queries attend over everything cached, in one
:func:`genext.ops.attention_with_kvcache` call, after which the lengths advance by Lq.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.attention_with_kvcache import attention_with_kvcache_unchecked

__all__ = ["KVCache"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class KVCache:
    """Key/value cache of B sequences, contiguous or paged, that grows on demand.

    Args:
        batch_size: number of sequences B.
        num_kv_heads: Hk. Queries may have any multiple of it as heads (GQA/MQA).
        head_dim: D.
        capacity: tokens each sequence can hold before the cache must grow (allocated now).
        dtype, device: of the buffers (and of q/k_new/v_new given to :meth:`attend`).
        block_size: None for a contiguous cache, ``k`` and ``v`` of shape
            ``(B, capacity, Hk, D)``; an int for a paged cache: a pool ``(num_blocks, block_size,
            Hk, D)`` and ``block_table`` int32 ``(B, max_blocks)`` (sequence b's token j lives in
            block ``block_table[b, j // block_size]``, slot ``j % block_size``). Each sequence
            owns the blocks its reservation needs, taken from the pool when it crosses into a new
            block; unused table entries hold 0 and are never read by the op.
        max_capacity: a limit on the tokens per sequence; growing past it raises a RuntimeError.
            None: no limit.
        num_blocks: paged only: the initial pool size (at least what ``capacity`` reserves for
            every sequence; more leaves blocks free for sequences that grow).
        seqlens: initial lengths (tokens already counted as cached, per sequence or one for all),
            0 by default; see :meth:`set_seqlens`.

    Attributes:
        k, v: the buffers (or pools) given to the op.
        block_table: int32 ``(B, max_blocks)`` on the device, or None for a contiguous cache.
        seqlens: int32 ``(B,)`` on the device, the cached tokens per sequence. The same tensor
            for the cache's whole life (updated in place), so a captured CUDA graph can hold it.
        lengths: the same lengths on the host (a tuple), kept in step with ``seqlens`` without
            reading the device, so whether an append fits is known without a sync.

    Growth: when an append would take a sequence past the allocated room, a contiguous cache
    reallocates ``k`` and ``v`` to at least twice the capacity (bounded by ``max_capacity``) and
    copies the cached prefix; a paged cache hands the sequence more blocks, enlarging the pool
    (copying it) and widening the block table when they run out. Growth replaces ``k``, ``v`` and
    ``block_table`` by new tensors, so it is refused (RuntimeError) while a CUDA graph is being
    captured: call :meth:`reserve` before capturing. Nothing is ever written past the room a
    sequence owns.

    CUDA graphs: a captured :meth:`attend` advances ``seqlens`` on the device at every replay but
    ``lengths`` only once, at capture; after replaying call :meth:`sync_lengths` (one device read)
    or :meth:`set_seqlens`.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device | None = None,
        block_size: int | None = None,
        max_capacity: int | None = None,
        num_blocks: int | None = None,
        seqlens: int | Sequence[int] | Tensor | None = None,
    ) -> None:
        for name, val in (
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"KVCache: capacity must be a non-negative int, got {capacity!r}")
        if dtype not in _DTYPES:
            raise TypeError(
                f"KVCache: dtype must be float16, bfloat16, float32 or float64, got {dtype}"
            )
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(
                f"KVCache: block_size must be a positive int or None, got {block_size!r}"
            )
        if max_capacity is not None and max_capacity < capacity:
            raise ValueError(
                f"KVCache: capacity ({capacity}) is past max_capacity ({max_capacity})"
            )
        if num_blocks is not None and block_size is None:
            raise ValueError("KVCache: num_blocks is for a paged cache (give block_size too)")
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_size = block_size
        self.max_capacity = max_capacity
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._lengths = [0] * batch_size
        if block_size is None:
            self.k = self._new_buffer((batch_size, capacity))
            self.v = self._new_buffer((batch_size, capacity))
            self.block_table = None
        else:
            per_seq = -(-capacity // block_size)
            pool = max(batch_size * per_seq, num_blocks or 0, 1)
            self.k = self._new_buffer((pool, block_size))
            self.v = self._new_buffer((pool, block_size))
            self._owned: list[list[int]] = [
                list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch_size)
            ]
            self._free = list(range(batch_size * per_seq, pool))
            self._table_host = torch.zeros(batch_size, max(per_seq, 1), dtype=torch.int32)
            for b, blocks in enumerate(self._owned):
                self._table_host[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            self.block_table = self._table_host.to(self.device, copy=True)
        if seqlens is not None:
            self.set_seqlens(seqlens)

    # ---- state ------------------------------------------------------------------------------

    @property
    def is_paged(self) -> bool:
        return self.block_size is not None

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    @property
    def capacity(self) -> int:
        """Tokens every sequence can hold without the cache growing."""
        if not self.is_paged:
            return self.k.shape[1]
        return min(len(blocks) for blocks in self._owned) * self.block_size

    def room(self, b: int) -> int:
        """Tokens sequence b can hold without the cache growing."""
        return len(self._owned[b]) * self.block_size if self.is_paged else self.k.shape[1]

    def __repr__(self) -> str:
        kind = (
            f"paged, block_size={self.block_size}, blocks={self.k.shape[0]}"
            if self.is_paged
            else "contiguous"
        )
        return (
            f"KVCache(B={self.batch_size}, Hk={self.num_kv_heads}, D={self.head_dim}, "
            f"capacity={self.capacity}, {kind}, {self.dtype}, {self.device}, "
            f"lengths={list(self._lengths)})"
        )

    def keys(self, b: int) -> Tensor:
        """The cached keys of sequence b, ``(lengths[b], Hk, D)`` (a copy for a paged cache)."""
        return self._gather(self.k, b)

    def values(self, b: int) -> Tensor:
        """The cached values of sequence b, ``(lengths[b], Hk, D)``."""
        return self._gather(self.v, b)

    # ---- lengths ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Every sequence back to length 0 (the memory and blocks stay allocated)."""
        self.seqlens.zero_()
        self._lengths = [0] * self.batch_size

    def set_seqlens(self, seqlens: int | Sequence[int] | Tensor) -> None:
        """Set the cached length of every sequence (e.g. to drop rejected speculative tokens, or
        after writing ``k``/``v`` directly), growing the cache if a length needs more room."""
        if isinstance(seqlens, Tensor):
            seqlens = seqlens.tolist()
        if isinstance(seqlens, int):
            seqlens = [seqlens] * self.batch_size
        lengths = [int(n) for n in seqlens]
        if len(lengths) != self.batch_size:
            raise ValueError(
                f"KVCache: {len(lengths)} lengths given for {self.batch_size} sequences"
            )
        for b, n in enumerate(lengths):
            if n < 0:
                raise ValueError(f"KVCache: the length of sequence {b} must be >= 0, got {n}")
        if _capturing(self.device):
            raise RuntimeError(
                "KVCache.set_seqlens copies host values to the device, which a CUDA "
                "graph capture cannot replay with new values; call it outside the "
                "capture (or copy_ into cache.seqlens there)"
            )
        self._ensure(lengths)
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        self._lengths = lengths

    def sync_lengths(self) -> None:
        """Read ``seqlens`` back from the device into ``lengths`` (after replaying CUDA graphs)."""
        lengths = self.seqlens.tolist()
        for b, n in enumerate(lengths):
            if not 0 <= n <= self.room(b):
                raise RuntimeError(
                    f"KVCache: the device length of sequence {b} ({n}) is outside "
                    f"[0, {self.room(b)}], the room it owns"
                )
        self._lengths = lengths

    def reserve(self, n: int) -> None:
        """Make room for n tokens in every sequence now (e.g. before capturing a CUDA graph)."""
        self._ensure([n] * self.batch_size)

    # ---- the step ---------------------------------------------------------------------------

    def prefill(self, k: Tensor, v: Tensor, lengths: Sequence[int] | Tensor | None = None) -> None:
        """Replace the cache's content: sequence b gets the first ``lengths[b]`` rows of
        ``k[b]``/``v[b]`` (``(B, L, Hk, D)``; all L rows when lengths is None)."""
        self._check_kv("k", k, None)
        self._check_kv("v", v, k.shape[1])
        if lengths is None:
            lengths = [k.shape[1]] * self.batch_size
        elif isinstance(lengths, Tensor):
            lengths = lengths.tolist()
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch_size or any(not 0 <= n <= k.shape[1] for n in lengths):
            raise ValueError(
                f"KVCache.prefill: lengths must be B = {self.batch_size} values in "
                f"[0, {k.shape[1]}], got {lengths}"
            )
        self._ensure(lengths)
        for b, n in enumerate(lengths):
            rows = self._rows(b, 0, n)
            if self.is_paged:
                self.k[rows] = k[b, :n].to(self.dtype)
                self.v[rows] = v[b, :n].to(self.dtype)
            else:
                self.k[b, :n] = k[b, :n]
                self.v[b, :n] = v[b, :n]
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        self._lengths = lengths

    def prefill_packed(self, k: Tensor, v: Tensor, cu_seqlens: Tensor | Sequence[int]) -> None:
        """Replace the cache's content from keys/values packed without padding (the layout of
        :func:`genext.ops.flash_attention_varlen`): sequence b gets rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]`` of ``k``/``v`` ``(T, Hk, D)``. ``cu_seqlens``: B + 1
        non-decreasing ints from 0 (a tensor is read on the host once). Stores a detached copy
        (the cache holds no autograd history)."""
        cu = [
            int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
        ]
        want = (self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or tuple(t.shape[1:]) != want or t.shape[0] != k.shape[0]:
                raise ValueError(
                    f"KVCache.prefill_packed: {name} must have shape (T, Hk, D) = "
                    f"({k.shape[0]}, {want[0]}, {want[1]}), got {tuple(t.shape)}"
                )
        if (
            len(cu) != self.batch_size + 1
            or cu[0] != 0
            or any(b < a for a, b in zip(cu, cu[1:]))
            or cu[-1] > k.shape[0]
        ):
            raise ValueError(
                f"KVCache.prefill_packed: cu_seqlens must be B + 1 = {self.batch_size + 1} "
                f"non-decreasing values from 0 to at most T = {k.shape[0]}, got {cu}"
            )
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        self._ensure(lengths)
        seq = torch.repeat_interleave(torch.arange(self.batch_size), torch.tensor(lengths))
        row = torch.arange(cu[-1]) - torch.tensor(cu[:-1])[seq]
        if self.is_paged:
            seq = self._table_host[seq, row // self.block_size].long()
            row = row % self.block_size
        index = (seq.to(self.device), row.to(self.device))
        with torch.no_grad():
            self.k[index] = k[: cu[-1]].to(self.dtype)
            self.v[index] = v[: cu[-1]].to(self.dtype)
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        self._lengths = lengths

    def attend(
        self,
        q: Tensor,
        k_new: Tensor,
        v_new: Tensor,
        causal: bool = True,
        scale: float | None = None,
        return_lse: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One step: append ``k_new``/``v_new`` ``(B, Lq, Hk, D)`` to every sequence, attend with
        ``q`` ``(B, Lq, Hq, D)`` over everything cached (causal: bottom-right aligned), advance
        the lengths by Lq. Returns out ``(B, Lq, Hq, D)`` (and lse ``(B, Hq, Lq)``), as
        :func:`genext.ops.attention_with_kvcache`; grows the cache first when needed."""
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[3] != self.head_dim:
            raise ValueError(
                f"KVCache.attend: q must be (B, Lq, Hq, D) with B = {self.batch_size}, "
                f"D = {self.head_dim}, got shape {tuple(q.shape)}"
            )
        lq = q.shape[1]
        self._check_kv("k_new", k_new, lq)
        self._check_kv("v_new", v_new, lq)
        self._ensure([n + lq for n in self._lengths])
        res = attention_with_kvcache_unchecked(
            q,
            self.k,
            self.v,
            self.seqlens,
            k_new,
            v_new,
            causal,
            scale,
            self.block_table,
            return_lse,
        )
        self.seqlens.add_(lq)
        self._lengths = [n + lq for n in self._lengths]
        return res

    # ---- internals --------------------------------------------------------------------------

    def _new_buffer(self, lead: tuple[int, int]) -> Tensor:
        return torch.zeros(
            *lead, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )

    def _check_kv(self, name: str, t: Tensor, length: int | None) -> None:
        want = (
            self.batch_size,
            length if length is not None else t.shape[1] if t.dim() == 4 else -1,
            self.num_kv_heads,
            self.head_dim,
        )
        if t.dim() != 4 or tuple(t.shape) != want:
            raise ValueError(
                f"KVCache: {name} must have shape (B, L, Hk, D) = {want}, got {tuple(t.shape)}"
            )

    def _rows(self, b: int, start: int, stop: int):
        """Index of rows [start, stop) of sequence b: a slice (contiguous) or (block, slot)
        index tensors (paged)."""
        if not self.is_paged:
            return slice(start, stop)
        j = torch.arange(start, stop)
        blocks = torch.tensor(self._owned[b], dtype=torch.long)[j // self.block_size]
        return blocks.to(self.device), (j % self.block_size).to(self.device)

    def _gather(self, buf: Tensor, b: int) -> Tensor:
        if not 0 <= b < self.batch_size:
            raise IndexError(f"KVCache: sequence {b} is outside [0, {self.batch_size})")
        n = self._lengths[b]
        return buf[b, :n] if not self.is_paged else buf[self._rows(b, 0, n)]

    def _ensure(self, needs: Sequence[int]) -> None:
        """Grow so that sequence b can hold needs[b] tokens (or raise)."""
        worst = max(needs, default=0)
        if self.max_capacity is not None and worst > self.max_capacity:
            b = needs.index(worst)
            raise RuntimeError(
                f"KVCache: sequence {b} would hold {worst} tokens, past max_capacity = "
                f"{self.max_capacity}"
            )
        short = [b for b, n in enumerate(needs) if n > self.room(b)]
        if not short:
            return
        if _capturing(self.device):
            raise RuntimeError(
                f"KVCache: sequence {short[0]} needs room for {needs[short[0]]} tokens but owns "
                f"{self.room(short[0])}; growing allocates new memory, which cannot happen while a "
                "CUDA graph is being captured. Call reserve(n) before the capture."
            )
        if self.is_paged:
            self._grow_paged(needs, short)
        else:
            self._grow_contiguous(worst)

    def _grow_contiguous(self, need: int) -> None:
        cap = self.k.shape[1]
        new_cap = max(need, 2 * cap)
        if self.max_capacity is not None:
            new_cap = min(new_cap, self.max_capacity)
        used = max(self._lengths, default=0)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self._new_buffer((self.batch_size, new_cap))
            new[:, :used] = old[:, :used]
            setattr(self, name, new)

    def _grow_paged(self, needs: Sequence[int], short: Sequence[int]) -> None:
        bs = self.block_size
        wanted = {b: -(-needs[b] // bs) - len(self._owned[b]) for b in short}
        missing = sum(wanted.values()) - len(self._free)
        if missing > 0:  # enlarge the pool: at least double it
            old_n = self.k.shape[0]
            new_n = max(old_n + missing, 2 * old_n)
            if self.max_capacity is not None:
                new_n = min(
                    new_n, max(old_n + missing, self.batch_size * -(-self.max_capacity // bs))
                )
            for name in ("k", "v"):
                old = getattr(self, name)
                new = self._new_buffer((new_n, bs))
                new[:old_n] = old
                setattr(self, name, new)
            self._free.extend(range(old_n, new_n))
        for b, count in wanted.items():
            self._owned[b].extend(self._free[:count])
            del self._free[:count]
        width = max(len(blocks) for blocks in self._owned)
        if width > self._table_host.shape[1]:  # widen the table: at least double it
            new_w = max(width, 2 * self._table_host.shape[1])
            if self.max_capacity is not None:
                new_w = min(new_w, max(width, -(-self.max_capacity // bs)))
            table = torch.zeros(self.batch_size, new_w, dtype=torch.int32)
            table[:, : self._table_host.shape[1]] = self._table_host
            self._table_host = table
        for b in short:
            self._table_host[b, : len(self._owned[b])] = torch.tensor(
                self._owned[b], dtype=torch.int32
            )
        if self.block_table.shape == self._table_host.shape:
            self.block_table.copy_(self._table_host)
        else:
            self.block_table = self._table_host.to(self.device, copy=True)
