"""Fuzz cases of attention_with_kvcache: contiguous and paged caches with 0 and 1 sizes (block size
0 included), lengths at and past the capacity, block tables pointing outside the pool, appends,
NaN/inf in q and the caches, strided caches, meta mixes. After an append, the caches must hold
the new keys where the lengths say and be unchanged everywhere else."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import genext
from genext import reference

from fuzz_harness import (
    STRUCTURAL,
    VALID,
    VALUE,
    assert_matches,
    call,
    check_meta,
    floats,
    make,
    mutations,
    non_finite,
    reseed,
)

NAME = "attention_with_kvcache"
FLOATS = floats("attention_with_kvcache")


@st.composite
def cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    b = draw(st.integers(0, 3))
    lq = draw(st.integers(0, 3))
    hk, group = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    d = draw(st.integers(1, 10))
    append = draw(st.booleans())
    paged = draw(st.booleans())
    cache_layout = draw(st.sampled_from(("contiguous", "strided")))
    verdict, why = VALID, ""
    added = lq if append else 0
    if paged:
        block_size = draw(st.integers(1, 4))
        max_blocks = draw(st.integers(0, 4))
        capacity = max_blocks * block_size
        num_blocks = draw(st.integers(max(b * max_blocks, 1) if append else 1, b * max_blocks + 3))
        if append:  # disjoint blocks per sequence: appends never collide
            perm = torch.randperm(num_blocks)[: b * max_blocks]
            table = perm.view(b, max_blocks).to(torch.int32)
        else:
            table = torch.randint(0, num_blocks, (b, max_blocks), dtype=torch.int32)
        shape = (num_blocks, block_size, hk, d)
    else:
        capacity = draw(st.integers(0, 7))
        table = None
        shape = (b, capacity, hk, d)
    if capacity < added:
        added, append = 0, False
    lens = [draw(st.integers(0, capacity - added)) for _ in range(b)]
    k_cache = draw(non_finite(make(shape, dtype, cache_layout, keep_last=True), p=0.1))
    v_cache = make(shape, dtype, cache_layout, keep_last=True)
    q = draw(
        non_finite(
            make(
                (b, lq, hk * group, d),
                dtype,
                draw(st.sampled_from(("contiguous", "strided"))),
                keep_last=True,
            ),
            p=0.1,
        )
    )
    k_new = make((b, lq, hk, d), dtype) if append else None
    v_new = make((b, lq, hk, d), dtype) if append else None
    seqlens = torch.tensor(lens, dtype=torch.int32)
    causal = draw(st.booleans())
    mutation = draw(
        mutations(
            "past",
            "negative",
            "block_oob",
            "block_size0",
            "heads",
            "last_dim",
            "seqlens_dtype",
            "one_new",
        )
    )
    if mutation == "past" and b:
        seqlens[draw(st.integers(0, b - 1))] = capacity - added + 1
        verdict, why = VALUE, "length past the capacity"
    elif mutation == "negative" and b:
        seqlens[0] = -1
        verdict, why = VALUE, "negative length"
    elif mutation == "block_oob" and paged and b and max_blocks and lens[0] + added > 0:
        table = table.clone()
        table[0, 0] = draw(st.sampled_from((-1, k_cache.shape[0])))
        verdict, why = VALUE, f"block {int(table[0, 0])} outside the pool"
    elif mutation == "block_size0" and paged:
        k_cache = make((k_cache.shape[0], 0, hk, d), dtype)
        v_cache = make((k_cache.shape[0], 0, hk, d), dtype)
        verdict, why = STRUCTURAL, "block size 0"
    elif mutation == "heads" and hk > 1:
        q = make((b, lq, hk * group + 1, d), dtype)
        verdict, why = STRUCTURAL, "Hk does not divide Hq"
    elif mutation == "last_dim" and d > 1:
        q = make((b, lq, hk * group, d), dtype, "transposed")
        if q.stride(-1) != 1:  # (with size-1 dims the transposed layout may still be contiguous)
            verdict, why = STRUCTURAL, "q's last dim strided"
    elif mutation == "seqlens_dtype":
        seqlens = seqlens.long()
        verdict, why = STRUCTURAL, "int64 cache_seqlens"
    elif mutation == "one_new" and append:
        v_new = None
        verdict, why = STRUCTURAL, "k_new without v_new"
    desc = (
        f"q {tuple(q.shape)} {q.stride()} {dtype} cache {tuple(k_cache.shape)} {k_cache.stride()} "
        f"paged={paged} table {None if table is None else table.tolist()} lens {seqlens.tolist()} "
        f"append={append} causal={causal} {why}"
    )
    return q, k_cache, v_cache, seqlens, k_new, v_new, table, causal, verdict, desc


def _op(causal):
    def op(q, kc, vc, lens, kn, vn, table):
        return genext.ops.attention_with_kvcache(
            q, kc, vc, lens, kn, vn, causal, None, table, return_lse=True
        )

    return op


@given(cases())
def test_attention_with_kvcache(case):
    q, kc, vc, lens, kn, vn, table, causal, verdict, desc = case
    kc0, vc0 = kc.clone(), vc.clone()
    args = (q, kc, vc, lens, kn, vn, table)
    res = call(NAME, lambda: _op(causal)(*args), verdict, desc)
    if res is not None:
        out, lse = res
        d = lambda t: None if t is None else t.double()  # noqa: E731
        ref_out, ref_lse = reference.attention_with_kvcache(
            q.double(), kc0.double(), vc0.double(), lens, d(kn), d(vn), causal, None, table, True
        )
        assert_matches(out, ref_out, q.dtype, f"out {desc}")
        assert_matches(lse, ref_lse, q.dtype, f"lse {desc}")
        want_k, want_v = kc0.clone(), vc0.clone()
        if kn is not None:
            for b in range(q.shape[0]):
                for i in range(q.shape[1]):
                    j = int(lens[b]) + i
                    if table is None:
                        want_k[b, j], want_v[b, j] = kn[b, i], vn[b, i]
                    else:
                        blk, slot = int(table[b, j // kc.shape[1]]), j % kc.shape[1]
                        want_k[blk, slot], want_v[blk, slot] = kn[b, i], vn[b, i]
        assert torch.equal(kc.isnan(), want_k.isnan()), f"k_cache NaN pattern changed {desc}"
        assert torch.equal(kc.nan_to_num(), want_k.nan_to_num()), f"k_cache written wrongly {desc}"
        assert torch.equal(vc.nan_to_num(), want_v.nan_to_num()), f"v_cache written wrongly {desc}"
    elif verdict is not VALID:
        assert torch.equal(kc.nan_to_num(), kc0.nan_to_num()), (
            f"rejected, yet k_cache changed {desc}"
        )
    meta_args = (q, kc0.clone(), vc0.clone(), lens, kn, vn, table)
    check_meta(NAME, _op(causal), meta_args, verdict, res, desc)
