"""genext.ops.attention_with_kvcache against the float64 reference, on the CPU and
(marked) on CUDA: per-sequence lengths (0, 1, full), append, GQA/MQA, contiguous and paged caches,
the cache contents after an append, bad inputs, opcheck, torch.compile, CUDA graphs."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from genext import reference
from genext.ops import attention_with_kvcache

from attention_helpers import (
    all_on_meta,
    assert_nan_where_reference,
    same_error,
    with_one_on_meta,
)
from conftest import max_err, poison_allocator, slow

OP = torch.ops.genext.attention_with_kvcache

# float32/float64: absolute error bounds against float64 (values are O(1) here)
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def rand(*shape, dtype=torch.float32, device="cpu"):
    """Random values drawn in float64 and rounded to dtype (never zeros)."""
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


def make_cache(b, cap, hk, d, dtype, device, block_size=None, spare_blocks=3):
    """Random k/v caches holding `cap` tokens per sequence: contiguous (B, cap, Hk, D), or a pool
    with `spare_blocks` blocks nobody uses and a shuffled block table (B, ceil(cap / bs))."""
    if block_size is None:
        return (
            rand(b, cap, hk, d, dtype=dtype, device=device),
            rand(b, cap, hk, d, dtype=dtype, device=device),
            None,
        )
    per_seq = -(-cap // block_size)
    n = b * per_seq + spare_blocks
    table = torch.randperm(n)[: b * per_seq].view(b, per_seq).to(device=device, dtype=torch.int32)
    return (
        rand(n, block_size, hk, d, dtype=dtype, device=device),
        rand(n, block_size, hk, d, dtype=dtype, device=device),
        table,
    )


def to_paged(cache, block_size, table=None, spare_blocks=2):
    """The same content as a contiguous (B, L, Hk, D) cache in a paged pool, through `table` or a
    new shuffled one (the unused blocks and the tail of the last block hold other random values).
    Returns (pool, table)."""
    b, length, hk, d = cache.shape
    per_seq = -(-length // block_size)
    n = b * per_seq + spare_blocks
    pool = torch.randn(n, block_size, hk, d, device=cache.device).to(cache.dtype)
    if table is None:
        table = torch.randperm(n, device=cache.device)[: b * per_seq].view(b, per_seq).int()
    j = torch.arange(length, device=cache.device)
    for s in range(b):
        pool[table[s, j // block_size].long(), j % block_size] = cache[s]
    return pool, table


def pick_lengths(b, cap, added):
    """Cached lengths before the op: 0, the full capacity, 1, then random values."""
    top = cap - added
    fixed = [0, top, min(1, top)]
    lens = [
        fixed[s] if s < len(fixed) else int(torch.randint(0, top + 1, ()).item()) for s in range(b)
    ]
    return torch.tensor(lens, dtype=torch.int32)


def cache_rows(cache, table, s, j):
    """Rows j (a LongTensor) of sequence s, contiguous or paged."""
    if table is None:
        return cache[s, j]
    bs = cache.shape[1]
    return cache[table[s, j // bs].long(), j % bs]


def expected_cache(before, table, lens, new):
    """`before` with the rows of `new` (B, Lq, Hk, D) written at [lens[s], lens[s] + Lq)."""
    after = before.clone()
    lq = new.shape[1]
    for s, n in enumerate(lens.tolist()):
        j = torch.arange(n, n + lq, device=before.device)
        if table is None:
            after[s, j] = new[s]
        else:
            bs = before.shape[1]
            after[table[s, j // bs].long(), j % bs] = new[s]
    return after


def check_error(ours, pt, ref, dtype, what):
    """fp32/fp64: absolute tolerance; fp16/bf16: no worse than twice PyTorch's own error in that
    dtype (the reference computed step by step in the low precision)."""
    if ref.numel() == 0:
        return
    err = max_err(ours, ref)
    if dtype in ATOL:
        assert err <= ATOL[dtype], f"{what}: max error {err:.3g} > {ATOL[dtype]:.3g}"
    else:
        pt_err = max_err(pt, ref)
        assert err <= 2 * pt_err + 1e-6, f"{what}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


def run_and_check(device, dtype, b, lq, hq, hk, d, cap, causal, append, block_size, lens=None):
    """Runs the op once and checks out, lse and the caches against the reference."""
    kc, vc, table = make_cache(b, cap, hk, d, dtype, device, block_size)
    cap_tokens = cap if table is None else table.shape[1] * block_size
    added = lq if append else 0
    if lens is None:
        lens = pick_lengths(b, min(cap, cap_tokens), added)
    lens = lens.to(device)
    q = rand(b, lq, hq, d, dtype=dtype, device=device)
    kn = rand(b, lq, hk, d, dtype=dtype, device=device) if append else None
    vn = rand(b, lq, hk, d, dtype=dtype, device=device) if append else None
    k0, v0 = kc.clone(), vc.clone()
    poison_allocator(q.new_empty(b, lq, hq, d))
    out, lse = attention_with_kvcache(
        q, kc, vc, lens, kn, vn, causal=causal, block_table=table, return_lse=True
    )
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, hq, lq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), "an element was not written (NaN poison) or overflowed"

    # the caches: the new rows exactly where they belong, every other element untouched
    if append:
        assert torch.equal(kc, expected_cache(k0, table, lens, kn)), "k_cache after the append"
        assert torch.equal(vc, expected_cache(v0, table, lens, vn)), "v_cache after the append"
    else:
        assert torch.equal(kc, k0) and torch.equal(vc, v0), "the caches changed without append"

    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    r_out, r_lse = reference.attention_with_kvcache(
        q.double(), k0.double(), v0.double(), lens, dbl(kn), dbl(vn), causal, None, table, True
    )
    pt_out = pt_lse = None
    if dtype not in ATOL:  # PyTorch's math in this dtype
        pt_out, pt_lse = reference.attention_with_kvcache(
            q, k0, v0, lens, kn, vn, causal, None, table, True
        )
    check_error(out, pt_out, r_out, dtype, "out")
    seen = torch.isfinite(r_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), ~seen), "queries without keys need lse = -inf"
    check_error(lse[seen], None if pt_lse is None else pt_lse[seen], r_lse[seen], dtype, "lse")
    blind = (~seen).transpose(1, 2).unsqueeze(-1).expand_as(out)  # (B, Lq, Hq, D)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), (
        "queries without keys need out = 0"
    )
    return out, lse


# ---- against the reference -------------------------------------------------------------------

# (B, Lq, Hq, Hk, D, capacity, causal, append, block_size): each says why it is there. Lengths
# per sequence: 0, the full capacity (minus Lq when appending), 1, then random.
CASES = [
    (4, 1, 8, 2, 64, 97, True, True, None),  # GQA decode step, capacity 97 (prime)
    (4, 4, 8, 2, 128, 64, True, True, 16),  # speculative step of 4, paged (16), full cache
    (3, 16, 8, 1, 80, 300, True, True, 256),  # MQA chunk of 16, D 80, one 256 block + a tail
    (3, 16, 8, 2, 64, 50, False, True, None),  # not causal: the new queries see each other
    (3, 4, 8, 2, 128, 40, True, False, None),  # no append; lengths 0 and 1 < Lq: queries blind
    (2, 1, 8, 1, 128, 1100, True, False, 16),  # MQA, long: the CPU splits the keys over threads
    (3, 4, 4, 4, 64, 33, False, False, 256),  # MHA, paged with one block larger than needed
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[
        f"B{c[0]}-Lq{c[1]}-H{c[2]}x{c[3]}-D{c[4]}-cap{c[5]}{'-causal' if c[6] else ''}"
        f"{'-append' if c[7] else ''}{f'-paged{c[8]}' if c[8] else ''}"
        for c in CASES
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(device, case, dtype):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 kernels are CPU-only")
    run_and_check(device, dtype, *case)


@pytest.mark.parametrize("lq", [1, 4, 16])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["GQA", "MQA"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("append", [True, False], ids=["append", "read"])
def test_grid_float32(device, lq, heads, causal, append):
    # every combination of Lq, head grouping, masking and append, with D cycling through 64/80/128
    d = {1: 64, 4: 80, 16: 128}[lq]
    run_and_check(device, torch.float32, 3, lq, heads[0], heads[1], d, 37, causal, append, None)


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_cpu_key_splits_match_one_thread(cpu_loop_level, block_size):
    # fewer (sequence, kv head) pairs than threads: the CPU kernel splits the keys over threads
    # and merges the partial results by their lse; one sequence is empty, one ends mid-split
    q, kn, vn = rand(2, 4, 4, 64), rand(2, 4, 1, 64), rand(2, 4, 1, 64)
    kc, vc, table = make_cache(2, 2000, 1, 64, torch.float32, "cpu", block_size)
    lens = torch.tensor([1900, 0], dtype=torch.int32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 7):
            torch.set_num_threads(n)
            k, v = kc.clone(), vc.clone()
            results.append(OP(q, k, v, lens, kn, vn, table, 0.125, True))
    finally:
        torch.set_num_threads(threads)
    (one, lse_one), (many, lse_many) = results
    assert max_err(many, one) < 1e-5 and max_err(lse_many, lse_one) < 1e-5
    want, want_lse = reference.attention_with_kvcache(
        q.double(),
        kc.double(),
        vc.double(),
        lens,
        kn.double(),
        vn.double(),
        True,
        0.125,
        table,
        True,
    )
    assert max_err(many, want) < ATOL[torch.float32] and max_err(lse_many, want_lse) < 1e-4


# ---- paged vs contiguous ---------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_equals_contiguous(device, block_size, dtype):
    b, lq, hq, hk, d, cap = 4, 4, 8, 2, 64, 300
    kc, vc, _ = make_cache(b, cap, hk, d, dtype, device)
    kp, table = to_paged(kc, block_size)
    vp, _ = to_paged(vc, block_size, table)
    lens = pick_lengths(b, cap, lq).to(device)
    q = rand(b, lq, hq, d, dtype=dtype, device=device)
    kn, vn = (
        rand(b, lq, hk, d, dtype=dtype, device=device),
        rand(b, lq, hk, d, dtype=dtype, device=device),
    )
    out_c, lse_c = attention_with_kvcache(
        q, kc, vc, lens, kn, vn, block_table=None, return_lse=True
    )
    out_p, lse_p = attention_with_kvcache(
        q, kp, vp, lens, kn, vn, block_table=table, return_lse=True
    )
    # CPU: the same arithmetic in the same order, bit-identical (the AMX scores take 16-key blocks
    # of equally spaced rows, which blocks of 16 and 256 keep whole in both layouts)
    if device == "cpu":
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    else:
        # the CUDA kernels plan their key splits from the capacity, which the block size rounds
        # up, so the two may sum in a different order: as close as two correct results can be
        assert max_err(lse_p, lse_c) < 1e-4
        if dtype == torch.float32:
            assert max_err(out_p, out_c) < 2e-5
        else:
            ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + lq)
            pt = reference.attention_with_kvcache(q, kc, vc, lens + lq)
            assert max_err(out_p, out_c) <= 4 * max_err(pt, ref) + 1e-6
    for s, n in enumerate((lens + lq).tolist()):
        rows = torch.arange(n, device=device)
        assert torch.equal(cache_rows(kp, table, s, rows), kc[s, :n])
        assert torch.equal(cache_rows(vp, table, s, rows), vc[s, :n])


def test_non_contiguous_views(device):
    # q sliced from a packed tensor and caches whose head/batch strides are not the packed ones:
    # the op reads them in place (only the last dim must be contiguous)
    b, lq, hq, hk, d, cap = 2, 4, 4, 2, 32, 20
    qkv = rand(b, lq, hq + 2 * hk, d, device=device)
    q = qkv[:, :, :hq]
    big_k, big_v = rand(b, cap, 2 * hk, d, device=device), rand(b, cap, 2 * hk, d, device=device)
    kc, vc = big_k[:, :, ::2], big_v[:, :, 1::2]
    kn, vn = qkv[:, :, hq : hq + hk], qkv[:, :, hq + hk :]
    lens = torch.tensor([3, 16], dtype=torch.int32, device=device)
    k0, v0, others = kc.clone(), vc.clone(), big_k[:, :, 1::2].clone()
    out = attention_with_kvcache(q, kc, vc, lens, kn, vn)
    want = reference.attention_with_kvcache(
        q.double(), k0.double(), v0.double(), lens, kn.double(), vn.double()
    )
    assert max_err(out, want) < ATOL[torch.float32]
    assert torch.equal(kc, expected_cache(k0, None, lens, kn))
    assert torch.equal(big_k[:, :, 1::2], others)  # the interleaved heads are untouched
    assert torch.equal(vc, expected_cache(v0, None, lens, vn))


def test_scale_and_int_lengths(device):
    q = rand(2, 1, 4, 16, device=device)
    kc, vc = rand(2, 10, 2, 16, device=device), rand(2, 10, 2, 16, device=device)
    out = attention_with_kvcache(q, kc, vc, 7, scale=0.3)
    lens = torch.full((2,), 7, dtype=torch.int32, device=device)
    want = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, scale=0.3)
    assert max_err(out, want) < ATOL[torch.float32]


@pytest.mark.parametrize("grad_on", ["q", "k_cache", "v_cache", "k_new", "v_new"])
def test_inference_only_outputs_do_not_require_grad(device, grad_on):
    # forward-only like flash-attn's flash_attn_with_kvcache: callable on tensors that require grad
    # (e.g. a decode loop run without torch.no_grad), outputs never require grad, whichever input
    # requires it
    t = {
        "q": rand(1, 1, 2, 8, device=device),
        "k_cache": rand(1, 4, 2, 8, device=device),
        "v_cache": rand(1, 4, 2, 8, device=device),
        "k_new": rand(1, 1, 2, 8, device=device),
        "v_new": rand(1, 1, 2, 8, device=device),
    }
    t[grad_on].requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = attention_with_kvcache(
            t["q"], t["k_cache"], t["v_cache"], 2, t["k_new"], t["v_new"], return_lse=True
        )
    assert not out.requires_grad and not lse.requires_grad
    assert torch.equal(t["k_cache"].detach()[0, 2], t["k_new"].detach()[0, 0])
    assert torch.equal(t["v_cache"].detach()[0, 2], t["v_new"].detach()[0, 0])


# ---- bad inputs ------------------------------------------------------------------------------


def test_bad_lengths_and_block_tables_raise_clear_errors(device):
    b, lq, hq, hk, d, cap = 2, 4, 4, 2, 16, 32
    q = rand(b, lq, hq, d, device=device)
    kc, vc = rand(b, cap, hk, d, device=device), rand(b, cap, hk, d, device=device)
    kn, vn = rand(b, lq, hk, d, device=device), rand(b, lq, hk, d, device=device)
    lens = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    k0 = kc.clone()
    with pytest.raises(
        ValueError,
        match=r"sequence 1 would hold 33 tokens .*cache_seqlens\[1\] = 29"
        r".*past the cache capacity of 32",
    ):
        attention_with_kvcache(q, kc, vc, lens(0, 29), kn, vn)
    with pytest.raises(ValueError, match=r"sequence 0 would hold 33 tokens.*capacity of 32"):
        attention_with_kvcache(q, kc, vc, lens(33, 0))
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = -1 is negative"):
        attention_with_kvcache(q, kc, vc, lens(3, -1), kn, vn)
    assert torch.equal(kc, k0), "a rejected call must not write"
    attention_with_kvcache(q, kc, vc, lens(28, 0), kn, vn)  # exactly full: fine

    # paged: 3 blocks of 8 per sequence in a pool of 6; only the entries a sequence uses count
    pool_k, pool_v = rand(6, 8, hk, d, device=device), rand(6, 8, hk, d, device=device)
    table = torch.tensor([[0, 1, -1], [2, 3, 6]], dtype=torch.int32, device=device)
    attention_with_kvcache(q, pool_k, pool_v, lens(12, 12), kn, vn, block_table=table)  # 2 blocks
    with pytest.raises(
        ValueError, match=r"block_table\[1, 2\] = 6 is outside the pool of 6 blocks"
    ):
        attention_with_kvcache(q, pool_k, pool_v, lens(12, 13), kn, vn, block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = -1 is outside the pool"):
        attention_with_kvcache(q, pool_k, pool_v, lens(17, 0), block_table=table)
    with pytest.raises(
        ValueError, match=r"past the cache capacity of 24 \(max_blocks \* block_size\)"
    ):
        attention_with_kvcache(q, pool_k, pool_v, lens(21, 0), kn, vn, block_table=table)
    if device != "cpu":
        return
    # the CPU op checks the values on its own (callers that bypass the Python wrapper)
    with pytest.raises(ValueError, match=r"sequence 1 would hold 33 tokens"):
        OP(q, kc, vc, lens(0, 29), kn, vn, None, 0.25, True)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -2 is negative"):
        OP(q, kc, vc, lens(-2, 0), None, None, None, 0.25, True)
    with pytest.raises(
        ValueError, match=r"block_table\[1, 2\] = 6 is outside the pool of 6 blocks"
    ):
        OP(q, pool_k, pool_v, lens(12, 13), kn, vn, table, 0.25, True)
    k0 = pool_k.clone()
    with pytest.raises(ValueError, match="outside the pool"):  # sequence 0 valid, 1 not: no write
        OP(q, pool_k, pool_v, lens(0, 13), kn, vn, table, 0.25, True)
    assert torch.equal(pool_k, k0)


def test_bad_arguments_raise_clear_errors(device):
    b, lq, hq, hk, d, cap = 2, 1, 4, 2, 16, 8
    q = rand(b, lq, hq, d, device=device)
    kc, vc = rand(b, cap, hk, d, device=device), rand(b, cap, hk, d, device=device)
    kn, vn = rand(b, lq, hk, d, device=device), rand(b, lq, hk, d, device=device)
    lens = torch.tensor([1, 2], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="q, k_cache and v_cache must share a dtype"):
        attention_with_kvcache(q, kc.half(), vc.half(), lens)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32"):
        attention_with_kvcache(q.long(), kc.long(), vc.long(), lens)
    with pytest.raises(TypeError, match="k_new must have q's dtype"):
        attention_with_kvcache(q, kc, vc, lens, kn.half(), vn)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 tensor"):
        attention_with_kvcache(q, kc, vc, lens.long())
    with pytest.raises(TypeError, match="block_table must be int32"):
        attention_with_kvcache(q, kc, vc, lens, block_table=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(
        ValueError,
        match=r"query heads \(4\) must be a multiple of the number of "
        r"key/value heads \(3\)",
    ):
        k3 = rand(b, cap, 3, d, device=device)
        attention_with_kvcache(q, k3, k3, lens)
    with pytest.raises(ValueError, match="must be 4-D"):
        attention_with_kvcache(q[0], kc, vc, lens)
    with pytest.raises(ValueError, match="q must be 4-D"):  # before q's sizes are read
        attention_with_kvcache(q.sum(), kc, vc, 1)
    with pytest.raises(ValueError, match="share the head dim"):
        attention_with_kvcache(q, kc[..., :8], vc[..., :8], lens)
    with pytest.raises(ValueError, match=r"k_new must have shape \(B, Lq, Hk, D\)"):
        attention_with_kvcache(q, kc, vc, lens, kn[:, :, :1], vn[:, :, :1])
    with pytest.raises(ValueError, match="k_new and v_new come together"):
        attention_with_kvcache(q, kc, vc, lens, kn)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(B,\)"):
        attention_with_kvcache(q, kc, vc, lens[:1])
    with pytest.raises(ValueError, match=r"block_table must have shape \(B, max_blocks\)"):
        attention_with_kvcache(
            q, kc, vc, lens, block_table=torch.zeros(3, 1, dtype=torch.int32, device=device)
        )
    with pytest.raises(ValueError, match="a contiguous cache must have shape"):
        attention_with_kvcache(q, kc[:1], vc[:1], lens)
    with pytest.raises(ValueError, match="k_cache and v_cache must have one 4-D shape"):
        attention_with_kvcache(q, kc, vc[:, :4], lens)
    with pytest.raises(ValueError, match="q must have a contiguous last dim"):
        attention_with_kvcache(rand(b, lq, hq, 2 * d, device=device)[..., ::2], kc, vc, lens)


@pytest.mark.cuda
def test_device_mismatch_raises():
    q = rand(1, 1, 2, 8, device="cuda")
    kc = rand(1, 4, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="one device"):
        attention_with_kvcache(q, kc, kc.clone(), torch.zeros(1, dtype=torch.int32))


# ---- opcheck, torch.compile ------------------------------------------------------------------


@pytest.mark.slow
def test_opcheck():
    # the op mutates k_cache/v_cache when appending (declared in the schema); appending the same
    # rows again at the same positions is idempotent, so opcheck's repeated calls agree
    q, kn, vn = rand(2, 4, 4, 32), rand(2, 4, 2, 32), rand(2, 4, 2, 32)
    kc, vc = rand(2, 20, 2, 32), rand(2, 20, 2, 32)
    lens = torch.tensor([5, 16], dtype=torch.int32)
    pool_k, pool_v = rand(7, 8, 2, 32), rand(7, 8, 2, 32)
    table = torch.tensor([[6, 0, 2], [1, 5, 3]], dtype=torch.int32)
    for args in [
        (q, kc, vc, lens, kn, vn, None, 0.2, True),
        (q, kc, vc, lens, None, None, None, 0.2, False),
        (q, pool_k, pool_v, lens, kn, vn, table, 0.2, True),
        (
            q.transpose(1, 2).contiguous().transpose(1, 2),
            kc[:, ::2],
            vc[:, 1::2],
            torch.tensor([3, 6], dtype=torch.int32),
            kn,
            vn,
            None,
            0.2,
            True,
        ),
    ]:
        torch.library.opcheck(OP.default, args)


def test_torch_compile_decode_step():
    b, hq, hk, d, cap = 2, 4, 2, 32, 16

    def step(q, kc, vc, lens, kn, vn):
        out, lse = attention_with_kvcache(q, kc, vc, lens, kn, vn, return_lse=True)
        lens.add_(q.shape[1])
        return out * 2 + lse.transpose(1, 2).unsqueeze(-1).sigmoid()

    compiled = torch.compile(step, fullgraph=True)
    kc, vc = rand(b, cap, hk, d), rand(b, cap, hk, d)
    kc2, vc2 = kc.clone(), vc.clone()
    lens = torch.tensor([0, 5], dtype=torch.int32)
    lens2 = lens.clone()
    for lq in (1, 1, 4):
        q, kn, vn = rand(b, lq, hq, d), rand(b, lq, hk, d), rand(b, lq, hk, d)
        y, y_eager = compiled(q, kc, vc, lens, kn, vn), step(q, kc2, vc2, lens2, kn, vn)
        assert torch.allclose(y, y_eager, atol=1e-6, rtol=0)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(lens, lens2)
    assert lens.tolist() == [6, 11]


# ---- CUDA-only ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_cuda_graph_replays_with_new_lengths(block_size):
    # one decode step with append captured once, replayed with new lengths copied into the
    # captured cache_seqlens and new q/k_new/v_new: each replay must match the reference
    b, lq, hq, hk, d, cap, dtype = 4, 1, 8, 2, 128, 256, torch.bfloat16
    kc, vc, table = make_cache(b, cap, hk, d, dtype, "cuda", block_size)
    q = rand(b, lq, hq, d, dtype=dtype, device="cuda")
    kn, vn = (
        rand(b, lq, hk, d, dtype=dtype, device="cuda"),
        rand(b, lq, hk, d, dtype=dtype, device="cuda"),
    )
    lens = torch.tensor([3, 0, 100, 17], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            attention_with_kvcache(q, kc, vc, lens, kn, vn, block_table=table)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = attention_with_kvcache(
            q, kc, vc, lens, kn, vn, block_table=table, return_lse=True
        )
    for new_lens in ([0, 1, cap - 1, 200], [cap - 1, 64, 0, 5], [31, 32, 33, 255]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        for t in (q, kn, vn):
            t.copy_(torch.randn_like(t))
        k0, v0 = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, expected_cache(k0, table, lens, kn))
        assert torch.equal(vc, expected_cache(v0, table, lens, vn))
        r_out, r_lse = reference.attention_with_kvcache(
            q.double(),
            k0.double(),
            v0.double(),
            lens,
            kn.double(),
            vn.double(),
            True,
            None,
            table,
            True,
        )
        pt_out, _ = reference.attention_with_kvcache(
            q, k0, v0, lens, kn, vn, True, None, table, True
        )
        check_error(out, pt_out, r_out, dtype, f"out, lengths {new_lens}")
        assert max_err(lse, r_lse) < 1e-3, f"lse, lengths {new_lens}"


@pytest.mark.cuda
@pytest.mark.parametrize("d", [96, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_head_dims(d, dtype):
    # the head dims the issue names beyond those of CASES (64, 80, 128)
    run_and_check("cuda", dtype, 3, 4, 8, 2, d, 200, True, True, 16)
    run_and_check("cuda", dtype, 3, 1, 8, 1, d, 70, True, True, None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16, 256], ids=["contiguous", "paged16", "paged256"])
def test_cuda_matches_cpu(dtype, block_size):
    b, lq, hq, hk, d, cap = 5, 4, 8, 2, 128, 600
    kc, vc, table = make_cache(b, cap, hk, d, dtype, "cuda", block_size)
    q = rand(b, lq, hq, d, dtype=dtype, device="cuda")
    kn, vn = (
        rand(b, lq, hk, d, dtype=dtype, device="cuda"),
        rand(b, lq, hk, d, dtype=dtype, device="cuda"),
    )
    lens = pick_lengths(b, cap, lq)
    cpu = [t.cpu() if t is not None else None for t in (q, kc, vc, kn, vn, table)]
    out, lse = attention_with_kvcache(
        q, kc, vc, lens.cuda(), kn, vn, block_table=table, return_lse=True
    )
    c_out, c_lse = attention_with_kvcache(
        cpu[0], cpu[1], cpu[2], lens, cpu[3], cpu[4], block_table=cpu[5], return_lse=True
    )
    assert torch.equal(kc.cpu(), cpu[1]) and torch.equal(vc.cpu(), cpu[2])
    assert torch.allclose(lse.cpu(), c_lse, rtol=0, atol=1e-4)
    if dtype == torch.float32:
        assert max_err(out.cpu(), c_out) < 2e-5
        return
    # 16-bit: each is within twice PyTorch's own error of the float64 reference (the CUDA kernel
    # may round the probabilities to 16 bits before multiplying by V; the CPU kernel does not), so
    # they differ by at most four times that error. The caches now hold the new rows: attend over
    # lens + Lq cached keys without appending.
    full = lens + lq
    ref = reference.attention_with_kvcache(
        cpu[0].double(), cpu[1].double(), cpu[2].double(), full, block_table=cpu[5]
    )
    pt = reference.attention_with_kvcache(cpu[0], cpu[1], cpu[2], full, block_table=cpu[5])
    assert max_err(out.cpu(), c_out) <= 4 * max_err(pt, ref) + 1e-6


# ---- the reference itself ----------------------------------------------------------------------


def test_reference_gathers_paged_caches_like_contiguous_ones():
    kc, vc = rand(2, 40, 1, 8, dtype=torch.float64), rand(2, 40, 1, 8, dtype=torch.float64)
    kp, table = to_paged(kc, 16)
    vp, _ = to_paged(vc, 16, table)
    q = rand(2, 3, 2, 8, dtype=torch.float64)
    lens = torch.tensor([0, 37], dtype=torch.int32)
    a = reference.attention_with_kvcache(q, kc, vc, lens, return_lse=True)
    p = reference.attention_with_kvcache(q, kp, vp, lens, block_table=table, return_lse=True)
    assert torch.equal(a[0], p[0]) and torch.equal(a[1], p[1])
    assert torch.equal(a[0][0], torch.zeros_like(a[0][0]))  # nothing cached: zeros
    assert torch.isinf(a[1][0]).all()
    for s, n in ((0, 0), (1, 37)):
        assert torch.equal(reference.kvcache_keys(kp, s, n, table), kc[s, :n])


def test_all_lengths_combinations_quick():
    # every sequence state at once in one batch (CPU, small): empty/1/full, with and without append
    for append, causal in itertools.product((True, False), (True, False)):
        run_and_check(
            "cpu",
            torch.float32,
            5,
            2,
            4,
            2,
            16,
            9,
            causal,
            append,
            None,
            lens=torch.tensor([0, 1, 9 - (2 if append else 0), 4, 2], dtype=torch.int32),
        )


# ---- degenerate sizes, meta tensors, the fake kernel's checks --------------------------------


def _paged_args():
    """A paged call of the op with every optional tensor given."""
    q, kn, vn = rand(2, 3, 4, 16), rand(2, 3, 2, 16), rand(2, 3, 2, 16)
    pool_k, pool_v = rand(6, 4, 2, 16), rand(6, 4, 2, 16)
    table = torch.tensor([[5, 0, 2], [1, 4, 3]], dtype=torch.int32)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    return (q, pool_k, pool_v, lens, kn, vn, table, 0.25, True)


KV_TENSORS = ["q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "block_table"]


@pytest.mark.parametrize("i", range(7), ids=KV_TENSORS)
def test_meta_tensor_beside_cpu_ones_raises(i):
    args = with_one_on_meta(_paged_args(), i)
    with pytest.raises(RuntimeError, match="attention_with_kvcache: .*is on (meta|cpu) but"):
        OP(*args)


def test_all_meta_inputs_give_shapes():
    args = all_on_meta(_paged_args())
    out, lse = OP(*args)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 16) and lse.shape == (2, 4, 3)
    out = attention_with_kvcache(*args[:6], block_table=args[6])
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 16)


def _bad_args():
    """(name, arguments of the op) that the C++ checks reject."""
    q, kc, vc, lens, kn, vn, table, *rest = _paged_args()
    flat_k, flat_v = rand(2, 9, 2, 16), rand(2, 9, 2, 16)

    def paged(**kw):
        given = (q, kc, vc, lens, kn, vn, table)
        return tuple(kw.get(n, a) for n, a in zip(KV_TENSORS, given)) + tuple(rest)

    return {
        "int64 q": paged(q=q.long(), k_cache=kc.long(), v_cache=vc.long()),
        "dtypes differ": paged(k_cache=kc.double()),
        "rank 3 q": paged(q=q[0]),
        "caches differ": paged(v_cache=vc[:5]),
        "head dims differ": paged(q=q[..., :8]),
        "heads not a multiple": paged(q=rand(2, 3, 3, 16)),
        "no kv heads": paged(k_cache=kc[:, :, :0], v_cache=vc[:, :, :0]),
        "head dim 0": paged(q=q[..., :0], k_cache=kc[..., :0], v_cache=vc[..., :0]),
        "strided q": paged(q=rand(2, 3, 4, 32)[..., ::2]),
        "int64 lengths": paged(cache_seqlens=lens.long()),
        "lengths shape": paged(cache_seqlens=lens[:1]),
        "int64 table": paged(block_table=table.long()),
        "table batch": paged(block_table=table[:1]),
        "block size 0": paged(k_cache=kc[:, :0], v_cache=vc[:, :0]),
        "contiguous batch": paged(k_cache=flat_k[:1], v_cache=flat_v[:1], block_table=None),
        "k_new alone": paged(v_new=None),
        "k_new dtype": paged(k_new=kn.double()),
        "k_new shape": paged(k_new=kn[:, :2], v_new=vn[:, :2]),
    }


@pytest.mark.parametrize("case", list(_bad_args()))
def test_fake_raises_as_the_kernel_does(case):
    args = _bad_args()[case]
    same_error(lambda: OP(*args), lambda: OP(*all_on_meta(args)))


@pytest.mark.parametrize("path", ["checked", "unchecked", "op", "meta"])
def test_paged_block_size_zero_is_a_value_error(path):
    c = torch.zeros(4, 0, 2, 16)
    q = torch.randn(2, 1, 4, 16)
    lens, table = torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32)
    call = {
        "checked": lambda: attention_with_kvcache(q, c, c, lens, block_table=table),
        "unchecked": lambda: attention_with_kvcache(
            q, c, c, lens, block_table=table, check_values=False
        ),
        "op": lambda: OP(q, c, c, lens, None, None, table, 0.25, True),
        "meta": lambda: OP(*all_on_meta((q, c, c, lens, None, None, table, 0.25, True))),
    }[path]
    with pytest.raises(ValueError, match="attention_with_kvcache: a paged cache needs a positive"):
        call()


def test_head_dim_zero_is_a_value_error():
    q, c = torch.randn(2, 1, 4, 0), torch.randn(2, 5, 2, 0)
    lens = torch.zeros(2, dtype=torch.int32)
    for t in ("cpu", "meta"):
        args = (q.to(t), c.to(t), c.to(t), lens.to(t))
        with pytest.raises(ValueError, match="attention_with_kvcache: head dim must be positive"):
            attention_with_kvcache(*args)
        with pytest.raises(ValueError, match="attention_with_kvcache: head dim must be positive"):
            OP(*args, None, None, None, 0.5, True)


@pytest.mark.parametrize("bad", [2**31, 2**63, -1])
def test_int_lengths_out_of_range_are_a_clear_error(bad):
    q, c = rand(2, 1, 4, 16), rand(2, 5, 2, 16)
    with pytest.raises(ValueError, match=r"attention_with_kvcache: cache_seqlens must be in \[0"):
        attention_with_kvcache(q, c, c, bad)


@pytest.mark.parametrize(
    "case", ["B0", "Lq0-append", "Hq0-append", "max_blocks0", "num_blocks0", "num_blocks0-append"]
)
def test_degenerate_sizes(device, case):
    """Empty dims give empty results; a pool without blocks serves sequences of length 0."""
    b, lq, hq, hk, d = 2, 3, 4, 2, 16
    if case == "Hq0-append" and device != "cpu":
        pytest.skip("the CUDA op returns before the append when there is no query head")
    q = rand(0 if case == "B0" else b, 0 if case == "Lq0-append" else lq, hq, hk * 0 + d)
    if case == "Hq0-append":
        q = q[:, :, :0]
    q = q.to(device)
    bsz = q.shape[0]
    lens = torch.zeros(bsz, dtype=torch.int32, device=device)
    kn = vn = table = None
    if "append" in case:
        kn, vn = (rand(bsz, q.shape[1], hk, d).to(device) for _ in range(2))
    if case.startswith("max_blocks0"):
        kc, table = rand(3, 4, hk, d), torch.zeros(bsz, 0, dtype=torch.int32)
    elif case.startswith("num_blocks0"):
        kc, table = rand(0, 4, hk, d), torch.zeros(bsz, 2, dtype=torch.int32)
    else:
        kc = rand(bsz, 8, hk, d)
    kc, vc = kc.to(device), kc.clone().to(device)
    table = None if table is None else table.to(device)
    if case == "num_blocks0-append":
        with pytest.raises(ValueError, match="outside the pool of 0 blocks"):
            attention_with_kvcache(q, kc, vc, lens, kn, vn, block_table=table)
        return
    out, lse = attention_with_kvcache(q, kc, vc, lens, kn, vn, block_table=table, return_lse=True)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    if case == "Hq0-append":  # nothing to attend, but the rows were appended
        assert torch.equal(kc[:, :lq], kn) and torch.equal(vc[:, :lq], vn)
    if out.numel():  # no key cached and none new: zeros, lse = -inf
        assert torch.equal(out, torch.zeros_like(out)) and lse.isneginf().all()


# ---- NaN and inf --------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _poke(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# (name, change of (q, k_cache, scale)); the caches are contiguous (B 2, 40 rows, Hk 2, D 16),
# lengths (30, 37) before an append of Lq 3
KV_NONFINITE = {
    "nan-q": lambda q, k, s: (_poke(q, (1, 2, 3, 0), NAN), k, s),
    "nan-k": lambda q, k, s: (q, _poke(k, (0, 7, 1, 4), NAN), s),
    # sequence 0 holds 30 + 3 keys: its row 35 is never written nor read
    "nan-k-past-the-length": lambda q, k, s: (q, _poke(k, (0, 35, 1, 4), NAN), s),
    "inf-q": lambda q, k, s: (_poke(q, (0, 1, 2, 5), INF), k, s),
    "all-scores-minus-inf": lambda q, k, s: (_poke(q, (0, 1, 2), -INF), k.abs(), s),
    "nan-scale": lambda q, k, s: (q, k, NAN),
}


@pytest.mark.parametrize("case", list(KV_NONFINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_give_nan_where_the_reference_does(device, case, dtype):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float32 covers the CPU kernel; float16 runs the CUDA 16-bit kernel")
    check_nonfinite(device, case, dtype)


@pytest.mark.parametrize("case", list(KV_NONFINITE))
def test_cpu_float_tiles_of_each_width_give_nan_where_the_reference_does(cpu_loop_level, case):
    check_nonfinite("cpu", case, torch.float32)


def check_nonfinite(device, case, dtype):
    """A KV_NONFINITE case against the float64 reference: NaN exactly where it has NaN."""
    # drawn in dtype, so that the float64 reference sees the same inputs as the kernel
    shapes = ((2, 3, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16))
    q, kc, vc = (rand(*s, dtype=dtype).double() for s in shapes)
    kn, vn = (rand(2, 3, 2, 16, dtype=dtype).double() for _ in range(2))
    kn = kn.abs() if case == "all-scores-minus-inf" else kn
    lens = torch.tensor([30, 37], dtype=torch.int32)
    q, kc, scale = KV_NONFINITE[case](q, kc, 0.25)
    ref, ref_lse = reference.attention_with_kvcache(
        q, kc, vc, lens, kn, vn, True, scale, None, True
    )
    assert bool(ref.isnan().any()) == (
        case not in ("nan-k-past-the-length", "all-scores-minus-inf")
    )
    on = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    out, lse = attention_with_kvcache(
        on(q), on(kc), on(vc), lens.to(device), on(kn), on(vn), scale=scale, return_lse=True
    )
    assert_nan_where_reference(out.cpu(), ref, 2e-5 if dtype == torch.float32 else 2e-3)
    assert torch.equal(lse.isnan().cpu(), ref.isnan().any(-1).transpose(1, 2))
    assert torch.equal(lse.isneginf().cpu(), ref_lse.isneginf())


@pytest.mark.parametrize("where", [100, 600], ids=["first-split", "second-split"])
def test_nan_key_in_one_split_makes_the_row_nan(device, where):
    # one sequence and one kv head with 700 keys: the CPU cuts the keys into splits when it has
    # more threads than (sequence, kv head) pairs, and the CUDA kernel always does
    q, kc, vc = rand(1, 1, 2, 16), rand(1, 700, 1, 16), rand(1, 700, 1, 16)
    kc = _poke(kc, (0, where, 0, 3), NAN)
    lens = torch.tensor([700], dtype=torch.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out, lse = attention_with_kvcache(
            q.to(device), kc.to(device), vc.to(device), lens.to(device), return_lse=True
        )
    finally:
        torch.set_num_threads(threads)
    assert out.isnan().all() and lse.isnan().all()


def test_torch_compile_dynamic_shapes():
    # the fake kernel's checks run on symbolic sizes: guards, no specialisation errors
    f = torch.compile(attention_with_kvcache, fullgraph=True, dynamic=True)
    for b, cap in ((2, 20), (3, 31)):
        q, kn, vn = rand(b, 1, 4, 16), rand(b, 1, 2, 16), rand(b, 1, 2, 16)
        kc, vc = rand(b, cap, 2, 16), rand(b, cap, 2, 16)
        lens = torch.full((b,), 5, dtype=torch.int32)
        out = f(q, kc.clone(), vc.clone(), lens, kn, vn)
        assert torch.equal(out, attention_with_kvcache(q, kc, vc, lens, kn, vn))


# ---- CPU kernel paths: head-dim and key tails, dtypes, splits, thread teams -------------------

# (B, Lq, Hq, Hk, D, capacity, block_size): D off the 8-lane vectors (a scalar tail, or all tail),
# capacities that end tiles and key groups of 8 mid-way, block sizes that are not powers of two
TAIL_CASES = [
    (3, 1, 4, 2, 7, 45, None),  # D below one vector
    (2, 3, 6, 3, 13, 70, 5),  # D = 8 + 5, paged blocks of 5 (tiles cross many blocks)
    (2, 1, 8, 2, 72, 131, None),  # D = 64 + 8: a full 64-element chunk and one more vector
    (2, 16, 4, 1, 33, 90, 7),  # D = 32 + 1, a prefill chunk over blocks of 7
    (1, 2, 3, 1, 129, 67, 64),  # D = 128 + 1, one key past a tile
]


@pytest.mark.parametrize("case", TAIL_CASES, ids=lambda c: f"B{c[0]}-Lq{c[1]}-D{c[4]}-cap{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_head_dim_and_key_tails(case, dtype):
    b, lq, hq, hk, d, cap, block_size = case
    for append in (True, False):
        run_and_check("cpu", dtype, b, lq, hq, hk, d, cap, True, append, block_size)


@pytest.mark.parametrize("threads", [1, 2, slow(4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_cpu_threads_and_splits_match_reference(threads, dtype, block_size):
    # one sequence, one kv head and 3000 keys: enough work that 2 and 4 threads cut the keys into
    # splits merged by their lse; 1 thread does not split
    import genext._C

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        before = genext._C._cpu_team_launches()
        for lens in (torch.tensor([2990, 1100]), torch.tensor([0, 2999])):
            run_and_check(
                "cpu", dtype, 2, 1, 4, 1, 64, 3000, True, True, block_size, lens.to(torch.int32)
            )
        assert (genext._C._cpu_team_launches() > before) == (threads > 1)
    finally:
        torch.set_num_threads(saved)


def test_cpu_small_decode_step_wakes_no_thread_team():
    # a decode step of a small model is tens of microseconds of work: it must run on the calling
    # thread (a team's wake-up costs more than that, and milliseconds when a core is busy)
    import genext._C

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # B8, 8 query and 2 kv heads of 64, 81 keys: 0.66 MB of K/V
        q, kn, vn = rand(8, 1, 8, 64), rand(8, 1, 2, 64), rand(8, 1, 2, 64)
        kc, vc = rand(8, 81, 2, 64), rand(8, 81, 2, 64)
        lens = torch.full((8,), 80, dtype=torch.int32)
        before = genext._C._cpu_team_launches()
        attention_with_kvcache(q, kc, vc, lens, kn, vn)
        assert genext._C._cpu_team_launches() == before
    finally:
        torch.set_num_threads(saved)


def test_cpu_value_errors_match_the_python_wording():
    # CPU tensors are checked by the kernel alone: the same messages as the wrapper's own check
    q, kc, vc = rand(1, 1, 2, 8), rand(1, 4, 1, 8), rand(1, 4, 1, 8)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"capacity of 4 \(k_cache.shape\[1\]\)"):
        attention_with_kvcache(q, kc, vc, lens)
    pool = rand(2, 4, 1, 8)
    table = torch.tensor([[0, 2]], dtype=torch.int32)
    with pytest.raises(
        ValueError,
        match=r"block_table\[0, 1\] = 2 is outside the pool of 2 blocks "
        r"\(sequence 0 uses its first 2 entries\)",
    ):
        attention_with_kvcache(q, pool, pool.clone(), lens, block_table=table)


@pytest.mark.parametrize("where", [100, 2900], ids=["first-split", "last-split"])
def test_cpu_nan_key_in_one_split_of_a_long_cache_makes_the_row_nan(where):
    # 3000 keys of one kv head with 4 threads: enough work for the CPU kernel to split the keys
    q, kc, vc = rand(1, 1, 4, 64), rand(1, 3000, 1, 64), rand(1, 3000, 1, 64)
    kc[0, where, 0, 3] = float("nan")
    lens = torch.tensor([3000], dtype=torch.int32)
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out, lse = attention_with_kvcache(q, kc, vc, lens, return_lse=True)
    finally:
        torch.set_num_threads(saved)
    assert out.isnan().all() and lse.isnan().all()


# ---- the two bfloat16 paths of the CPU kernel ---------------------------------------------------


@pytest.fixture(params=["in-place", "in-place-amx", "widened"])
def bf16_path(request):
    """Runs a test with each bfloat16 path of the CPU kernel: rows read in place (vdpbf16ps
    scores; only on CPUs with AVX512-BF16), the same with the scores of tasks of 4 to 16 query
    rows on AMX tiles (CPUs and kernels with AMX-BF16), and rows widened to float first (every
    CPU)."""
    import genext._C

    in_place = request.param.startswith("in-place")
    amx = request.param == "in-place-amx"
    supported, before = genext._C._cpu_kv_bf16_dot()
    amx_supported, amx_before = genext._C._cpu_kv_amx()
    if in_place and not supported:
        pytest.skip("this CPU has no AVX512-BF16")
    if amx and not amx_supported:
        pytest.skip("no AMX-BF16 here (CPU or OS)")
    genext._C._cpu_set_kv_bf16_dot(in_place)
    genext._C._cpu_set_kv_amx(amx)
    try:
        assert genext._C._cpu_kv_bf16_dot()[1] == in_place
        assert genext._C._cpu_kv_amx()[1] == amx
        yield request.param
    finally:
        genext._C._cpu_set_kv_bf16_dot(before)
        genext._C._cpu_set_kv_amx(amx_before)


def test_cpu_amx_scores_only_where_the_cpu_has_amx_bf16():
    import genext._C

    supported, enabled = genext._C._cpu_kv_amx()
    assert enabled == supported
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    if supported:  # the OS may still refuse the tile state: then not supported
        assert "amx_bf16" in flags and "amx_tile" in flags
        assert genext._C._cpu_kv_bf16_dot()[0]
    else:
        with pytest.raises(ValueError, match="AMX-BF16"):
            genext._C._cpu_set_kv_amx(True)


def test_cpu_bf16_path_is_the_widening_one_only_without_avx512_bf16():
    import genext._C

    supported, enabled = genext._C._cpu_kv_bf16_dot()
    assert enabled == supported
    with open("/proc/cpuinfo") as f:
        flag = "avx512_bf16" in f.read().split()
    assert supported == (flag and genext._C.cpu_isa.startswith("x86-64-v4"))
    if not supported:
        with pytest.raises(ValueError, match="AVX512-BF16"):
            genext._C._cpu_set_kv_bf16_dot(True)


# head dims off the 32-element steps of vdpbf16ps and the 16-lane vectors (7, 13, 24, 33, 40, 72,
# 80, 129), 1 to 128 query rows per kv head (one and three: the value sums take rows four at a
# time), paged and contiguous caches; and for the AMX scores (4 to 16 query rows, D a multiple
# of 32) paged blocks of 5 and 40 (16-key blocks whose rows are not equally spaced: the vdpbf16ps
# scores take over), D 96 and 256 (query chunks loaded for each block), D 32 (one chunk), and 6
# and 12 rows
WIDTH_CASES = (
    CASES
    + [c[:6] + (True, True, c[6]) for c in TAIL_CASES]
    + [(2, 1, 4, 4, 40, 70, True, True, None), (2, 1, 6, 2, 24, 70, False, False, 16)]
    + [(2, 1, 8, 2, 64, 150, True, False, 5), (2, 1, 8, 2, 64, 200, True, True, 40)]
    + [(2, 2, 8, 1, 96, 200, True, True, 48), (1, 1, 16, 1, 256, 130, True, True, None)]
    + [(2, 3, 8, 4, 32, 90, True, True, None), (1, 3, 16, 4, 64, 100, True, False, 16)]
)


@pytest.mark.parametrize(
    "case", WIDTH_CASES, ids=lambda c: f"B{c[0]}-Lq{c[1]}-H{c[2]}x{c[3]}-D{c[4]}"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_float_tiles_of_each_width_match_reference(cpu_loop_level, case, dtype):
    # float32 rows read in place and float16 rows widened into float tiles, on the 8-lane and
    # the 16-lane routines
    run_and_check("cpu", dtype, *case)


@pytest.mark.parametrize(
    "case", WIDTH_CASES, ids=lambda c: f"B{c[0]}-Lq{c[1]}-H{c[2]}x{c[3]}-D{c[4]}"
)
def test_cpu_bf16_paths_match_reference(bf16_path, case):
    run_and_check("cpu", torch.bfloat16, *case)


@pytest.mark.parametrize("case", list(KV_NONFINITE))
def test_cpu_bf16_paths_give_nan_where_the_reference_does(bf16_path, case):
    shapes = ((2, 3, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16))
    q, kc, vc = (rand(*s, dtype=torch.bfloat16).double() for s in shapes)
    kn, vn = (rand(2, 3, 2, 16, dtype=torch.bfloat16).double() for _ in range(2))
    kn = kn.abs() if case == "all-scores-minus-inf" else kn
    lens = torch.tensor([30, 37], dtype=torch.int32)
    q, kc, scale = KV_NONFINITE[case](q, kc, 0.25)
    ref, ref_lse = reference.attention_with_kvcache(
        q, kc, vc, lens, kn, vn, True, scale, None, True
    )
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    out, lse = attention_with_kvcache(
        bf(q), bf(kc), bf(vc), lens, bf(kn), bf(vn), scale=scale, return_lse=True
    )
    # the output is rounded to bfloat16: 2^-9 of values up to about 4
    assert_nan_where_reference(out, ref, 8e-3)
    assert torch.equal(lse.isnan(), ref.isnan().any(-1).transpose(1, 2))
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())


def test_cpu_bf16_paths_agree_on_a_long_cache():
    # the two paths differ by float rounding only (the in-place one multiplies exact products of
    # bfloat16 values and scales the sums, the widened one scales q first), not bfloat16's
    import genext._C

    supported, before = genext._C._cpu_kv_bf16_dot()
    if not supported:
        pytest.skip("this CPU has no AVX512-BF16")
    q, kc, vc = (
        rand(*s, dtype=torch.bfloat16) for s in ((2, 1, 8, 128), (2, 700, 2, 128), (2, 700, 2, 128))
    )
    lens = torch.tensor([700, 333], dtype=torch.int32)
    outs = []
    try:
        for on in (True, False):
            genext._C._cpu_set_kv_bf16_dot(on)
            outs.append(attention_with_kvcache(q, kc, vc, lens, return_lse=True))
    finally:
        genext._C._cpu_set_kv_bf16_dot(before)
    (o1, l1), (o2, l2) = outs
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    # outputs in bfloat16: at most one unit in the last place apart
    assert ((o1.float() - o2.float()).abs() <= o1.float().abs() * 2**-7 + 1e-6).all()


_GUARD_PAGE_SCRIPT = """
import ctypes, mmap, sys
import torch
import genext._C
from genext import reference
from genext.ops import attention_with_kvcache

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
PAGE = mmap.PAGESIZE


