"""genext.nn.KVCache against the float64 reference and flash attention over the whole sequence,
on the CPU and (marked) on CUDA: decode loops over contiguous and paged caches, growth, lengths,
bad arguments, and CUDA-graph capture of decode steps."""

from __future__ import annotations

import pytest
import torch

import genext
from genext import reference
from genext.ops import flash_attention

from conftest import max_err


def rand(*shape, dtype=torch.float32, device="cpu"):
    """Random values drawn in float64 and rounded to dtype (never zeros)."""
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("block_size", [None, 4], ids=["contiguous", "paged4"])
def test_kvcache_decode_loop_matches_full_attention(device, block_size):
    # prompts of different lengths (one empty) prefilled, then steps of 1, 4 and 16 tokens; each
    # step must equal flash attention of the step's queries over the whole sequence so far
    b, hq, hk, d = 3, 8, 2, 64
    prompt = [5, 0, 11]
    cache = genext.KVCache(
        b, hk, d, capacity=8, dtype=torch.float32, device=device, block_size=block_size
    )
    k_all = rand(b, max(prompt), hk, d, device=device)
    v_all = rand(b, max(prompt), hk, d, device=device)
    cache.prefill(k_all, v_all, prompt)
    seqs_k = [k_all[s, :n] for s, n in enumerate(prompt)]
    seqs_v = [v_all[s, :n] for s, n in enumerate(prompt)]
    assert cache.lengths == tuple(prompt) and cache.seqlens.tolist() == prompt
    for lq in (1, 4, 1, 16, 1):
        q = rand(b, lq, hq, d, device=device)
        kn, vn = rand(b, lq, hk, d, device=device), rand(b, lq, hk, d, device=device)
        out = cache.attend(q, kn, vn)
        for s in range(b):
            seqs_k[s] = torch.cat([seqs_k[s], kn[s]])
            seqs_v[s] = torch.cat([seqs_v[s], vn[s]])
            want = flash_attention(
                q[s : s + 1], seqs_k[s][None], seqs_v[s][None], causal=True, layout="blhd"
            )
            assert max_err(out[s : s + 1], want) < 1e-5
            assert torch.equal(cache.keys(s), seqs_k[s]) and torch.equal(cache.values(s), seqs_v[s])
            assert cache.lengths[s] <= cache.room(s)
        assert cache.seqlens.tolist() == list(cache.lengths) == [len(k) for k in seqs_k]
    assert cache.capacity > 8 and max(cache.lengths) == 34  # it grew (from 8)
    if block_size is None:
        assert cache.k.shape[1] >= 34


def test_kvcache_contiguous_growth_keeps_the_content():
    cache = genext.KVCache(2, 1, 8, capacity=4, dtype=torch.float64)
    keys = []
    for step in range(9):
        kn = rand(2, 3, 1, 8, dtype=torch.float64)
        cache.attend(rand(2, 3, 2, 8, dtype=torch.float64), kn, kn + 1)
        keys.append(kn)
        assert cache.capacity >= cache.lengths[0] == 3 * (step + 1)
        assert cache.k.shape[1] == cache.capacity
    assert cache.capacity == 32  # 4 -> 8 -> 16 -> 32, doubling
    want = torch.cat(keys, 1)
    assert torch.equal(cache.keys(1), want[1]) and torch.equal(cache.values(0), want[0] + 1)


def test_kvcache_paged_growth_per_sequence():
    # sequences grow at different rates: each gets blocks as it needs them, from the free list,
    # then from a doubled pool; the table widens; no block is ever shared
    cache = genext.KVCache(3, 2, 8, capacity=4, block_size=4, dtype=torch.float32)
    assert cache.k.shape[:2] == (3, 4) and cache.block_table.shape == (3, 1)
    cache.set_seqlens([4, 0, 2])
    written = {s: [] for s in range(3)}
    for _ in range(6):
        kn = rand(3, 2, 2, 8)
        cache.attend(rand(3, 2, 2, 8), kn, -kn)
        for s in range(3):
            written[s].append(kn[s])
        owned = [cache._owned[s] for s in range(3)]
        flat = [blk for blocks in owned for blk in blocks]
        assert len(flat) == len(set(flat)), "a block is owned twice"
        assert all(0 <= blk < cache.k.shape[0] for blk in flat)
        for s in range(3):
            assert cache.lengths[s] <= cache.room(s) == 4 * len(owned[s])
            row = cache.block_table[s, : len(owned[s])].tolist()
            assert row == owned[s]
    assert cache.lengths == (16, 12, 14)
    assert cache.block_table.shape[1] >= 4 and cache.k.shape[0] >= 11
    for s, n0 in enumerate((4, 0, 2)):
        new = torch.cat(written[s])
        assert torch.equal(cache.keys(s)[n0:], new) and torch.equal(cache.values(s)[n0:], -new)


@pytest.mark.parametrize("block_size", [None, 8])
def test_kvcache_max_capacity_is_a_clear_error(block_size):
    cache = genext.KVCache(
        2, 1, 8, capacity=4, max_capacity=10, block_size=block_size, dtype=torch.float32
    )
    q, kn = rand(2, 2, 1, 8), rand(2, 2, 1, 8)
    for _ in range(5):
        cache.attend(q, kn, kn)
    assert cache.lengths == (10, 10)
    k_before = cache.k.clone()
    with pytest.raises(
        RuntimeError, match="sequence 0 would hold 12 tokens, past max_capacity = 10"
    ):
        cache.attend(q, kn, kn)
    assert cache.lengths == (10, 10) and cache.seqlens.tolist() == [10, 10]
    assert torch.equal(cache.k, k_before)
    cache.set_seqlens([9, 2])
    with pytest.raises(RuntimeError, match="sequence 0 would hold 11 tokens"):
        cache.attend(q, kn, kn)
    with pytest.raises(ValueError, match=r"capacity \(16\) is past max_capacity \(10\)"):
        genext.KVCache(1, 1, 8, capacity=16, max_capacity=10)


