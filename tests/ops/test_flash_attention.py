"""genext.ops.flash_attention(_varlen) and the SDPA drop-in against the float64 reference, on the CPU
and (marked) on CUDA."""

from __future__ import annotations

import itertools
import math
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genext
import genext.nn.functional as gF
from genext import reference
from genext.ops import flash_attention, flash_attention_varlen
from genext.ops.flash_attention import cpu_forward_prefers_torch

from attention_helpers import (
    ATOL,
    ATOL_GRAD,
    all_on_meta,
    assert_nan_where_reference,
    make_qkv,
    same_error,
    with_one_on_meta,
)
from conftest import max_err, poison_allocator, set_attention_routing, slow, thin

# the module behind genext.ops.flash_attention (the package attribute is the function): routed
# calls go through its reference to PyTorch's SDPA
OPS_MODULE = sys.modules["genext.ops.flash_attention"]

FWD = torch.ops.genext.flash_attention_forward
BWD = torch.ops.genext.flash_attention_backward


def dtypes_for(device):
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if device == "cpu" else base


def grads(fn, q, k, v, go):
    """Output, lse (if fn returns it) and gradients of fn(q, k, v) for upstream gradient go."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res = fn(q, k, v)
    out, lse = res if isinstance(res, tuple) else (res, None)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
    return out.detach(), None if lse is None else lse.detach(), gq, gk, gv


def check_against_reference(ours, pt, ref, dtype, what):
    """ours and pt (PyTorch in the same dtype, None for fp32/fp64) against the float64 ref."""
    if ref.numel() == 0:
        return
    err = max_err(ours, ref)
    if dtype in ATOL:
        tol = (ATOL_GRAD if what.startswith("d") else ATOL)[dtype]
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"
    else:
        pt_err = max_err(pt, ref)
        assert err <= 2 * pt_err + 1e-6, f"{what}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


def lse_error(ours, ref):
    """lse errors over the rows that see a key; rows that see none must be -inf in both."""
    seen = torch.isfinite(ref)
    assert torch.equal(torch.isinf(ours) & (ours < 0), ~seen), (
        "rows without keys must have lse = -inf"
    )
    return ours[seen], ref[seen]


# (B, Hq, Hk, Lq, Lk, D, causal, scale): each case says why it is there. causal is bottom-right.
CASES = [
    (2, 4, 4, 17, 17, 40, False, None),  # L = 17, not a tile multiple; D = 40 (SD 1.5)
    (1, 2, 2, 1, 1, 72, False, None),  # L = 1; D = 72 (not a multiple of 16)
    (1, 3, 3, 1, 97, 64, True, None),  # one query (decoding) against 97 keys: sees them all
    (2, 8, 2, 97, 97, 128, True, None),  # GQA (Hq = 8, Hk = 2), causal, L = 97 prime
    (2, 4, 1, 97, 77, 72, False, 0.3),  # MQA cross-attention, Lk = 77 (text tokens), custom scale
    (1, 2, 2, 97, 33, 40, True, None),  # causal, Lq > Lk: the first 64 queries see no key (zeros)
    (1, 2, 1, 17, 97, 256, True, None),  # causal, Lq < Lk; D = 256, the largest CUDA head dim
    (1, 1, 1, 1025, 1025, 128, True, None),  # L = 1025: one past a power of two, tile tails
    (1, 2, 2, 1025, 77, 40, False, None),  # long queries against 77 keys
]


@pytest.mark.parametrize(
    "case",
    [slow(c) if c[3] == c[4] == 1025 else c for c in CASES],  # the quick profile skips L = 1025
    ids=[
        f"B{c[0]}-H{c[1]}x{c[2]}-L{c[3]}x{c[4]}-D{c[5]}{'-causal' if c[6] else ''}" for c in CASES
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(device, case, dtype):
    b, hq, hk, lq, lk, d, causal, scale = case
    if dtype not in dtypes_for(device):
        pytest.skip("float64 kernels are CPU-only")
    q, k, v = make_qkv(b, hq, hk, lq, lk, d, dtype, device)
    go = torch.randn(b, hq, lq, d, dtype=torch.float64).to(device=device, dtype=dtype)
    poison_allocator(q.new_empty(b, lq, hq, d))
    out, lse, *g = grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True),
        q,
        k,
        v,
        go,
    )
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, hq, lq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(x.shape == t.shape and x.dtype == dtype for x, t in zip(g, (q, k, v)))
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in g), (
        "an element was not written (NaN poison) or overflowed"
    )

    ref_fn = lambda q, k, v: reference.attention_reference(  # noqa: E731
        q, k, v, causal, scale, bottom_right=True, return_lse=True
    )
    r_out, r_lse, *rg = grads(ref_fn, q.double(), k.double(), v.double(), go.double())
    pt = [None] * 5
    if dtype not in ATOL:  # PyTorch's math in this dtype: softmax(q k^T) v step by step
        pt = grads(ref_fn, q, k, v, go)
    check_against_reference(out, pt[0], r_out, dtype, "out")
    ours_lse, ref_lse = lse_error(lse, r_lse)
    pt_lse = None if pt[1] is None else pt[1][torch.isfinite(r_lse)]
    check_against_reference(ours_lse, pt_lse, ref_lse, dtype, "lse")
    for name, o, p, r in zip(("dq", "dk", "dv"), g, pt[2:], rg):
        check_against_reference(o, p, r, dtype, name)
    if causal and lq > lk:  # queries i < Lq - Lk see no key: zero output and zero dq
        assert torch.equal(out[:, :, : lq - lk], torch.zeros_like(out[:, :, : lq - lk]))
        assert torch.equal(g[0][:, :, : lq - lk], torch.zeros_like(g[0][:, :, : lq - lk]))


def test_gradient_through_lse(device):
    # a loss on lse (e.g. a z-loss) must flow back into q and k
    q, k, v = make_qkv(1, 4, 2, 33, 45, 64, torch.float32, device)
    w = torch.randn(1, 4, 33, device=device)
    go = torch.randn(1, 4, 33, 64, device=device)

    def loss(fn, q, k, v):
        q, k, v = (
            t.detach().double().requires_grad_()
            if fn is reference.attention_reference
            else t.detach().clone().requires_grad_()
            for t in (q, k, v)
        )
        out, lse = fn(q, k, v, causal=True, return_lse=True)
        total = (out * go.to(out.dtype)).sum() + (lse * w.to(lse.dtype)).sum()
        return torch.autograd.grad(total, (q, k, v))

    for o, r in zip(loss(flash_attention, q, k, v), loss(reference.attention_reference, q, k, v)):
        assert max_err(o, r) <= ATOL_GRAD[torch.float32]


# ---- layouts and strides ---------------------------------------------------------------------


def test_layouts_give_the_same_result(device):
    q, k, v = make_qkv(2, 4, 2, 37, 50, 40, torch.float16, device)
    out = flash_attention(q, k, v, causal=True)
    # bhld output: a transposed view of a contiguous (B, L, H, D) tensor, like PyTorch's flash path
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    q2, k2, v2 = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, L, H, D) storage
    out2, lse2 = flash_attention(q2, k2, v2, causal=True, layout="blhd", return_lse=True)
    assert out2.shape == q2.shape and out2.is_contiguous()
    assert torch.equal(out2.transpose(1, 2), out)
    _, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(lse, lse2)


@pytest.mark.parametrize(
    "make_views",
    [
        # q, k, v sliced from one packed (B, L, 3, H, D) qkv projection, in the blhd layout
        lambda qkv: (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], "blhd"),
        # the same, permuted to bhld: strides (L*3*H*D, D, 3*H*D, 1)
        lambda qkv: (*qkv.permute(2, 0, 3, 1, 4).unbind(0), "bhld"),
        # last dim not contiguous: the op copies
        lambda qkv: (
            *(
                t.transpose(-1, -2).contiguous().transpose(-1, -2)
                for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)
            ),
            "bhld",
        ),
    ],
    ids=["packed-blhd", "packed-bhld", "strided-last-dim"],
)
def test_non_contiguous_inputs(device, make_views, avx2_routing):
    # genext's kernel reads the views in place (the AVX2 machines' rule keeps the call there)
    qkv = torch.randn(2, 41, 3, 4, 72, device=device, requires_grad=True)
    q, k, v, layout = make_views(qkv)
    out = flash_attention(q, k, v, causal=True, layout=layout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    want = flash_attention(qc, kc, vc, causal=True, layout=layout)
    assert torch.equal(out, want)
    go = torch.randn_like(out)
    (g_packed,) = torch.autograd.grad(out, qkv, go)
    g_plain = torch.autograd.grad(want, (qc, kc, vc), go)
    for i, gp in enumerate(g_plain):  # the packed gradient holds the three plain ones
        view = make_views(g_packed)[i]
        assert torch.equal(view, gp)


# ---- key padding (seqused_k) and varlen -------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_with_a_fully_padded_sequence(device, causal):
    # per-batch key lengths, one of them 0: that entry's rows see nothing -> zeros, lse -inf
    b, h, lq, lk, d = 3, 2, 19, 40, 64
    q, k, v = make_qkv(b, h, h, lq, lk, d, torch.float32, device)
    used = torch.tensor([40, 0, 23], dtype=torch.int32, device=device)
    go = torch.randn(b, h, lq, d, device=device)

    def ours(q, k, v):
        out, lse = FWD(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            None,
            None,
            used,
            0,
            0,
            d**-0.5,
            causal,
            True,
        )
        return out.transpose(1, 2), lse

    out, lse, *g = grads(ours, q, k, v, go)
    r_out, r_lse, *rg = grads(
        lambda q, k, v: reference.attention_reference(
            q, k, v, causal, None, True, seqused_k=used, return_lse=True
        ),
        q.double(),
        k.double(),
        v.double(),
        go.double(),
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert max_err(out, r_out) <= ATOL[torch.float32]
    ol, rl = lse_error(lse, r_lse)
    assert max_err(ol, rl) <= ATOL[torch.float32]
    for o, r in zip(g, rg):
        assert torch.isfinite(o).all()
        assert max_err(o, r) <= ATOL_GRAD[torch.float32]
    assert torch.equal(g[1][2, :, 23:], torch.zeros_like(g[1][2, :, 23:])), "padded keys get dk = 0"


def test_varlen_matches_per_sequence_op(device):
    # packed sequences, including an empty query sequence (s=1), a sequence without keys (s=2,
    # zeros) and rows past the last sequence (zeros); GQA and causal
    lq, lk = [5, 0, 17, 1, 70], [7, 3, 0, 20, 66]
    hq, hk, d = 4, 2, 40
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    cu_q = torch.tensor(cq, dtype=torch.int32, device=device)
    cu_k = torch.tensor(ck, dtype=torch.int32, device=device)
    tq, tk = sum(lq) + 3, sum(lk) + 2  # extra rows belong to no sequence
    q = torch.randn(tq, hq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tk, hk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tk, hk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(tq, hq, d, device=device, dtype=torch.bfloat16)
    poison_allocator(go)
    out, lse = flash_attention_varlen(
        q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, return_lse=True
    )
    assert out.shape == (tq, hq, d) and lse.shape == (hq, tq)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    assert torch.equal(out[sum(lq) :], torch.zeros_like(out[sum(lq) :]))
    assert torch.equal(dk[sum(lk) :], torch.zeros_like(dk[sum(lk) :]))
    for s in range(len(lq)):
        rq, rk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        qs, ks, vs = (
            t.detach()[r].unsqueeze(0).requires_grad_() for t, r in ((q, rq), (k, rk), (v, rk))
        )
        o, lse_s = flash_attention(qs, ks, vs, causal=True, layout="blhd", return_lse=True)
        assert torch.allclose(out[rq], o[0], atol=1e-2, rtol=0)
        assert torch.equal(torch.isinf(lse[:, rq]), torch.isinf(lse_s[0]))
        assert torch.allclose(lse[:, rq], lse_s[0], atol=1e-5, rtol=0)
        if lq[s] == 0:  # keys nobody queries: zero gradients
            assert torch.equal(dk[rk], torch.zeros_like(dk[rk]))
            continue
        gs = torch.autograd.grad(o, (qs, ks, vs), go[rq].unsqueeze(0))
        for full, part, r in ((dq, gs[0], rq), (dk, gs[1], rk), (dv, gs[2], rk)):
            assert torch.allclose(full[r], part[0], atol=2e-2, rtol=0)
    # sequence 2 has no keys: zero output
    assert torch.equal(out[cq[2] : cq[3]], torch.zeros_like(out[cq[2] : cq[3]]))


# ---- float64 gradcheck, opcheck, torch.compile ------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)], ids=["MHA", "GQA", "MQA"])
def test_gradcheck_float64_cpu(causal, heads):
    hq, hk = heads
    q, k, v = make_qkv(1, hq, hk, 5, 7, 4, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, return_lse=True), (q, k, v)
    )


def test_gradcheck_float64_cpu_varlen_and_padding():
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    q = torch.randn(7, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 4, causal=True), (q, k, v)
    )
    used = torch.tensor([2, 5], dtype=torch.int32)
    qb, kb, vb = make_qkv(2, 2, 2, 4, 6, 4, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: FWD(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            None,
            None,
            used,
            0,
            0,
            0.4,
            True,
            False,
        )[0],
        (qb, kb, vb),
    )


@pytest.mark.slow
def test_opcheck(device):
    q, k, v = make_qkv(2, 4, 2, 19, 23, 40, torch.float32, device)
    qt, kt, vt = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))  # strided (B, L, H, D)
    used = torch.tensor([23, 9], dtype=torch.int32, device=device)
    cases = [
        (qt, kt, vt, None, None, None, 0, 0, 0.2, True, True),
        (qt, kt, vt, None, None, used, 0, 0, 0.2, True, False),
    ]
    cu_q = torch.tensor([0, 7, 7, 19], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 10, 12, 23], dtype=torch.int32, device=device)
    cases.append((qt[:1], kt[:1], vt[:1], cu_q, cu_k, None, 12, 11, 0.2, True, True))
    for args in cases:
        torch.library.opcheck(FWD.default, args)
        with torch.no_grad():
            out, lse = FWD(*args)
        go = torch.randn_like(out)
        torch.library.opcheck(
            BWD.default, (go, *(t.detach() for t in args[:3]), out, lse, *args[3:])
        )


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 4, 2, 33, 20, 40, torch.float32, "cpu", requires_grad=True)

    def block(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
        return out * 2 + lse.unsqueeze(-1).sigmoid()

    compiled = torch.compile(block, fullgraph=True)
    y, y_eager = compiled(q, k, v), block(q, k, v)
    assert torch.allclose(y, y_eager, atol=1e-6, rtol=0)
    go = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (q, k, v), go), torch.autograd.grad(y_eager, (q, k, v), go)
    ):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    sdpa = torch.compile(
        lambda q, k, v: gF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        fullgraph=True,
    )
    assert torch.allclose(
        sdpa(q, k, v),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        atol=1e-5,
        rtol=0,
    )


def test_double_backward_is_a_clear_error():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, torch.float64, "cpu", requires_grad=True)
    (g,) = torch.autograd.grad(flash_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


# ---- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(device):
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32"):
        flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(
        ValueError,
        match=r"query heads \(4\) must be a multiple of the number of "
        r"key/value heads \(3\)",
    ):
        k3 = torch.randn(2, 3, 8, 16, device=device)
        flash_attention(q, k3, k3)
    with pytest.raises(ValueError, match="share the head dim"):
        flash_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="must be 4-D"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="layout must be"):
        flash_attention(q, k, v, layout="bld")


def test_bad_cu_seqlens_raise_clear_errors(device):
    q = torch.randn(10, 2, 16, device=device)
    k = torch.randn(12, 2, 16, device=device)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    good_k = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    run = lambda cq, ck, mq=6, mk=7: flash_attention_varlen(q, k, k, cq, ck, mq, mk)  # noqa: E731
    run(good, good_k)
    with pytest.raises(ValueError, match="int32"):
        run(good.long(), good_k)
    with pytest.raises(ValueError, match="non-decreasing"):
        run(torch.tensor([0, 6, 4], dtype=torch.int32, device=device), good_k)
    with pytest.raises(ValueError, match="same length"):
        run(good, torch.tensor([0, 12], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="start at 0"):
        run(torch.tensor([1, 4, 10], dtype=torch.int32, device=device), good_k)
    with pytest.raises(ValueError, match=r"last entry of cu_seqlens_q \(11\) exceeds"):
        run(torch.tensor([0, 5, 11], dtype=torch.int32, device=device), good_k, 6)
    with pytest.raises(ValueError, match="more than max_seqlen_k = 6"):
        run(good, good_k, 6, 6)
    # The CPU op checks the same on its own (for callers that bypass the Python wrapper); the CUDA
    # op trusts cu_seqlens as flash-attn does, since reading them would cost a device sync.
    if device != "cpu":
        return
    with pytest.raises(ValueError, match="non-decreasing"):
        FWD(
            q[None],
            k[None],
            k[None],
            torch.tensor([0, 6, 4], dtype=torch.int32, device=device),
            good_k,
            None,
            6,
            7,
            0.25,
            False,
            True,
        )
    with pytest.raises(ValueError, match="seqused_k"):
        FWD(
            q[None],
            k[None],
            k[None],
            good,
            good_k,
            torch.tensor([5, 9], dtype=torch.int32, device=device),
            6,
            7,
            0.25,
            False,
            True,
        )


@pytest.mark.cuda
def test_device_mismatch_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to put the tensors on two devices")
    q = torch.randn(1, 2, 8, 16, device="cuda")
    with pytest.raises(RuntimeError, match="one device"):
        flash_attention(q, q.cpu(), q.cpu())


# ---- CUDA-specific ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("d", [260, 36])
def test_cuda_head_dim_limit(d):
    q, k, v = make_qkv(1, 2, 2, 16, 16, d, torch.float16, "cuda")
    with pytest.raises(ValueError, match="multiple of 8 and at most 256"):
        flash_attention(q, k, v)
    # the drop-in falls back to PyTorch instead
    want = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(gF.scaled_dot_product_attention(q, k, v), want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_deterministic_backward_is_bit_identical(dtype):
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, dtype, "cuda")
    go = torch.randn_like(q)

    def run():
        *_, gq, gk, gv = grads(
            lambda q, k, v: flash_attention(q, k, v, causal=True, deterministic=True), q, k, v, go
        )
        return gq, gk, gv

    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_memory_is_linear_in_length():
    # no (L, L) tensor: forward + backward at L = 16384 must stay far below L^2 * 2 bytes (512 MiB)
    q, k, v = make_qkv(1, 1, 1, 16384, 16384, 64, torch.float16, "cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20


# ---- NaN and inf --------------------------------------------------------------------------------


def _poke(t, index, value):
    t = t.clone()
    t[index] = value
    return t


NAN, INF = float("nan"), float("inf")
# (name, change of (q, k, v, scale)); q, k, v are (1, 2, 67, 16), (1, 2, 70, 16): two key tiles
NONFINITE = {
    "nan-q": lambda q, k, v, s: (_poke(q, (0, 0, 3, 1), NAN), k, v, s),
    # key 68 is in the second tile; with causal only the last two queries see it
    "nan-k": lambda q, k, v, s: (q, _poke(k, (0, 1, 68, 2), NAN), v, s),
    "inf-q": lambda q, k, v, s: (_poke(q, (0, 1, 10, 5), INF), k, v, s),
    # every score of row 10 is -inf (k >= 0): no NaN, a row of zeros as for no visible key
    "all-scores-minus-inf": lambda q, k, v, s: (_poke(q, (0, 1, 10), -INF), k.abs(), v, s),
    "nan-scale": lambda q, k, v, s: (q, k, v, NAN),
    "inf-scale": lambda q, k, v, s: (q, k, v, INF),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_give_nan_where_the_reference_does(device, case, causal, dtype):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float32 covers the CPU kernel; float16 runs the CUDA tensor-core kernel")
    q, k, v = (t.double() for t in make_qkv(1, 2, 2, 67, 70, 16, dtype, "cpu"))
    q, k, v, scale = NONFINITE[case](q, k, v, 0.25)
    ref, ref_lse = reference.attention_reference(q, k, v, causal, scale, return_lse=True)
    if not causal:  # PyTorch's SDPA agrees where no mask is involved
        pt = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert torch.equal(pt.isnan(), ref.isnan())
    qd, kd, vd = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    out, lse = flash_attention(qd, kd, vd, causal=causal, scale=scale, return_lse=True)
    assert ref.isnan().any() or case == "all-scores-minus-inf"
    assert_nan_where_reference(out.cpu(), ref, 2e-5 if dtype == torch.float32 else 2e-3)
    assert torch.equal(lse.isnan().cpu(), ref.isnan().any(-1))  # lse NaN with its row
    assert torch.equal(lse.isneginf().cpu(), ref_lse.isneginf())


@pytest.mark.parametrize("case", ["nan-q", "nan-k", "inf-q", "nan-scale"])
def test_nan_gradients_where_the_reference_has_them(device, case):
    # without a mask: with one, the reference's dense products multiply masked zeros by NaN
    q, k, v = make_qkv(1, 2, 2, 67, 70, 16, torch.float64, "cpu")
    q, k, v, scale = NONFINITE[case](q, k, v, 0.25)
    go = torch.randn(1, 2, 67, 16, dtype=torch.float64)
    ref = grads(lambda q, k, v: reference.attention_reference(q, k, v, scale=scale), q, k, v, go)
    pt = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), q, k, v, go)
    assert all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(ref[2:], pt[2:]))
    dev = [t.to(device=device, dtype=torch.float32) for t in (q, k, v, go)]
    ours = grads(lambda q, k, v: flash_attention(q, k, v, scale=scale), *dev)
    for name, o, r in zip(("out", "dq", "dk", "dv"), ours[:1] + ours[2:], ref[:1] + ref[2:]):
        assert r.isnan().any(), name
        assert torch.equal(o.isnan().cpu(), r.isnan()), name


def test_inf_in_v_propagates_like_the_reference(device):
    # without a mask every weight is positive: column 3 of every output row is +inf
    q, k, v = make_qkv(1, 2, 2, 67, 70, 16, torch.float64, "cpu")
    v = _poke(v, (0, 0, 5, 3), INF)
    ref, ref_lse = reference.attention_reference(q, k, v, return_lse=True)
    out, lse = flash_attention(*(t.to(device, torch.float32) for t in (q, k, v)), return_lse=True)
    assert ref[0, 0, :, 3].isposinf().all() and not ref.isnan().any()
    assert_nan_where_reference(out.cpu(), ref, 2e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-5, rtol=0)


# ---- meta tensors, the fake kernels' checks, degenerate sizes ---------------------------------


def _varlen_args():
    """A varlen call of the forward op with every optional tensor given: (1, L, H, D) views."""
    q, k, v = (t.transpose(1, 2) for t in make_qkv(1, 4, 2, 10, 12, 16, torch.float32, "cpu"))
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    used = torch.tensor([5, 6], dtype=torch.int32)
    return (q, k, v, cu_q, cu_k, used, 6, 7, 0.25, True, True)


FWD_TENSORS = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k"]
BWD_TENSORS = ["grad_out", "q", "k", "v", "out", "lse"] + FWD_TENSORS[3:]


def _backward_args():
    args = _varlen_args()
    out, lse = FWD(*args)
    return (torch.randn_like(out), *args[:3], out, lse, *args[3:])


@pytest.mark.parametrize("i", range(6), ids=FWD_TENSORS)
def test_forward_meta_tensor_beside_cpu_ones_raises(i):
    args = with_one_on_meta(_varlen_args(), i)
    with pytest.raises(RuntimeError, match="flash_attention_forward: .*is on (meta|cpu) but"):
        FWD(*args)


@pytest.mark.parametrize("i", range(9), ids=BWD_TENSORS)
def test_backward_meta_tensor_beside_cpu_ones_raises(i):
    args = with_one_on_meta(_backward_args(), i)
    with pytest.raises(RuntimeError, match="flash_attention_backward: .*is on (meta|cpu) but"):
        BWD(*args)


def test_all_meta_inputs_give_shapes():
    args = _varlen_args()
    out, lse = FWD(*all_on_meta(args))
    assert out.device.type == "meta" and out.shape == args[0].shape and lse.shape == (1, 4, 10)
    bargs = _backward_args()
    dq, dk, dv = BWD(*all_on_meta(bargs))
    assert (dq.shape, dk.shape, dv.shape) == (bargs[1].shape, bargs[2].shape, bargs[3].shape)
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, torch.float64, "meta")
    assert flash_attention(q, k, v, causal=True).shape == (2, 4, 5, 8)


def _bad_forward_args():
    """(name, arguments of the forward op) that the C++ checks reject."""
    q, k, v, cu_q, cu_k, used, *rest = _varlen_args()
    dense = (q, k, v, None, None, None, 0, 0, 0.25, False, True)
    three = torch.randn(1, 12, 3, 16)
    return {
        "int64 q": (q.long(), k.long(), v.long(), *dense[3:]),
        "dtypes differ": (q, k.double(), v, *dense[3:]),
        "rank 3": (q[0], k[0], v[0], *dense[3:]),
        "head dims differ": (q, k[..., :8], v[..., :8], *dense[3:]),
        "k and v differ": (q, k, v[:, :5], *dense[3:]),
        "batch differs": (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), *dense[3:]),
        "heads not a multiple": (q, three, three, *dense[3:]),
        "no kv heads": (q, k[:, :, :0], v[:, :, :0], *dense[3:]),
        "head dim 0": (q[..., :0], k[..., :0], v[..., :0], *dense[3:]),
        "cu_seqlens_q alone": (q, k, v, cu_q, None, None, *rest),
        "varlen batch 2": (
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v,
            cu_q,
            cu_k,
            None,
            *rest,
        ),
        "cu_seqlens_q int64": (q, k, v, cu_q.long(), cu_k, None, *rest),
        "cu_seqlens_k too short": (q, k, v, cu_q, cu_k[:2], None, *rest),
        "cu_seqlens_q 2-D": (q, k, v, cu_q[None], cu_k, None, *rest),
        "max_seqlen negative": (q, k, v, cu_q, cu_k, None, -1, 7, *rest[2:]),
        "max_seqlen past int32": (q, k, v, cu_q, cu_k, None, 6, 2**31, *rest[2:]),
        "seqused_k too long": (q, k, v, cu_q, cu_k, torch.zeros(3, dtype=torch.int32), *rest),
        "seqused_k float": (q, k, v, cu_q, cu_k, used.float(), *rest),
    }


@pytest.mark.parametrize("case", list(_bad_forward_args()))
def test_fake_forward_raises_as_the_kernel_does(case):
    args = _bad_forward_args()[case]
    same_error(lambda: FWD(*args), lambda: FWD(*all_on_meta(args)))


@pytest.mark.parametrize("case", ["grad_out shape", "out dtype", "lse shape", "lse dtype"])
def test_fake_backward_raises_as_the_kernel_does(case):
    go, q, k, v, out, lse, *rest = _backward_args()
    change = {
        "grad_out shape": lambda: (go[:, :5], q, k, v, out, lse),
        "out dtype": lambda: (go, q, k, v, out.double(), lse),
        "lse shape": lambda: (go, q, k, v, out, lse[:, :2]),
        "lse dtype": lambda: (go, q, k, v, out, lse.half()),
    }[case]
    args = (*change(), *rest)
    same_error(lambda: BWD(*args), lambda: BWD(*all_on_meta(args)))


def test_head_dim_zero_is_a_value_error():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 0, torch.float32, "cpu")
    for t in ("cpu", "meta"):
        with pytest.raises(ValueError, match="flash_attention: head dim must be positive"):
            flash_attention(q.to(t), k.to(t), v.to(t))
        with pytest.raises(ValueError, match="flash_attention_forward: head dim must be positive"):
            flash_attention(q.to(t), k.to(t), v.to(t), scale=0.5)  # the op's own check
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="flash_attention_varlen: head dim must be positive"):
        x = torch.randn(3, 2, 0)  # (total, H, D)
        flash_attention_varlen(x, x, x, cu, cu, 3, 3)


@pytest.mark.parametrize("bad", [2**63, 2**31, -1])
@pytest.mark.parametrize("which", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_out_of_range_is_a_clear_error(which, bad):
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    kw = {"max_seqlen_q": 6, "max_seqlen_k": 6, which: bad}
    with pytest.raises(
        ValueError, match=rf"flash_attention_varlen: {which} must be in \[0, 2\*\*31 - 1\]"
    ):
        flash_attention_varlen(q, q, q, cu, cu, **kw)


def test_max_seqlen_takes_integers_of_any_kind():
    # numpy integers and 0-dim integer tensors are ints (operator.index), as before the range check
    np = pytest.importorskip("numpy")
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want = flash_attention_varlen(q, q, q, cu, cu, 6, 6)
    for n in (np.int64(6), np.int32(6), torch.tensor(6)):
        torch.testing.assert_close(flash_attention_varlen(q, q, q, cu, cu, n, n), want)
    for bad in (6.0, True, "6"):
        with pytest.raises(TypeError, match="flash_attention_varlen: max_seqlen_q must be an int"):
            flash_attention_varlen(q, q, q, cu, cu, bad, 6)


def test_cu_seqlens_on_another_device_is_a_runtime_error():
    # a device mismatch is a RuntimeError everywhere (the C++ checks, the fake kernels)
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="flash_attention_varlen: cu_seqlens_k is on meta"):
        flash_attention_varlen(q, q, q, cu, cu.to("meta"), 6, 6)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_large_scores_match_reference(causal, dtype):
    # scores of a few hundred: exp overflows unless every row's maximum is taken over all its
    # visible scores, in whatever lane they lie; 101 and 200 rows span several tiles, and 101
    # leaves rows past the last whole vector of rows at every lane count (the kernel itself,
    # without the routing to SDPA)
    g = torch.Generator().manual_seed(3)
    b, h, lq, lk, d = 2, 3, 101, 200, 24
    q, k, v = (
        (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) * 4).to(dtype)
        for n in (lq, lk, lk)
    )
    out, lse = torch.ops.genext.flash_attention_forward(
        q, k, v, None, None, None, 0, 0, 1.0, causal, True
    )
    r_out, r_lse = reference.attention_reference(
        *(t.double().transpose(1, 2) for t in (q, k, v)),
        causal,
        1.0,
        bottom_right=True,
        return_lse=True,
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert float(r_lse.abs().max()) > 200  # the scores are large indeed
    # scores of hundreds carry rounding errors of about 1e-5 in float32: the bound is twice the
    # error of PyTorch's math in the same dtype plus a little (in float64 that math is the
    # reference itself, so the bound is the slack alone)
    t_out, t_lse = reference.attention_reference(
        *(t.transpose(1, 2) for t in (q, k, v)), causal, 1.0, bottom_right=True, return_lse=True
    )
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert max_err(out.transpose(1, 2), r_out) <= 2 * max_err(t_out, r_out) + slack
    assert max_err(lse, r_lse) <= 2 * max_err(t_lse, r_lse) + slack


def test_scale_errors_name_the_op():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="flash_attention: scale .* out of the range of a float"):
        flash_attention(q, k, v, scale=10**400)
    with pytest.raises(TypeError, match="flash_attention: scale must be a float or None"):
        flash_attention(q, k, v, scale="big")
    assert torch.isfinite(flash_attention(q, k, v, scale=-(2**63))).all()  # huge but a float


@pytest.mark.parametrize(
    "sizes",
    [(0, 2, 2, 5, 7), (1, 2, 2, 0, 7), (1, 2, 2, 5, 0), (1, 0, 2, 5, 7), (1, 0, 2, 0, 0)],
    ids=["B0", "Lq0", "Lk0", "Hq0", "all0"],
)
def test_empty_sizes_give_empty_or_zero_results(device, sizes):
    b, hq, hk, lq, lk = sizes
    q, k, v = make_qkv(b, hq, hk, lq, lk, 8, torch.float32, device, requires_grad=True)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, hq, lq)
    assert torch.equal(out, torch.zeros_like(out))  # Lk = 0: no key, zeros
    assert lse.isneginf().all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


def test_torch_compile_dynamic_shapes():
    # the fake kernels' checks run on symbolic sizes: guards, no specialisation errors
    f = torch.compile(
        lambda q, k, v: flash_attention(q, k, v, causal=True, return_lse=True),
        fullgraph=True,
        dynamic=True,
    )
    for length in (17, 40):
        q, k, v = make_qkv(2, 4, 2, length, length + 3, 16, torch.float32, "cpu")
        out, lse = f(q, k, v)
        want, want_lse = flash_attention(q, k, v, causal=True, return_lse=True)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


# ---- CPU backward: one pass, two passes, threads ----------------------------------------------

# (B, Hq, Hk, Lq, Lk, D, causal, runs): how the one-pass backward cuts the key tiles of a sequence
# (at least 16 tasks of sequence x KV head x run): several runs (dQ from partial sums added in run
# order) or one (dQ written directly, bit-identical to the two passes).
ONE_PASS_CASES = [
    (1, 2, 2, 150, 200, 40, True, "runs"),  # 4 key tiles in 4 runs; causal, odd lengths
    (1, 4, 1, 65, 129, 8, False, "runs"),  # MQA, 3 key tiles in 3 runs; tile tails of one row
    (4, 4, 4, 70, 129, 24, False, "one run"),  # 16 (sequence, KV head) tasks: one run each
    (2, 8, 8, 33, 65, 72, True, "one run"),  # causal, Lq < Lk
]


def _backward(q, k, v, go, causal, two_pass, monkeypatch):
    if two_pass:
        monkeypatch.setenv("GENEXT_FLASH_CPU_TWO_PASS", "1")
    else:
        monkeypatch.delenv("GENEXT_FLASH_CPU_TWO_PASS", raising=False)
    return grads(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, go)[2:]


@pytest.mark.parametrize(
    "case",
    thin(ONE_PASS_CASES, 2),
    ids=[f"L{c[3]}x{c[4]}-D{c[5]}-{c[7]}" for c in ONE_PASS_CASES],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_one_pass_backward_matches_two_passes_and_reference(case, dtype, monkeypatch):
    b, hq, hk, lq, lk, d, causal, runs = case
    q, k, v = make_qkv(b, hq, hk, lq, lk, d, dtype, "cpu")
    go = torch.randn(b, hq, lq, d, dtype=torch.float64).to(dtype)
    one = _backward(q, k, v, go, causal, False, monkeypatch)
    two = _backward(q, k, v, go, causal, True, monkeypatch)
    ref_fn = lambda q, k, v: reference.attention_reference(  # noqa: E731
        q, k, v, causal, None, bottom_right=True
    )
    ref = grads(ref_fn, q.double(), k.double(), v.double(), go.double())[2:]
    pt = grads(ref_fn, q, k, v, go)[2:] if dtype not in ATOL else [None] * 3
    for name, o, t, p, r in zip(("dq", "dk", "dv"), one, two, pt, ref):
        check_against_reference(o, p, r, dtype, name)
        if runs == "one run" or name != "dq":
            # dK, dV (and dQ from one run) are summed in the same order as by the two passes
            assert torch.equal(o, t), f"{name}: one pass differs from two passes"
        else:  # dQ's partial sums: another order, same value
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
            assert max_err(o, t) <= tol * max(1.0, t.double().abs().max().item())


def test_cpu_one_pass_backward_varlen_matches_two_passes(monkeypatch):
    # packed sequences with a sequence without keys, one without queries, rows of no sequence;
    # 2 sequences x 2 KV heads: several runs per sequence
    lq, lk = [70, 0, 5, 130], [150, 9, 0, 66]
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    q = torch.randn(sum(lq) + 2, 4, 40, dtype=torch.float64)
    k, v = (torch.randn(sum(lk) + 1, 2, 40, dtype=torch.float64) for _ in range(2))
    go = torch.randn_like(q)
    fn = lambda q, k, v: flash_attention_varlen(  # noqa: E731
        q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True
    )
    res = []
    for two_pass in (False, True):
        monkeypatch.setenv("GENEXT_FLASH_CPU_TWO_PASS", "1" if two_pass else "0")
        res.append(grads(fn, q, k, v, go)[2:])
    for o, t in zip(*res):
        assert torch.isfinite(o).all()
        assert max_err(o, t) <= 1e-12
    assert torch.equal(res[0][0][sum(lq) :], torch.zeros(2, 4, 40, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_are_bit_identical_across_runs_and_thread_counts(dtype):
    # large enough (about 90 tile pairs) for genext::cpu::parallel_for to wake a second thread;
    # causal GQA with several key-tile runs per (sequence, KV head)
    q, k, v = make_qkv(1, 2, 1, 400, 333, 64, dtype, "cpu")
    go = torch.randn(1, 2, 400, 64).to(dtype)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        base = grads(fn, q, k, v, go)
        torch.set_num_threads(2)
        launches = genext._C._cpu_team_launches()
        runs = [grads(fn, q, k, v, go) for _ in range(2)]
        two_threads = torch.get_num_threads() == 2
        woke = genext._C._cpu_team_launches() > launches
    finally:
        torch.set_num_threads(threads)
    assert woke or not two_threads, "the 2-thread runs never woke a second thread"
    for res in runs:
        for name, a, b_ in zip(("out", "lse", "dq", "dk", "dv"), base, res):
            assert a is None or torch.equal(a, b_), f"{name} differs"


@pytest.fixture(autouse=True)
def _genext_kernel_rule(monkeypatch):
    """The AVX2 machines' routing rule for every test here: they check genext's own kernel, which
    a machine with AMX would skip for most of their shapes. Tests of the rule set their own."""
    set_attention_routing(monkeypatch, avx512=False, amx=False)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls of PyTorch's SDPA where flash_attention hands a call to it."""
    calls = []
    original = OPS_MODULE._torch_sdpa

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(OPS_MODULE, "_torch_sdpa", counting)
    return calls