def before_a_guard_page(shape):
    # a bfloat16 tensor whose last element is the last one readable: the page after it is PROT_NONE
    n = 1
    for s in shape:
        n *= s
    mem = mmap.mmap(-1, 3 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    assert libc.mprotect(base + 2 * PAGE, PAGE, 0) == 0, ctypes.get_errno()
    t = torch.frombuffer(mem, dtype=torch.bfloat16, count=n, offset=2 * PAGE - 2 * n).view(shape)
    t.copy_(torch.randn(shape, dtype=torch.float64).to(torch.bfloat16))
    return t, mem


keep = []
for d, lk in ((7, 45), (13, 20), (24, 30), (33, 30), (56, 12)):
    (kc, mk), (vc, mv) = before_a_guard_page((1, lk, 1, d)), before_a_guard_page((1, lk, 1, d))
    keep += [mk, mv]
    q = torch.randn(1, 1, 4, d, dtype=torch.float64).to(torch.bfloat16)
    lens = torch.tensor([lk], dtype=torch.int32)
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens)
    for on in sorted({False, genext._C._cpu_kv_bf16_dot()[0]}):
        genext._C._cpu_set_kv_bf16_dot(on)
        out = attention_with_kvcache(q, kc, vc, lens)
        torch.testing.assert_close(out.double(), ref, atol=8e-3, rtol=0)
        print("ok", d, on)
