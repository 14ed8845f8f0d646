"""Shared by the attention tests (tests/ops, tests/nn): tolerances and random q, k, v."""

from __future__ import annotations

import re

import torch

# float32 and float64: absolute error bounds against float64 (values and gradients are O(1) here)
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}
ATOL_GRAD = {torch.float32: 1e-4, torch.float64: 1e-11}


def make_qkv(b, hq, hk, lq, lk, d, dtype, device, requires_grad=False):
    """Random (B, H, L, D) q, k, v (never zeros), drawn in float64 then rounded to dtype."""

    def rand(h, length):
        t = torch.randn(b, h, length, d, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return rand(hq, lq), rand(hk, lk), rand(hk, lk)


def assert_nan_where_reference(out, ref, atol):
    """out is NaN exactly where ref is, and within atol of it elsewhere (equal where infinite)."""
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan), (
        f"NaN at {out.isnan().nonzero().tolist()}, reference at {nan.nonzero().tolist()}"
    )
    torch.testing.assert_close(out[~nan].double(), ref[~nan].double(), atol=atol, rtol=0)


def on_meta(t):
    """A meta tensor of t's shape, strides and dtype."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def with_one_on_meta(args, i):
    """args with its i-th entry moved to the meta device (the others stay where they are)."""
    return tuple(on_meta(a) if j == i else a for j, a in enumerate(args))


def all_on_meta(args):
    return tuple(on_meta(a) if isinstance(a, torch.Tensor) else a for a in args)


def same_error(fn_real, fn_meta):
    """Both calls raise the same exception type with the same message up to its first ' got ', dtype
    or device (the fake kernel words dtypes the Python way, the C++ checks the c10 way)."""
    errors = []
    for fn in (fn_real, fn_meta):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (the type is what is compared)
            errors.append((type(e), re.split(r" got | dtype | on (?:cpu|meta|cuda)", str(e))[0]))
        else:
            errors.append(None)
    assert errors[0] is not None, "the real kernel accepted the arguments"
    assert errors[0] == errors[1], errors