@pytest.fixture
def avx512_amx_routing(monkeypatch):
    """The routing rule of a machine where genext runs its AVX-512 kernels and has AMX."""
    set_attention_routing(monkeypatch, avx512=True, amx=True)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_float32_forward_without_gradients_runs_torch_sdpa_where_faster(
    layout, causal, sdpa_calls, avx2_routing
):
    # float32, D 64, no gradient: flash_attention hands the call to PyTorch's SDPA (faster there)
    calls = sdpa_calls
    q, k, v = make_qkv(2, 4, 2, 70, 70, 64, torch.float32, "cpu")
    ref = reference.attention_reference(q.double(), k.double(), v.double(), causal, 0.3)
    assert cpu_forward_prefers_torch(q, k, v)
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, scale=0.3, layout=layout)
    assert len(calls) == 1
    assert out.shape == q.shape
    if layout == "blhd":
        out = out.transpose(1, 2)
    assert max_err(out, ref) <= ATOL[torch.float32]
    # genext's kernel: with lse, bottom-right causal with Lq != Lk, gradients, bfloat16, D 16
    flash_attention(q, k, v, causal=causal, scale=0.3, layout=layout, return_lse=True)
    flash_attention(q[..., :16], k[..., :16], v[..., :16], causal=causal, layout=layout)
    flash_attention(*(t.bfloat16() for t in (q, k, v)), causal=causal, layout=layout)
    flash_attention(q.requires_grad_(), k, v, causal=causal, layout=layout)
    if causal:
        cut = (slice(None), slice(None), slice(0, 40))
        qc = q[cut] if layout == "bhld" else q.transpose(1, 2)[cut].transpose(1, 2)
        flash_attention(qc.detach(), k, v, causal=True, layout=layout)
    assert len(calls) == 1


