"""Fuzz cases of clip_loss and siglip_loss: batch and feature sizes with 0 and 1, unequal image
and text counts, every layout, NaN/inf in features, scale and bias, scale and bias as floats or
tensors of several shapes, label offsets at and past their limits, gradients, meta mixes."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import genext
from genext import reference

from fuzz_harness import (
    LAYOUTS,
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
)

FLOATS = floats("tiled_lse")
SPECIAL = (float("nan"), float("inf"), float("-inf"), 0.0)


@st.composite
def scalar(draw, special: float) -> torch.Tensor:
    value = (
        draw(st.one_of(st.floats(-3, 3), st.sampled_from(SPECIAL)))
        if draw(st.floats(0, 1)) < special
        else draw(st.floats(0.5, 3))
    )
    shape = draw(st.sampled_from(((), (1,), (1, 1))))
    return torch.full(shape, value, dtype=draw(st.sampled_from((torch.float32, torch.float64))))


@st.composite
def cases(draw, loss: str):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    ni = draw(st.integers(1, 6))
    # clip: more texts than images when unequal (rows i against texts i + offset)
    nt = ni if draw(st.booleans()) else draw(st.integers(ni if loss == "clip" else 1, 8))
    d = draw(st.integers(1, 9))
    scale_ = 1 / math.sqrt(d)
    img = draw(non_finite(make((ni, d), dtype, draw(st.sampled_from(LAYOUTS)), scale=scale_), 0.1))
    txt = draw(non_finite(make((nt, d), dtype, draw(st.sampled_from(LAYOUTS)), scale=scale_), 0.1))
    logit_scale = draw(scalar(0.1))
    logit_bias = draw(scalar(0.1)) if loss == "siglip" or draw(st.booleans()) else None
    extra = 0
    verdict, why = VALID, ""
    if loss == "clip":
        extra = draw(st.integers(0, max(nt - ni, 0))) if nt != ni or draw(st.booleans()) else 0
    else:
        extra = draw(st.booleans()) or nt != ni  # negative_only, required for unequal counts
    mutation = draw(mutations("d", "dtype", "no_text", "scale_shape", "offset", "int"))
    if mutation == "d":
        txt = make((nt, d + 1), dtype)
        verdict, why = STRUCTURAL, "D mismatch"
    elif mutation == "dtype":
        txt = make((nt, d), torch.float64 if dtype != torch.float64 else torch.float32)
        verdict, why = STRUCTURAL, "text dtype"
    elif mutation == "no_text":
        txt = make((0, d), dtype)
        verdict, why = STRUCTURAL, "no text features"
    elif mutation == "scale_shape":
        logit_scale = torch.ones(2)
        verdict, why = STRUCTURAL, "logit_scale of 2 elements"
    elif mutation == "offset" and loss == "clip":
        extra = draw(st.sampled_from((-1, nt - ni + 1)))
        verdict, why = STRUCTURAL, f"labels_offset {extra}"
    elif mutation == "int":
        img, txt = make((ni, d), torch.int64), make((nt, d), torch.int64)
        verdict, why = STRUCTURAL, "int64 features"
    desc = (
        f"{loss} img {tuple(img.shape)} {img.dtype} {img.stride()} txt {tuple(txt.shape)} "
        f"{txt.stride()} scale {logit_scale.tolist()} bias "
        f"{None if logit_bias is None else logit_bias.tolist()} extra={extra} {why}"
    )
    return img, txt, logit_scale, logit_bias, extra, verdict, desc


def _run(loss, *args):
    fn = genext.ops.clip_loss if loss == "clip" else genext.ops.siglip_loss
    return fn(*args)


def _reference(loss, img, txt, s, b, extra):
    # scale and bias as the op uses them: in float32 for all but float64 features (a float64
    # scale of 1e-100 is 0 there)
    acc = torch.float64 if img.dtype == torch.float64 else torch.float32
    d = lambda t: None if t is None else t.to(acc).double().reshape(())  # noqa: E731
    fn = reference.clip_loss if loss == "clip" else reference.siglip_loss
    return fn(img.double(), txt.double(), d(s), d(b), extra)


@given(
    st.sampled_from(("clip", "siglip")).flatmap(lambda loss: st.tuples(st.just(loss), cases(loss)))
)
def test_loss(arg):
    loss, (img, txt, s, b, extra, verdict, desc) = arg
    name = f"{loss}_loss"
    out = call(name, lambda: _run(loss, img, txt, s, b, extra), verdict, desc)
    if out is not None:
        ref = _reference(loss, img, txt, s, b, extra)
        if not torch.isfinite(s).all():
            # genext's rule: a non-finite logit_scale gives NaN (the eager loss gives NaN too
            # wherever its (scale * I) @ T^T products mix +inf and -inf)
            ref = torch.full_like(ref, float("nan"))
        assert out.shape == ()
        assert_matches(out, ref, img.dtype, desc)
    check_meta(name, lambda *a: _run(loss, *a), (img, txt, s, b, extra), verdict, out, desc)


@given(
    st.sampled_from(("clip", "siglip")).flatmap(lambda loss: st.tuples(st.just(loss), cases(loss)))
)
def test_gradients(arg):
    """float64 gradients in features, scale and bias equal the reference's, NaN where it is."""
    loss, (img, txt, s, b, extra, verdict, desc) = arg
    if verdict is not VALID:
        return
    leaves = [
        t.detach().double().requires_grad_() if t is not None else None for t in (img, txt, s, b)
    ]
    used = [t for t in leaves if t is not None]
    out = _run(loss, *leaves, extra)
    grads = torch.autograd.grad(out, used)
    ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    ref = _reference(loss, *ref_leaves, extra)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None])
    if not torch.isfinite(ref) or not torch.isfinite(s).all():
        return  # a non-finite loss or scale (NaN by genext's rule): gradients not compared
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_matches(g, r, torch.float64, f"gradient {i} {desc}")