"""


def test_cpu_bf16_rows_ending_at_a_guard_page_are_not_read_past():
    # caches whose last row ends where an unreadable page begins, at head dims off the vector
    # widths: a read past a row's end (a full 32-element key load, a full 16-element value load)
    # kills the child process
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert r.stdout.count("ok") >= 5, r.stdout


F16_LEVELS = pytest.mark.parametrize(
    "level", [0, 3, 4], ids=["c10-conversion", "F16C-8-lane", "F16C-16-lane"]
)


def at_cpu_level(level, fn):
    """fn() with the CPU level capped to `level` (skipped where the CPU runs below it)."""
    import genext._C as C

    if C._cpu_level() < level:
        pytest.skip(f"this CPU runs below x86-64-v{level}")
    C._cpu_set_level_cap(level)
    try:
        assert C._cpu_level() == level
        return fn()
    finally:
        C._cpu_set_level_cap(4)


@F16_LEVELS
def test_cpu_float16_caches_compute_exactly_as_float32(level):
    # float16 rows are widened exactly (F16C where the CPU has it and the level is 3 or more, c10's
    # conversion below) and then run the float32 routines: the same results as float32 caches
    # holding the same values, subnormal and large float16 values included. 100 keys are one split
    # at any thread count, so the two calls sum in the same order.
    g = torch.Generator().manual_seed(5)
    shapes = ((2, 3, 4, 40), (2, 100, 2, 40), (2, 100, 2, 40))
    q, kc, vc = (torch.randn(*s, generator=g).to(torch.float16) for s in shapes)
    kc.view(-1)[::7] = torch.tensor(3e-6, dtype=torch.float16)  # subnormal in float16
    vc.view(-1)[2::13] = torch.tensor(3000.0, dtype=torch.float16)
    assert kc.view(-1)[0].item() != 0 and kc.view(-1)[0].abs() < 6.1e-5
    lens = torch.tensor([100, 57], dtype=torch.int32)

    def run():
        out16, lse16 = attention_with_kvcache(q, kc, vc, lens, scale=0.3, return_lse=True)
        out32, lse32 = attention_with_kvcache(
            q.float(), kc.float(), vc.float(), lens, scale=0.3, return_lse=True
        )
        return out16, lse16, out32, lse32

    out16, lse16, out32, lse32 = at_cpu_level(level, run)
    assert out16.dtype == torch.float16 and torch.isfinite(out32).all()
    assert torch.equal(lse16, lse32)
    assert torch.equal(out16, out32.to(torch.float16))


@F16_LEVELS
def test_cpu_float16_values_pass_through_a_one_key_cache(level):
    # over one key the weights are exactly 1, so the output is the value row itself: every float16
    # bit pattern (but -0, which the sum 0 + 1 * -0 turns into +0) comes back unchanged, NaN as
    # NaN, through rows of 36 elements (the widening's 8-element steps and its tail)
    b, hk, d = 228, 8, 36
    bits = torch.arange(65536, dtype=torch.int32)
    bits = bits[bits != 0x8000]
    flat = torch.zeros(b * hk * d, dtype=torch.int32)
    flat[: bits.numel()] = bits
    vc = flat.to(torch.int16).view(torch.float16).view(b, 1, hk, d)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(b, 1, hk, d, generator=g).to(torch.float16)
    kc = torch.randn(b, 1, hk, d, generator=g).to(torch.float16)
    lens = torch.ones(b, dtype=torch.int32)
    out = at_cpu_level(level, lambda: attention_with_kvcache(q, kc, vc, lens))
    assert torch.equal(out.isnan(), vc.isnan())
    assert torch.equal(out[~out.isnan()], vc[~vc.isnan()])