@pytest.mark.parametrize("machine", ["avx2_routing", "avx512_amx_routing"])
def test_cpu_routing_keeps_genext_for_odd_scales_and_user_backend_choices(machine, request):
    request.getfixturevalue(machine)
    # PyTorch's CPU flash kernel gives NaN rows for a negative scale under a causal mask, and a
    # user's sdpa_kernel context may switch its flash backend off: genext's kernel runs then
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_qkv(1, 2, 2, 32, 32, 64, torch.float32, "cpu")
    assert cpu_forward_prefers_torch(q, k, v, 0.125)
    for scale in (-0.125, 0.0, math.inf):
        assert not cpu_forward_prefers_torch(q, k, v, scale)
    out = flash_attention(q, k, v, causal=True, scale=-0.125)
    ref = reference.attention_reference(q.double(), k.double(), v.double(), True, -0.125)
    assert max_err(out, ref) <= ATOL[torch.float32]
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            assert not cpu_forward_prefers_torch(q, k, v)
            out = flash_attention(q, k, v, layout="blhd")
        assert out.is_contiguous()
        ref = reference.attention_reference(
            *(t.transpose(1, 2).double() for t in (q, k, v)), False, None
        ).transpose(1, 2)
        assert max_err(out, ref) <= ATOL[torch.float32]


