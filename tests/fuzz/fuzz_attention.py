"""Fuzz cases of flash_attention, flash_attention_varlen and the SDPA drop-in: sizes with 0 and 1
in every dimension, grouped heads, both layouts, every stride pattern, causal with more queries
than keys, NaN/inf in q, k, v and the scale, sequence offsets at and past their limits, gradients,
meta mixes."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import genext
from genext import reference

from fuzz_harness import (
    EITHER,
    LAYOUTS,
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
    sizes,
)

# The fuzz checks genext's kernel: the AVX2 machines' routing rule keeps its head dims (1-12) on
# it everywhere (a CPU with AMX would hand most calls to PyTorch's SDPA, whose default CPU kernel
# differs in NaN rows, cpu_forward_prefers_torch)
_routing = sys.modules["genext.ops.flash_attention"]  # the package attribute is the function
_routing.CPU_ROUTING = _routing.CpuRouting(avx512=False, amx=False)

FLOATS = floats("flash_attention_forward")
SCALES = (None, 0.0, 0.3, -1.0, 1e3, float("nan"), float("inf"))


@st.composite
def dense_cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    b, hk, group, lq, lk = draw(sizes(5, hi=6))
    hk, group = max(hk, 1), max(group, 1)
    d = draw(st.integers(1, 12))
    layout = draw(st.sampled_from(("bhld", "blhd")))

    def shape(h, length):
        return (b, h, length, d) if layout == "bhld" else (b, length, h, d)

    def tensor(h, length):
        t = make(shape(h, length), dtype, draw(st.sampled_from(LAYOUTS)))
        return draw(non_finite(t, p=0.1))

    q, k, v = tensor(hk * group, lq), tensor(hk, lk), tensor(hk, lk)
    causal = draw(st.booleans())
    scale = draw(st.sampled_from(SCALES)) if draw(st.floats(0, 1)) < 0.3 else None
    verdict, why = VALID, ""
    mutation = draw(mutations("heads", "d", "dtype", "d0", "batch", "rank", "int"))
    if mutation == "heads" and hk > 1 and group > 0:
        k = make(shape(hk * group + 1, lk), dtype)
        v = make(shape(hk * group + 1, lk), dtype)
        verdict, why = STRUCTURAL, "Hk does not divide Hq"
    elif mutation == "d":
        v = make(shape(hk, lk)[:-1] + (d + 1,), dtype)
        verdict, why = STRUCTURAL, "v head dim"
    elif mutation == "dtype":
        k = k.to(torch.float64 if dtype != torch.float64 else torch.float32)
        verdict, why = STRUCTURAL, f"k {k.dtype}"
    elif mutation == "d0":
        q, k, v = (make(t.shape[:-1] + (0,), dtype) for t in (q, k, v))
        verdict, why = EITHER, "D = 0"
    elif mutation == "batch":
        k = make((b + 1,) + k.shape[1:], dtype)
        v = make((b + 1,) + v.shape[1:], dtype)
        verdict, why = STRUCTURAL, "batch of k"
    elif mutation == "rank":
        q = q.flatten(0, 1)
        verdict, why = STRUCTURAL, "3-D q"
    elif mutation == "int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
        verdict, why = STRUCTURAL, "int32"
    desc = (
        f"{layout} q {tuple(q.shape)} {q.stride()} k {tuple(k.shape)} {k.stride()} v {v.stride()} "
        f"{q.dtype} causal={causal} scale={scale} {why}"
    )
    return q, k, v, causal, scale, layout, verdict, desc


def _value_nan_ok(v) -> bool:
    """Extra NaN rows are allowed when v holds NaN or inf (README's limits): a weight that the
    kernel rounds to 0 in fp32 (exp of a very negative score) meets an inf value as 0 x inf =
    NaN where the float64 reference's tiny weight gives inf; and a non-finite value row of a key
    the causal mask hides still reaches rows that share its tile. More NaN, never a finite wrong
    number."""
    return not torch.isfinite(v).all()


def _bhld(t, layout):
    return t if layout == "bhld" else t.transpose(1, 2)


def _reference(q, k, v, causal, scale, layout):
    if _bhld(k, layout).shape[2] == 0:  # no key at all: zero output, lse -inf
        b, h, lq, _ = _bhld(q, layout).shape
        out = _bhld(q, layout).double().nan_to_num(0.0, 0.0, 0.0) * 0  # keeps q's graph
        return _bhld(out, layout), torch.full((b, h, lq), float("-inf"), dtype=torch.float64)
    out, lse = reference.attention_reference(
        _bhld(q, layout).double(),
        _bhld(k, layout).double(),
        _bhld(v, layout).double(),
        causal=causal,
        scale=scale,
        return_lse=True,
    )
    return _bhld(out, layout), lse


@given(dense_cases())
def test_flash_attention(case):
    q, k, v, causal, scale, layout, verdict, desc = case

    def op(q, k, v):
        return genext.ops.flash_attention(q, k, v, causal, scale, True, layout)

    res = call("flash_attention", lambda: op(q, k, v), verdict, desc)
    if res is not None:
        out, lse = res
        assert out.dtype == q.dtype, desc
        ref_out, ref_lse = _reference(q, k, v, causal, scale, layout)
        leak = _value_nan_ok(v)
        assert_matches(out, ref_out, q.dtype, f"out {desc}", leak)
        assert_matches(lse, ref_lse, q.dtype, f"lse {desc}")
    check_meta("flash_attention", op, (q, k, v), verdict, res, desc)


@given(dense_cases())
def test_flash_attention_backward(case):
    q, k, v, causal, scale, layout, verdict, desc = case
    if verdict is not VALID or q.dtype not in (torch.float32, torch.float64):
        return
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = genext.ops.flash_attention(*leaves, causal, scale, False, layout)
    g = make(out.shape, out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = _reference(*ref_leaves, causal, scale, layout)
    ref_grads = torch.autograd.grad(
        ref, ref_leaves, g.double(), allow_unused=True, materialize_grads=True
    )
    # with a non-finite input the gradients must be NaN wherever the reference's are and equal
    # elsewhere, but may hold more NaN (the kernels' tiles mix rows; a NaN gradient is loud)
    nonfinite = not all(torch.isfinite(t).all() for t in (q, k, v))
    nonfinite |= scale is not None and not math.isfinite(scale)
    # the gradients' rounding error grows with the scale (dS = P (dP - D) scaled)
    loosen = max(1.0, abs(scale)) if scale is not None and math.isfinite(scale) else 1.0
    for name, a, r in zip("qkv", grads, ref_grads):
        assert_matches(a, r, q.dtype, f"d{name} {desc}", nonfinite, loosen)


@st.composite
def varlen_cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    n_seq = draw(st.integers(0, 4))
    lens_q = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    lens_k = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    hk, group, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 10))
    pad_q, pad_k = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    tq, tk = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    q = draw(non_finite(make((tq, hk * group, d), dtype, draw(st.sampled_from(LAYOUTS))), p=0.1))
    k = make((tk, hk, d), dtype, draw(st.sampled_from(LAYOUTS)))
    v = make((tk, hk, d), dtype, draw(st.sampled_from(LAYOUTS)))
    cu_q = torch.tensor(
        [0, *torch.tensor(lens_q, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32
    )
    cu_k = torch.tensor(
        [0, *torch.tensor(lens_k, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32
    )
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    max_q += draw(st.sampled_from((0, 0, 1)))
    causal = draw(st.booleans())
    verdict, why = VALID, ""
    mutation = draw(
        mutations("max_small", "max_huge", "decreasing", "past_end", "cu_dtype", "cu_len")
    )
    if mutation == "max_small" and max_k > 0:
        max_k -= 1
        verdict, why = VALUE, "max_seqlen_k below a length"
    elif mutation == "max_huge":
        max_q = draw(st.sampled_from((2**31, 2**63, -1)))
        verdict = {2**31: EITHER, 2**63: STRUCTURAL, -1: STRUCTURAL}[max_q]
        why = f"max_seqlen_q {max_q}"
    elif mutation == "decreasing" and n_seq >= 1 and cu_k[-1] > 0:
        cu_k = cu_k.clone()
        cu_k[1], cu_k[-1] = cu_k[-1], 0 if n_seq > 1 else -1
        verdict, why = VALUE, "cu_seqlens_k decreasing"
    elif mutation == "past_end":
        cu_q = cu_q.clone()
        cu_q[-1] = tq + 1
        verdict, why = VALUE, "cu_seqlens_q past the rows"
    elif mutation == "cu_dtype":
        cu_q = cu_q.long()
        verdict, why = STRUCTURAL, "int64 cu_seqlens_q"
    elif mutation == "cu_len":
        cu_k = torch.cat([cu_k, cu_k[-1:]])
        verdict, why = STRUCTURAL, "cu_seqlens_k longer"
    desc = (
        f"q {tuple(q.shape)} {q.dtype} k {tuple(k.shape)} cu_q {cu_q.tolist()} cu_k {cu_k.tolist()} "
        f"max {max_q} {max_k} causal={causal} {why}"
    )
    return q, k, v, cu_q, cu_k, max_q, max_k, causal, verdict, desc


@given(varlen_cases())
def test_flash_attention_varlen(case):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, verdict, desc = case

    def op(q, k, v, cu_q, cu_k):
        return genext.ops.flash_attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal, None, True
        )

    res = call("flash_attention_varlen", lambda: op(q, k, v, cu_q, cu_k), verdict, desc)
    if res is not None:
        out, lse = res
        ref_out = torch.zeros(q.shape, dtype=torch.float64)
        ref_lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
        for s in range(cu_q.numel() - 1):
            rq = slice(int(cu_q[s]), int(cu_q[s + 1]))
            rk = slice(int(cu_k[s]), int(cu_k[s + 1]))
            if rq.stop - rq.start == 0:
                continue
            if rk.stop - rk.start == 0:
                continue  # no key: zero output, lse -inf
            o, lse_s = reference.attention_reference(
                q[rq].double().transpose(0, 1)[None],
                k[rk].double().transpose(0, 1)[None],
                v[rk].double().transpose(0, 1)[None],
                causal=causal,
                return_lse=True,
            )
            ref_out[rq] = o[0].transpose(0, 1)
            ref_lse[:, rq] = lse_s[0]
        assert_matches(out, ref_out, q.dtype, f"out {desc}")
        assert_matches(lse, ref_lse, q.dtype, f"lse {desc}")
    check_meta("flash_attention_varlen", op, (q, k, v, cu_q, cu_k), verdict, res, desc)


@st.composite
def sdpa_cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    b, hk, group, lq, lk = draw(sizes(5, hi=5))
    hk, group, b = max(hk, 1), max(group, 1), max(b, 1)
    d = draw(st.integers(1, 10))
    q = draw(non_finite(make((b, hk * group, lq, d), dtype, draw(st.sampled_from(LAYOUTS))), p=0.1))
    k = draw(non_finite(make((b, hk, lk, d), dtype, draw(st.sampled_from(LAYOUTS))), p=0.1))
    v = make((b, hk, lk, d), dtype, draw(st.sampled_from(LAYOUTS)))
    mask = None
    if draw(st.booleans()) and lk > 0:
        keep = [draw(st.integers(1, lk)) for _ in range(b)]
        mask = (torch.arange(lk)[None] < torch.tensor(keep)[:, None]).view(b, 1, 1, lk)
    is_causal = mask is None and draw(st.booleans())
    scale = draw(st.sampled_from(SCALES)) if draw(st.floats(0, 1)) < 0.3 else None
    desc = (
        f"q {tuple(q.shape)} {q.stride()} k {tuple(k.shape)} {k.stride()} {dtype} "
        f"mask {None if mask is None else mask.view(b, lk).sum(1).tolist()} causal={is_causal} "
        f"scale={scale}"
    )
    return q, k, v, mask, is_causal, scale, hk != hk * group, desc


@given(sdpa_cases())
def test_sdpa_drop_in(case):
    """Equal to PyTorch's SDPA in float64, NaN where it is NaN."""
    q, k, v, mask, is_causal, scale, gqa, desc = case
    kw = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    out = call(
        "scaled_dot_product_attention",
        lambda: genext.nn.functional.scaled_dot_product_attention(q, k, v, **kw),
        VALID,
        desc,
    )
    if q.shape[2] == 0 or k.shape[2] == 0:
        ref = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
        if k.shape[2] == 0 and q.shape[2] > 0:
            return  # PyTorch's kernels disagree among themselves on zero keys
    else:
        # PyTorch's math backend (its default CPU kernel turns a row whose only score is NaN
        # into zeros, the math backend gives NaN)
        kd, vd = k.double(), v.double()
        if is_causal:  # a NaN key hidden by the causal mask poisons PyTorch's rows, not genext's
            ref = reference.attention_reference(
                q.double(),
                kd.repeat_interleave(q.shape[1] // k.shape[1], 1),
                vd.repeat_interleave(q.shape[1] // k.shape[1], 1),
                causal=True,
                scale=scale,
                bottom_right=False,
            )
        else:  # hidden keys never count in genext: PyTorch sees each entry's visible keys only
            kw = dict(scale=scale, enable_gqa=gqa)
            lens = [k.shape[2]] * q.shape[0] if mask is None else mask.view(q.shape[0], -1).sum(1)
            with sdpa_kernel(SDPBackend.MATH):
                ref = torch.cat(
                    [
                        F.scaled_dot_product_attention(
                            q[i : i + 1].double(), kd[i : i + 1, :, :n], vd[i : i + 1, :, :n], **kw
                        )
                        for i, n in enumerate(lens)
                    ]
                )
        if scale is not None and not math.isfinite(scale):
            ref = torch.full_like(ref, float("nan"))  # genext: NaN for any non-finite scale
    assert_matches(out, ref, q.dtype, desc)
