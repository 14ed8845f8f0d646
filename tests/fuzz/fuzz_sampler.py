"""Fuzz cases of the sampler step op (the kernel every genext scheduler calls): every mode and
prediction type, guidance, history, noise, thresholding, sizes with 0 and 1, strided inputs,
NaN/inf in inputs and coefficients, outputs that alias inputs, meta mixes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from genext import reference
from genext.ops._sampler_step import NUM_COEF, StepKind, sampler_step

from fuzz_harness import (
    EITHER,
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
    sizes,
)

NAME = "sampler_step"
FLOATS = floats("sampler_step")
COEF = st.one_of(
    st.floats(-2, 2, width=32), st.sampled_from((0.0, 1.0, float("nan"), float("inf")))
)


@st.composite
def cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    shape = (draw(st.integers(0, 3)), *draw(sizes(draw(st.integers(0, 3)), hi=4)))
    mode = draw(st.sampled_from(list(StepKind)))
    pred = draw(st.integers(0, 2))
    guided = draw(st.booleans())

    def tensor(s=shape, dt=dtype):
        return draw(non_finite(make(s, dt, draw(st.sampled_from(LAYOUTS))), p=0.05))

    sample = tensor()
    m_shape = (2 * shape[0], *shape[1:]) if guided else shape
    model_output = tensor(m_shape, draw(st.sampled_from(FLOATS)))
    history = [tensor() for _ in range(draw(st.integers(0, 2)))] if mode == StepKind.DPM else []
    noise = tensor() if draw(st.booleans()) else None
    threshold = None
    if mode != StepKind.FLOW and draw(st.floats(0, 1)) < 0.2:
        threshold = torch.rand(shape[0], dtype=torch.float64).add(0.5).float()
    coef = (
        [draw(COEF) for _ in range(NUM_COEF)]
        if draw(st.floats(0, 1)) < 0.2
        else [draw(st.floats(0.125, 1.5, width=32)) for _ in range(NUM_COEF)]
    )
    kw = dict(
        prediction_type=pred,
        history=history,
        noise=noise,
        threshold_scale=threshold,
        clip=draw(st.booleans()),
        guidance_scale=draw(st.floats(0, 9, width=32)) if guided else None,
    )
    verdict, why = VALID, ""
    mutation = draw(mutations("mode", "pred", "history", "noise_shape", "int", "coef"))
    if mutation == "mode":
        mode = draw(st.sampled_from((-1, 4)))
        verdict, why = STRUCTURAL, f"mode {mode}"
    elif mutation == "pred":
        kw["prediction_type"] = 3
        verdict, why = STRUCTURAL, "prediction_type 3"
    elif mutation == "history" and mode != StepKind.DPM:
        kw["history"] = [make(shape, dtype)]
        verdict, why = STRUCTURAL, "history outside DPM"
    elif mutation == "noise_shape" and len(shape) > 1:
        kw["noise"] = make((*shape[:-1], shape[-1] + 1), dtype)
        verdict, why = STRUCTURAL, "noise shape"
    elif mutation == "int":
        sample = make(shape, torch.int32)
        verdict, why = STRUCTURAL, "int32 sample"
    elif mutation == "coef":
        coef = coef + [1.0]
        verdict, why = STRUCTURAL, f"{len(coef)} coefficients"
    desc = (
        f"{mode!r} pred={pred} sample {tuple(sample.shape)} {sample.dtype} {sample.stride()} "
        f"model {model_output.dtype} hist {len(kw['history'])} noise={noise is not None} "
        f"thr={threshold is not None} clip={kw['clip']} w={kw['guidance_scale']} coef {coef} {why}"
    )
    return mode, sample, model_output, coef, kw, verdict, desc


def _reference(mode, sample, model_output, coef, kw):
    return reference.sampler_step(int(mode), sample, model_output, coef, **kw)


@given(cases())
def test_sampler_step(case):
    mode, sample, model_output, coef, kw, verdict, desc = case

    def op(sample, model_output, history, noise, threshold):
        kw2 = dict(kw, history=history, noise=noise, threshold_scale=threshold)
        return sampler_step(mode, sample, model_output, coef, **kw2)

    args = (sample, model_output, kw["history"], kw["noise"], kw["threshold_scale"])
    res = call(NAME, lambda: op(*args), verdict, desc)
    if res is not None:
        prev, x0 = res
        ref_prev, ref_x0 = _reference(mode, sample, model_output, coef, kw)
        assert_matches(prev, ref_prev.double(), sample.dtype, f"prev {desc}")
        assert_matches(x0, ref_x0.double(), sample.dtype, f"x0 {desc}")
        assert not prev.requires_grad and not x0.requires_grad
    check_meta(NAME, op, args, verdict, res, desc)


ALIASES = ("out=sample", "out=noise", "out=history", "x0=sample", "out=x0", "partial", "expanded")


@given(cases(), st.sampled_from(ALIASES))
def test_sampler_step_aliasing(case, alias):
    """Outputs that alias inputs: the documented in-place step (out = sample) matches the
    reference computed from the inputs as they were; any other alias either does too or raises."""
    mode, sample, model_output, coef, kw, verdict, desc = case
    if verdict is not VALID or sample.numel() == 0:
        return
    sample = sample.contiguous().clone()
    kw = dict(kw)
    if kw["noise"] is not None:
        kw["noise"] = kw["noise"].to(sample.dtype).contiguous().clone()
    kw["history"] = [h.to(sample.dtype).contiguous().clone() for h in kw["history"]]
    ref_prev, ref_x0 = _reference(mode, sample.clone(), model_output, coef, kw)
    out, x0_out, verdict = None, None, EITHER
    if alias == "out=sample":
        out, verdict = sample, VALID
    elif alias == "out=noise" and kw["noise"] is not None:
        out = kw["noise"]
    elif alias == "out=history" and kw["history"]:
        out = kw["history"][-1]
    elif alias == "x0=sample":
        x0_out = sample
    elif alias == "out=x0":
        out = x0_out = torch.empty_like(sample)
    elif alias == "partial" and sample.numel() > 1:
        buf = torch.empty(sample.numel() + 1, dtype=sample.dtype)
        out = buf[: sample.numel()].view(sample.shape)
        x0_out = buf[1:].view(sample.shape)
    elif alias == "expanded" and sample.shape[0] > 1:
        out = torch.empty((1, *sample.shape[1:]), dtype=sample.dtype).expand(sample.shape)
    else:
        return
    desc = f"{alias}: {desc}"
    res = call(
        NAME,
        lambda: sampler_step(mode, sample, model_output, coef, out=out, x0_out=x0_out, **kw),
        verdict,
        desc,
    )
    if res is not None:
        prev, x0 = res
        assert_matches(prev, ref_prev.double(), sample.dtype, f"prev {desc}")
        assert_matches(x0, ref_x0.double(), sample.dtype, f"x0 {desc}")