def test_cpu_routing_rule_takes_any_arguments(avx2_routing):
    # the rule runs in C++ before the ops check their arguments: anything it cannot read leaves
    # the call to genext's kernel, whose checks raise the usual errors, and no Python error is
    # left set behind (a SystemError, or an error surfacing later in unrelated code)
    q, k, v = make_qkv(1, 2, 2, 32, 32, 64, torch.float32, "cpu")

    class Proxy:  # an object whose isinstance test raises
        @property
        def __class__(self):
            raise RuntimeError("no target")

    class BadFlag:
        def __bool__(self):
            raise ValueError("no truth value")

    for args in ((Proxy(), k, v), (q, Proxy(), v), (q, k, "v"), (q[0], k, v)):
        assert not cpu_forward_prefers_torch(*args)
        with pytest.raises((AttributeError, RuntimeError, ValueError, TypeError)):
            flash_attention(*args)
    assert not cpu_forward_prefers_torch(q, k, v, "0.125")
    assert not cpu_forward_prefers_torch(q, k, v, torch.ones(2))
    assert not cpu_forward_prefers_torch(q, k, v, 10**400)
    assert not cpu_forward_prefers_torch(q, k, v, None, BadFlag())
    with pytest.raises(ValueError, match="no truth value"):
        flash_attention(q, k, v, causal=BadFlag())
    # what float() takes routes as that number: a 0-dim tensor, an int, a numpy float
    for scale in (torch.tensor(0.125), 1, np.float32(0.125)):
        assert cpu_forward_prefers_torch(q, k, v, scale)
    want = flash_attention(q, k, v, scale=0.125, return_lse=True)[0]
    assert max_err(flash_attention(q, k, v, scale=torch.tensor(0.125)), want) <= 1e-5


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_cpu_eager_gradients_record_one_autograd_node(layout):
    # an eager call with gradients is one autograd node straight to q, k, v (for bhld after the
    # output's transpose; no transposes of the inputs: per-call cost at small shapes); its
    # gradients match the reference; the output is saved for the backward, so changing it in
    # place is autograd's usual error
    q, k, v = make_qkv(2, 4, 2, 19, 23, 24, torch.float64, "cpu")
    go = torch.randn(2, 4, 19, 24, dtype=torch.float64)
    if layout == "blhd":
        q, k, v, go = (t.transpose(1, 2) for t in (q, k, v, go))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=True, scale=0.4, layout=layout)
    node = out.grad_fn if layout == "blhd" else out.grad_fn.next_functions[0][0]
    nodes = [fn for fn, _ in node.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in nodes] == ["AccumulateGrad"] * 3
    assert [fn.variable for fn in nodes] == [q, k, v]
    got = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    t = (lambda x: x) if layout == "bhld" else (lambda x: x.transpose(1, 2))
    ref_out = reference.attention_reference(t(q), t(k), t(v), True, 0.4, bottom_right=True)
    ref = torch.autograd.grad(ref_out, (q, k, v), t(go))
    assert max_err(out, t(ref_out)) <= 1e-12
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        assert max_err(a, r) <= 1e-12, name
    with torch.no_grad():
        out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, (q, k, v), go)


