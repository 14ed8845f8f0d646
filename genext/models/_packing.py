"""Sequences packed into one batch row, told apart by their position ids: the padding-free layout
of transformers' ``DataCollatorWithFlattening``, which transformers' masks detect
(``masking_utils.find_packed_sequence_indices``) when a forward gets ``position_ids`` without
an ``attention_mask`` and without a cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PositionPacking", "packing_from_positions"]


class PositionPacking(NamedTuple):
    """The sequences of a ``(B, L)`` batch: ``cu_seqlens`` int32 ``(S + 1,)`` over the
    flattened ``B * L`` tokens (every row starts a sequence), the longest sequence, and
    ``segments (B, L)`` int64, equal within a sequence of a row."""

    cu_seqlens: Tensor
    max_seqlen: int
    segments: Tensor


def packing_from_positions(position_ids: Tensor) -> PositionPacking | None:
    """A new sequence starts at every row's first token and wherever a position is not the one
    before it plus 1 (``[0, 1, 2, 0, 1]`` is two sequences, ``[5, 6, 7]`` one). None when each
    row is a single sequence (the usual, unpacked batch). ``position_ids (B, L)``."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, L), got shape {tuple(position_ids.shape)}")
    starts = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    first = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PositionPacking(cu, longest, starts.cumsum(1))
