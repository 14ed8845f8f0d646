"""Fuzz cases of group_norm_silu (and the GroupNormSiLU module): shapes with 0 and 1 sizes, every
layout, weight/bias dtypes, NaN/inf in x, wrong shapes and dtypes, meta mixes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import genext
from genext import reference

from fuzz_harness import (
    STRUCTURAL,
    VALID,
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

NAME = "group_norm_silu"
FLOATS = floats("group_norm_silu")


@st.composite
def cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    rank = draw(st.integers(3, 5))
    n, groups, per_group = draw(sizes(3, hi=4))
    groups = max(groups, 1)
    c = groups * per_group
    spatial = draw(sizes(rank - 2, hi=5))
    layout = draw(st.sampled_from(("contiguous", "strided", "transposed", "expanded", "cl")))
    shape = (n, c, *spatial)
    if layout == "cl":
        x = make(shape, dtype)
        x = (
            x.to(memory_format=torch.channels_last)
            if rank == 4
            else x.transpose(1, -1).contiguous().transpose(1, -1)
        )
    else:
        x = make(shape, dtype, layout)
    x = draw(non_finite(x))
    verdict, why = VALID, ""
    affine = draw(st.booleans())
    wdtype = draw(st.sampled_from((torch.float32, dtype)))
    weight = (
        make((c,), wdtype, draw(st.sampled_from(("contiguous", "strided")))) if affine else None
    )
    bias = make((c,), wdtype) if affine else None
    eps = draw(st.sampled_from((1e-5, 1e-6, 0.1)))
    mutation = draw(
        mutations("groups", "only_weight", "weight_shape", "int_x", "weight_dtype", "rank")
    )
    if mutation == "groups" and c > 0:
        groups = draw(st.sampled_from((0, -1, c + 1)))
        verdict, why = STRUCTURAL, f"num_groups {groups} for C={c}"
    elif mutation == "only_weight" and affine:
        bias = None
        verdict, why = STRUCTURAL, "weight without bias"
    elif mutation == "weight_shape" and affine:
        weight = make((c + 1,), wdtype)
        verdict, why = STRUCTURAL, "weight of C+1"
    elif mutation == "int_x":
        x = make(shape, torch.int32)
        verdict, why = STRUCTURAL, "int32 x"
    elif mutation == "weight_dtype" and affine and dtype != torch.float64:
        weight = make((c,), torch.float64)
        bias = make((c,), torch.float64)
        verdict, why = STRUCTURAL, "float64 weight"
    elif mutation == "rank":
        x = make((n, c), dtype)
        verdict, why = STRUCTURAL, "rank 2"
    desc = (
        f"x {tuple(x.shape)} {x.dtype} strides {x.stride()} groups={groups} affine={affine} "
        f"w {None if weight is None else (weight.dtype, tuple(weight.shape))} "
        f"b {None if bias is None else bias.dtype} eps={eps} {why}"
    )
    return x, groups, weight, bias, eps, verdict, desc


def _op(x, groups, weight, bias, eps):
    return genext.ops.group_norm_silu(x, groups, weight, bias, eps)


@given(cases(), st.sampled_from(("silu", None)))
def test_forward(case, activation):
    x, groups, weight, bias, eps, verdict, desc = case
    op = lambda *a: genext.ops.group_norm_silu(*a, activation=activation)  # noqa: E731
    y = call(NAME, lambda: op(x, groups, weight, bias, eps), verdict, desc)
    if y is not None:
        assert y.dtype == x.dtype and y.shape == x.shape
        d = lambda t: None if t is None else t.double()  # noqa: E731
        ref = reference.group_norm_silu(x.double(), groups, d(weight), d(bias), eps, activation)
        assert_matches(y, ref, x.dtype, f"{NAME} {desc}")
    check_meta(NAME, op, (x, groups, weight, bias, eps), verdict, y, desc)


@given(cases())
def test_backward(case):
    x, groups, weight, bias, eps, verdict, desc = case
    if verdict is not VALID or x.dtype not in (torch.float32, torch.float64):
        return
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    y = _op(leaves[0], groups, leaves[1], leaves[2], eps)
    g = make(y.shape, y.dtype)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], g, allow_unused=True)
    ref_leaves = [
        t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    ref = reference.group_norm_silu(ref_leaves[0], groups, ref_leaves[1], ref_leaves[2], eps)
    ref_grads = torch.autograd.grad(
        ref, [t for t in ref_leaves if t is not None], g.double(), allow_unused=True
    )
    for name, a, b in zip(("x", "weight", "bias"), grads, ref_grads):
        if b is None:
            continue
        assert a is not None, f"{NAME}: no gradient for {name} ({desc})"
        if torch.isfinite(x).all():
            assert_matches(a, b, a.dtype, f"{NAME} grad {name} {desc}")


@given(cases())
def test_module(case):
    x, groups, weight, bias, eps, verdict, desc = case
    if verdict is not VALID or x.shape[1] == 0:
        return
    m = genext.nn.GroupNormSiLU(groups, x.shape[1], eps=eps, affine=weight is not None)
    m = m.to(dtype=weight.dtype if weight is not None else x.dtype)
    if weight is not None:
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    y = call("GroupNormSiLU", lambda: m(x), VALID, desc)
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    assert_matches(y, reference.group_norm_silu(x.double(), groups, w, b, eps), x.dtype, desc)