def test_cpu_eager_backward_sees_inputs_changed_in_place():
    # the saved views share q's version counter: a q changed after the forward is an error, not
    # a silently wrong gradient
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    q2 = q * 1.0
    out = flash_attention(q2, k, v)
    with torch.no_grad():
        q2.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [4, 13, 31])
def test_cpu_padding_columns_are_zero_after_nan_calls(dtype, d):
    # the kernel's scratch is not zeroed: a call on NaN inputs leaves NaN in freed memory the next
    # call may get back; head dims off the vector width (padding columns), forward and backward
    nan = make_qkv(2, 2, 2, 70, 70, 32, dtype, "cpu")
    for t in nan:
        t.fill_(float("nan"))
    grads(lambda q, k, v: flash_attention(q, k, v, causal=True), *nan, torch.ones_like(nan[0]))
    q, k, v = make_qkv(2, 2, 2, 70, 66, d, dtype, "cpu")
    go = torch.randn(2, 2, 70, d, dtype=torch.float64).to(dtype)
    ours = grads(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v, go)
    ref_fn = lambda q, k, v: reference.attention_reference(  # noqa: E731
        q, k, v, True, None, bottom_right=True
    )
    ref = grads(ref_fn, q.double(), k.double(), v.double(), go.double())
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        if a is not None:
            tol = (ATOL_GRAD if name.startswith("d") else ATOL)[dtype]
            assert max_err(a, r) <= tol, name