def test_kvcache_lengths_reset_and_rollback():
    cache = genext.KVCache(2, 2, 8, capacity=16, dtype=torch.float32, seqlens=[3, 7])
    assert cache.lengths == (3, 7) and cache.seqlens.dtype == torch.int32
    kn = rand(2, 4, 2, 8)
    out_a = cache.attend(rand(2, 4, 4, 8), kn, kn)
    assert cache.lengths == (7, 11) and out_a.shape == (2, 4, 4, 8)
    cache.set_seqlens([5, 9])  # two speculative tokens rejected per sequence
    assert cache.lengths == (5, 9) and cache.seqlens.tolist() == [5, 9]
    assert torch.equal(cache.keys(0)[3:], kn[0, :2])
    cache.seqlens.add_(1)  # changed on the device behind the mirror's back
    cache.sync_lengths()
    assert cache.lengths == (6, 10)
    cache.reset()
    assert cache.lengths == (0, 0) and cache.seqlens.tolist() == [0, 0]
    with pytest.raises(ValueError, match="length of sequence 1 must be >= 0"):
        cache.set_seqlens([1, -1])
    with pytest.raises(ValueError, match="3 lengths given for 2 sequences"):
        cache.set_seqlens([1, 2, 3])


@pytest.mark.parametrize("block_size", [None, 4])
def test_kvcache_refuses_to_grow_during_graph_capture(monkeypatch, block_size):
    # growth allocates new buffers that a captured graph would not see: a clear error instead
    # (the capture state is faked here so that the CPU runs the check)
    import genext.nn.kvcache as kvmod

    cache = genext.KVCache(1, 1, 8, capacity=4, dtype=torch.float32, block_size=block_size)
    q, kn = rand(1, 3, 1, 8), rand(1, 3, 1, 8)
    cache.attend(q, kn, kn)
    monkeypatch.setattr(kvmod, "_capturing", lambda device: True)
    k_before = cache.k
    with pytest.raises(
        RuntimeError,
        match="sequence 0 needs room for 6 tokens but owns 4.*"
        "CUDA graph is being captured.*reserve",
    ):
        cache.attend(q, kn, kn)
    assert cache.k is k_before and cache.lengths == (3,)
    monkeypatch.undo()
    cache.reserve(12)
    monkeypatch.setattr(kvmod, "_capturing", lambda device: True)
    cache.attend(q, kn, kn)  # fits the reservation: fine
    assert cache.lengths == (6,)


def test_kvcache_bad_arguments():
    cache = genext.KVCache(2, 2, 8, capacity=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q must be \(B, Lq, Hq, D\) with B = 2, D = 8"):
        cache.attend(rand(3, 1, 4, 8), rand(3, 1, 2, 8), rand(3, 1, 2, 8))
    with pytest.raises(ValueError, match=r"k_new must have shape \(B, L, Hk, D\) = \(2, 1, 2, 8\)"):
        cache.attend(rand(2, 1, 4, 8), rand(2, 1, 1, 8), rand(2, 1, 1, 8))
    with pytest.raises(ValueError, match="v_new must have shape"):
        cache.attend(rand(2, 1, 4, 8), rand(2, 1, 2, 8), rand(2, 2, 2, 8))
    with pytest.raises(TypeError, match="dtype must be"):
        genext.KVCache(1, 1, 8, capacity=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        genext.KVCache(1, 0, 8, capacity=4)
    assert cache.lengths == (0, 0)


@pytest.mark.cuda
def test_cuda_graph_kvcache_steps():
    # KVCache.attend captured after reserve(): every replay appends and advances seqlens on the
    # device; sync_lengths() brings the host mirror up to date. Growth inside a capture is refused.
    b, hq, hk, d = 2, 8, 2, 64
    cache = genext.KVCache(
        b, hk, d, capacity=16, dtype=torch.float16, device="cuda", block_size=16, seqlens=[2, 9]
    )
    cache.reserve(64)
    q = rand(b, 1, hq, d, dtype=torch.float16, device="cuda")
    kn = rand(b, 1, hk, d, dtype=torch.float16, device="cuda")
    vn = rand(b, 1, hk, d, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cache.attend(q, kn, vn)
    torch.cuda.current_stream().wait_stream(side)
    cache.set_seqlens([2, 9])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.attend(q, kn, vn)
    cache.set_seqlens([2, 9])
    for step in range(5):
        k0, v0, lens = cache.k.clone(), cache.v.clone(), cache.seqlens.clone()
        graph.replay()
        torch.cuda.synchronize()
        want = reference.attention_with_kvcache(
            q.double(),
            k0.double(),
            v0.double(),
            lens,
            kn.double(),
            vn.double(),
            True,
            None,
            cache.block_table,
        )
        assert max_err(out, want) < 1e-2
        assert cache.seqlens.tolist() == [3 + step, 10 + step]
    cache.sync_lengths()
    assert cache.lengths == (7, 14)
