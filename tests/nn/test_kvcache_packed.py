"""KVCache.prefill_packed: a cache filled from keys/values packed without padding (the varlen
layout a packed prefill produces) holds what prefill would."""

from __future__ import annotations

import pytest
import torch

from genext.nn import KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [None, 1, 2, 5])
def test_prefill_packed_matches_prefill(block_size, dtype):
    k = torch.randn(10, 2, 4, dtype=dtype)
    v = torch.randn(10, 2, 4, dtype=dtype)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty sequence in the middle
    # capacity 2: sequence 2's 7 rows make the cache grow first
    a = KVCache(3, 2, 4, 2, dtype=dtype, block_size=block_size)
    a.prefill_packed(k, v, cu)
    assert a.lengths == (3, 0, 7) and a.seqlens.tolist() == [3, 0, 7]
    padded_k = torch.zeros(3, 7, 2, 4, dtype=dtype)
    padded_v = torch.zeros(3, 7, 2, 4, dtype=dtype)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert torch.equal(a.keys(b), k[s:e]) and torch.equal(a.values(b), v[s:e])
        padded_k[b, : e - s], padded_v[b, : e - s] = k[s:e], v[s:e]
    ref = KVCache(3, 2, 4, 2, dtype=dtype, block_size=block_size)
    ref.prefill(padded_k, padded_v, [3, 0, 7])
    # the next step attends the same way from both
    q, kn, vn = (torch.randn(3, 1, 4 if i == 0 else 2, 4, dtype=dtype) for i in range(3))
    assert torch.equal(a.attend(q, kn, vn), ref.attend(q, kn, vn))


def test_prefill_packed_detaches_and_checks():
    k = torch.randn(5, 2, 4, requires_grad=True)
    cache = KVCache(2, 2, 4, 8, dtype=torch.float32)
    cache.prefill_packed(k, k * 2, [0, 2, 5])
    assert not cache.k.requires_grad and not cache.v.requires_grad
    with pytest.raises(ValueError, match="cu_seqlens"):
        cache.prefill_packed(k, k, [0, 3, 6])  # past the 5 rows
    with pytest.raises(ValueError, match="cu_seqlens"):
        cache.prefill_packed(k, k, [0, 3, 2])  # decreasing
    with pytest.raises(ValueError, match="cu_seqlens"):
        cache.prefill_packed(k, k, [0, 5])  # one sequence for a cache of two
    with pytest.raises(ValueError, match="shape"):
        cache.prefill_packed(k[:, :1], k, [0, 2, 5])