def _assert_float32_matches_reference(out, q, k, v, go, causal, scale):
    """out = attention(q, k, v) in float32 and its gradients for go match the float64 reference."""
    got = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_reference(qd, kd, vd, causal, scale)
    want = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    assert max_err(out, ref) <= ATOL[torch.float32]
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= ATOL_GRAD[torch.float32], name


def test_cpu_float32_gradients_run_torch_sdpa_only_where_faster(monkeypatch, avx2_routing):
    # with gradients, non-causal attention at D >= 160, at D >= 128 over 512+ keys, or at D >= 64
    # over 2048+ keys goes to PyTorch's SDPA, faster there; causal, shorter or narrower calls,
    # and calls whose causality the rule is not told, stay with genext
    spy = mock.Mock(wraps=OPS_MODULE._torch_sdpa)
    monkeypatch.setattr(OPS_MODULE, "_torch_sdpa", spy)
    q, k, v = make_qkv(1, 2, 1, 8, 1024, 128, torch.float32, "cpu", requires_grad=True)
    assert cpu_forward_prefers_torch(q, k, v, causal=False)
    assert not cpu_forward_prefers_torch(q, k, v, causal=True)
    assert not cpu_forward_prefers_torch(q, k, v)
    assert not cpu_forward_prefers_torch(q[..., :64], k[..., :64], v[..., :64], causal=False)

    def prefers(lk, d, causal=False):
        qp, kp, vp = make_qkv(1, 2, 1, 8, lk, d, torch.float32, "cpu", requires_grad=True)
        return cpu_forward_prefers_torch(qp, kp, vp, None, causal)

    # the boundaries: D >= 160 at any length, D >= 128 from 512 keys, D >= 64 from 2048 keys
    assert prefers(512, 128) and prefers(1024, 128) and prefers(8, 160)
    assert not prefers(511, 128) and not prefers(512, 127) and not prefers(8, 159)
    assert not prefers(1024, 80) and not prefers(8, 160, causal=True)
    assert not prefers(512, 128, causal=True)
    go = torch.randn(1, 2, 8, 128)
    out = flash_attention(q, k, v, scale=0.1)
    assert spy.call_count == 1
    _assert_float32_matches_reference(out, q, k, v, go, False, 0.1)
    flash_attention(q, k, v, causal=True)
    flash_attention(q[..., :64], k[..., :64], v[..., :64])
    assert spy.call_count == 1
    q2, k2, v2 = make_qkv(1, 1, 1, 8, 2048, 64, torch.float32, "cpu", requires_grad=True)
    flash_attention(q2, k2, v2)
    assert spy.call_count == 2
    # the drop-in passes is_causal to the rule
    assert gF.sdpa_backend(q2, k2, v2) == "torch"
    assert gF.sdpa_backend(q2, k2, v2, is_causal=True) == "genext"
    # D 160 with few keys (a U-Net's lowest level): PyTorch's when not causal, with the same
    # gradients as the reference; causal stays with genext
    q3, k3, v3 = make_qkv(2, 2, 1, 9, 9, 160, torch.float32, "cpu", requires_grad=True)
    go3 = torch.randn(2, 2, 9, 160)
    for causal, calls in ((False, 3), (True, 3)):
        out = flash_attention(q3, k3, v3, causal=causal)
        assert spy.call_count == calls
        _assert_float32_matches_reference(out, q3, k3, v3, go3, causal, None)


def test_cpu_routing_on_avx512_with_amx(monkeypatch, avx512_amx_routing):
    # genext's AVX-512 float32 kernel and its float32-computed bfloat16 lose to PyTorch's SDPA
    # (AVX-512 GEMMs, AMX for bfloat16) on such a machine: float32 that is not causal goes there
    # at every head dim and length but over key counts that leave PyTorch a long tail, and so
    # does causal float32 over fewer than 128 keys; bfloat16 forwards at every head dim, bfloat16
    # with gradients (not causal) from D 32 over 512 keys
    def prefers(lk, d, dtype=torch.float32, grad=False, causal=False):
        q, k, v = make_qkv(1, 2, 1, 8, lk, d, dtype, "cpu", requires_grad=grad)
        return cpu_forward_prefers_torch(q, k, v, None, causal)

    assert prefers(7, 32) and prefers(80, 40) and prefers(8, 32, grad=True)
    assert prefers(80, 40, grad=True) and prefers(8, 160, grad=True)
    assert prefers(1024, 31) and prefers(1024, 31, grad=True) and prefers(4, 2)
    assert prefers(256, 1, grad=True)
    # a ragged key count (lk % 16 at least lk / 16, over more than 16 keys, more than 32 with
    # gradients) at D <= 128 stays with genext: a text encoder's 77 tokens, say
    assert not prefers(77, 40) and not prefers(77, 40, grad=True) and not prefers(77, 128)
    assert not prefers(77, 40, causal=None) and not prefers(18, 8) and not prefers(154, 64)
    assert not prefers(35, 64, grad=True) and not prefers(63, 40) and prefers(31, 64, grad=True)
    assert not prefers(120, 2) and not prefers(60, 1, grad=True)
    assert prefers(77, 129) and prefers(77, 160, grad=True) and prefers(16, 40) and prefers(17, 8)
    assert prefers(20, 40, grad=True) and prefers(32, 64, grad=True) and prefers(33, 64)
    # without gradients, from 8 keys at head dims up to 64 (a row that is all tail)
    assert not prefers(8, 32) and not prefers(15, 40) and not prefers(12, 8) and not prefers(8, 64)
    assert prefers(7, 64) and prefers(8, 65) and prefers(15, 80) and prefers(16, 8)
    assert prefers(12, 8, grad=True) and prefers(15, 64, grad=True)
    assert prefers(100, 40) and prefers(255, 40) and prefers(256, 40) and prefers(1000, 64)
    # causal from 128 keys (genext's kernel measured faster there), and with gradients a
    # causality not told; causal over fewer keys goes to PyTorch, with gradients too
    assert not prefers(1024, 64, causal=True) and not prefers(1024, 64, grad=True, causal=True)
    assert not prefers(128, 8, causal=True) and not prefers(128, 8, grad=True, causal=True)
    assert prefers(127, 8, causal=True) and prefers(127, 64, grad=True, causal=True)
    assert prefers(1, 160, causal=True)
    assert not prefers(1024, 64, grad=True, causal=None) and prefers(1024, 64, causal=None)
    assert not prefers(64, 64, grad=True, causal=None)
    bf = torch.bfloat16
    assert prefers(8, 32, bf) and prefers(77, 40, bf) and prefers(1024, 31, bf)
    assert prefers(256, 2, bf) and prefers(256, 16, bf, causal=True)
    assert prefers(512, 32, bf, grad=True) and not prefers(511, 32, bf, grad=True)
    assert not prefers(1024, 31, bf, grad=True) and not prefers(4096, 8, bf, grad=True)
    assert not prefers(512, 64, bf, grad=True, causal=True)
    assert not prefers(512, 64, bf, grad=True, causal=None)
    # float16: forwards not causal, or causal over few keys; never with gradients
    hf = torch.float16
    assert prefers(1024, 64, hf) and prefers(64, 8, hf) and prefers(127, 160, hf, causal=True)
    assert not prefers(128, 64, hf, causal=True) and not prefers(1024, 64, hf, grad=True)
    assert not prefers(64, 64, hf, grad=True, causal=True) and not prefers(1024, 64, torch.float64)
    # AVX-512 without AMX (not measured): the AVX2 rule, and bfloat16 and float16 stay with genext
    set_attention_routing(monkeypatch, avx512=True, amx=False)
    assert not prefers(77, 40) and prefers(256, 32) and prefers(8, 64)
    assert not prefers(77, 40, grad=True) and not prefers(8, 64, bf)
    assert not prefers(8, 64, torch.float16)
    assert not prefers(1024, 64, bf, grad=True)
    # the AVX2 rule likewise
    set_attention_routing(monkeypatch, avx512=False, amx=False)
    assert not prefers(77, 40) and not prefers(77, 40, grad=True) and not prefers(8, 64, bf)


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_bfloat16_calls_routed_to_sdpa_match_the_reference(
    monkeypatch, avx512_amx_routing, grad
):
    # a routed bfloat16 call (the op and the drop-in) gives PyTorch's result, within bfloat16's
    # tolerance of the float64 reference, gradients included
    op_calls, drop_in_calls = [], []
    torch_sdpa, kept = OPS_MODULE._torch_sdpa, gF._torch_sdpa

    def op_spy(*args, **kwargs):
        op_calls.append(1)
        return torch_sdpa(*args, **kwargs)

    def drop_in_spy(*args, **kwargs):  # the function the drop-in keeps a reference to
        drop_in_calls.append(1)
        return kept(*args, **kwargs)

    monkeypatch.setattr(OPS_MODULE, "_torch_sdpa", op_spy)
    monkeypatch.setattr(gF, "_torch_sdpa", drop_in_spy)
    q, k, v = make_qkv(2, 4, 2, 37, 512, 40, torch.bfloat16, "cpu", requires_grad=grad)
    go = torch.randn(2, 4, 37, 40).bfloat16()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_reference(qd, kd, vd, False, 0.2)
    assert gF.sdpa_backend(q, k, v, enable_gqa=True, scale=0.2) == "torch"
    for fn, calls in (
        (lambda: flash_attention(q, k, v, scale=0.2), op_calls),
        (
            lambda: gF.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True),
            drop_in_calls,
        ),
    ):
        out = fn()
        assert len(calls) == 1 and out.dtype == torch.bfloat16
        assert max_err(out, ref) <= 1.6e-2
        if grad:
            got = torch.autograd.grad(out, (q, k, v), go)
            want = torch.autograd.grad(ref, (qd, kd, vd), go.double(), retain_graph=True)
            for name, a, r in zip(("dq", "dk", "dv"), got, want):
                assert max_err(a, r) <= 3e-2 * max(1.0, r.abs().max().item()), name


def test_cpu_float16_forwards_routed_to_sdpa_match_the_reference(sdpa_calls, avx512_amx_routing):
    # a float16 forward without gradients goes to PyTorch's SDPA and gives its result within
    # float16's tolerance of the float64 reference; with gradients genext's kernel runs
    calls = sdpa_calls
    q, k, v = make_qkv(2, 4, 2, 37, 300, 40, torch.float16, "cpu")
    ref = reference.attention_reference(q.double(), k.double(), v.double(), False, 0.2)
    out = flash_attention(q, k, v, scale=0.2)
    assert len(calls) == 1 and out.dtype == torch.float16
    assert max_err(out, ref) <= 1e-3  # outputs below 1: rounding to float16 is under 5e-4
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(qg, kg, vg, scale=0.2)
    assert len(calls) == 1 and max_err(out, ref) <= 1e-3


def test_cpu_routed_causal_float32_gradients_match_the_reference(sdpa_calls, avx512_amx_routing):
    # causal float32 over few keys goes to PyTorch's SDPA with gradients too, and gives the
    # reference's output and gradients
    q, k, v = make_qkv(2, 4, 2, 40, 40, 24, torch.float32, "cpu", requires_grad=True)
    go = torch.randn(2, 4, 40, 24)
    out = flash_attention(q, k, v, causal=True, scale=0.3)
    assert len(sdpa_calls) == 1
    _assert_float32_matches_reference(out, q, k, v, go, True, 0.3)


def test_cpu_routed_call_keeps_the_input_dtype_under_autocast(avx512_amx_routing):
    # genext's kernel has no autocast rule (float32 in, float32 out); a call routed to SDPA
    # gives the same dtype rather than autocast's bfloat16
    q, k, v = make_qkv(1, 2, 2, 128, 128, 64, torch.float32, "cpu")
    assert cpu_forward_prefers_torch(q, k, v)
    assert not cpu_forward_prefers_torch(q, k, v, causal=True)  # causal: genext's kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = flash_attention(q, k, v)
        kernel = flash_attention(q, k, v, causal=True)
    assert routed.dtype == kernel.dtype == torch.float32
    ref = reference.attention_reference(q.double(), k.double(), v.double(), False, None)
    assert max_err(routed, ref) <= ATOL[torch.float32]
    # bfloat16 inputs under float16 autocast, and autocast switched off inside an enabled block:
    # the inputs' dtype and the bits of the call without autocast
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    assert cpu_forward_prefers_torch(qb, kb, vb)
    plain = flash_attention(qb, kb, vb)
    with torch.autocast("cpu", dtype=torch.float16):
        under = flash_attention(qb, kb, vb)
        with torch.autocast("cpu", enabled=False):
            inner = flash_attention(qb, kb, vb)
    assert under.dtype == inner.dtype == torch.bfloat16
    assert torch.equal(under, plain) and torch.equal(inner, plain)


# ---- torch.func transforms ------------------------------------------------------------------------


def _weighted_sum(out: torch.Tensor) -> torch.Tensor:
    """A scalar of out whose gradient is not all ones (so dq, dk are not trivially small)."""
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * w).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_torch_func_grad_jacrev_vmap_match_torch_sdpa(dtype, causal):
    # grad, jacrev, vmap and vmap of grad over flash_attention give what the same transform over
    # PyTorch's SDPA gives (square, so top-left and bottom-right causal agree; GQA)
    tol = ATOL_GRAD[dtype]
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8, dtype, "cpu")

    def ours(q, k, v):
        return _weighted_sum(flash_attention(q, k, v, causal=causal, scale=0.4))

    def theirs(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.4, enable_gqa=True)
        return _weighted_sum(out)

    got = torch.func.grad(ours, argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(theirs, argnums=(0, 1, 2))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= tol, name
    small = tuple(t[:1, :2, :3, :4] for t in (q, k, v))
    jac = torch.func.jacrev(lambda q: flash_attention(q, *small[1:], causal=causal))(small[0])
    ref = torch.func.jacrev(
        lambda q: F.scaled_dot_product_attention(q, *small[1:], is_causal=causal)
    )(small[0])
    assert jac.shape == ref.shape == (1, 2, 3, 4) * 2
    assert max_err(jac, ref) <= tol
    # a vmapped leading dim over q and v (k shared), through the forward and through grad
    qs, vs = torch.stack([q, 2 * q, -q]), torch.stack([v, v.flip(2), 0.5 * v])
    out = torch.func.vmap(lambda q, v: flash_attention(q, k, v, causal=causal), (0, 0))(qs, vs)
    ref = torch.stack(
        [
            F.scaled_dot_product_attention(a, k, b, is_causal=causal, enable_gqa=True)
            for a, b in zip(qs, vs)
        ]
    )
    assert max_err(out, ref) <= ATOL[dtype]
    got = torch.func.vmap(torch.func.grad(ours, argnums=(0, 1, 2)), (0, None, 0))(qs, k, vs)
    want = torch.func.vmap(torch.func.grad(theirs, argnums=(0, 1, 2)), (0, None, 0))(qs, k, vs)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= tol, name


def test_cpu_torch_func_grad_of_varlen_and_lse_match_eager_autograd():
    # the varlen op and the lse output under torch.func.grad and vmap (per-entry calls there) give
    # what eager autograd gives
    q, k, v = make_qkv(1, 2, 2, 13, 11, 8, torch.float64, "cpu")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (total, H, D)
    cu_q = torch.tensor([0, 6, 13], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 11], dtype=torch.int32)

    def f(q, k, v):
        out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 7, causal=True, return_lse=True)
        return _weighted_sum(out) + lse.sum()

    got = torch.func.grad(f, argnums=(0, 1, 2))(q, k, v)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(f(*leaves), leaves)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= 1e-12, name
    qs = torch.stack([q, -q])
    out = torch.func.vmap(lambda q: flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 7))(qs)
    ref = torch.stack([flash_attention_varlen(a, k, v, cu_q, cu_k, 7, 7) for a in qs])
    assert torch.equal(out, ref)


DOUBLE_BACKWARD = "flash_attention: double backward"


@pytest.mark.parametrize("return_lse", [False, True])
def test_cpu_torch_func_second_derivatives_raise(return_lse):
    # a gradient of genext's gradient (grad of grad, jacrev of jacrev, create_graph through vmap,
    # torch.func.grad over inputs that require grad outside) is a clear error, never a zero
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, torch.float64, "cpu")

    def f(q):
        res = flash_attention(q, k, v, causal=True, return_lse=return_lse)
        return _weighted_sum(res[1].sin() if return_lse else res)

    # first order: what eager autograd gives
    leaf = q.detach().requires_grad_()
    (want,) = torch.autograd.grad(f(leaf), leaf)
    assert max_err(torch.func.grad(f)(q), want) <= 1e-12
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.func.grad(lambda q: torch.func.grad(f)(q).pow(2).sum())(q)
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.func.jacrev(torch.func.jacrev(f))(q)
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.func.vmap(torch.func.grad(lambda q: torch.func.grad(f)(q).pow(2).sum()))(
            torch.stack([q, -q])
        )
    # eager create_graph through a vmapped call (a gradient penalty)
    qs = torch.stack([q, 2 * q]).requires_grad_()
    (g,) = torch.autograd.grad(torch.func.vmap(f)(qs).sum(), qs, create_graph=True)
    assert g.requires_grad
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        g.pow(2).sum().backward()
    # torch.func.grad over a leaf that requires grad: its result carries the eager graph on
    g = torch.func.grad(f)(leaf)
    assert max_err(g, want) <= 1e-12 and g.requires_grad
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("return_lse", [False, True])
def test_cpu_functionalize_and_make_fx_run_the_registered_op(return_lse):
    # torch.func.functionalize (no autograd.Function there) and make_fx over it give eager's
    # results through genext::flash_attention_forward
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = make_qkv(1, 2, 1, 5, 7, 8, torch.float32, "cpu")

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True, return_lse=return_lse)

    want = f(q, k, v)
    got = torch.func.functionalize(f)(q, k, v)
    gm = make_fx(torch.func.functionalize(f))(q, k, v)
    traced = gm(q, k, v)
    for a in (got, traced):
        for x, y in zip(a, want) if return_lse else ((a, want),):
            assert torch.equal(x, y)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "genext.flash_attention_forward.default" in targets
