"""The fused diffusion-sampler step op (``genext::sampler_step``): a kernel contract, not an API.

The public way in is a scheduler of :mod:`genext.samplers`, which computes the coefficients on the
host and calls :func:`sampler_step` once per step. ``genext.reference.sampler_step`` is the same
expression in plain PyTorch (the specification of the kernels, the benchmarks' eager baseline and
the tests' reference).

The kernel evaluates, elementwise and in fp32, the same expression as the diffusers scheduler, in
the same operation order, with scalar coefficients the scheduler computes on the host (as fp32
values, the way diffusers computes them from its fp32 schedule tensors), so that trajectories
match diffusers to rounding.

Per kind, with x = sample, m = model output (after guidance: u + w * (c - u)), and coef = c[..]:

  x0 (DDIM, DDPM, DPM): prediction_type 0 (epsilon): x0 = (x - c1 * m) / c0
                  prediction_type 1 (sample):  x0 = m
                  prediction_type 2 (v):       x0 = c0 * x - c1 * m
     then x0 = clamp(x0, -s, s) / s with s = threshold_scale[n] when given, else when clip
     x0 = clamp(x0, -c2, c2).
  StepKind.DDIM: c0 = alpha_prod_t ** 0.5, c1 = beta_prod_t ** 0.5, c3 = alpha_prod_t_prev ** 0.5,
                 c4 = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5, c5 = std_dev_t,
                 c6 = 1 to re-derive eps from the clipped x0 (use_clipped_model_output).
                 eps = m (epsilon) | (x - c0 * m) / c1 (sample: from the unclipped x0 = m,
                 as diffusers computes it) | c0 * m + c1 * x (v);
                 if c6: eps = (x - c0 * x0) / c1
                 prev = c3 * x0 + c4 * eps;  with noise: prev = prev + c5 * noise
  StepKind.DDPM: c0, c1 as DDIM; c3 = pred_original_sample_coeff, c4 = current_sample_coeff,
                 c5 = the noise scale. prev = c3 * x0 + c4 * x;  with noise: prev + c5 * noise
  StepKind.DPM, DPM-Solver++ (data prediction; order = 1 + len(history), history newest first):
                 c0 = alpha_t, c1 = sigma_t of the current sigma (for x0); c3 = the sample
                 coefficient, c4, c5, c6 = the D0, D1, D2 coefficients (signs included), c7 = the
                 noise coefficient (SDE), c8 = 1 / r0, c9 = 1 / r1, c10 = r0 / (r0 + r1),
                 c11 = 1 / (r0 + r1).
                 D0 = x0; order 2: D1 = c8 * (x0 - h1); order 3: D1_0 = c8 * (x0 - h1),
                 D1_1 = c9 * (h1 - h2), D1 = D1_0 + c10 * (D1_0 - D1_1), D2 = c11 * (D1_0 - D1_1).
                 prev = c3 * x + c4 * D0 [+ c5 * D1] [+ c6 * D2] [+ c7 * noise]
  StepKind.FLOW, flow-matching Euler: x0 = m; prev = x + c3 * m (c3 = sigma_next - sigma); with noise
                 (stochastic sampling): x0 = x - c4 * m, prev = c5 * x0 + c6 * noise
                 (c4 = sigma, c5 = 1 - sigma_next, c6 = sigma_next).

Returns (prev_sample, x0) in the sample's dtype.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from ._common import check, check_same_device, check_type, check_value, declare_kernels, same_shape

__all__ = ["NUM_COEF", "PredictionType", "StepKind", "sampler_step"]


# The numbers below are the C++ side's too: enum Mode, enum Pred and kNumCoef in
# csrc/sampler_step/sampler_step_math.h. Change both together.
class StepKind(enum.IntEnum):
    """Which scheduler's update the kernel applies (the op's ``kind`` argument)."""

    DDIM = 0
    DDPM = 1
    DPM = 2  # DPM-Solver++ (orders 1-3, SDE variant)
    FLOW = 3  # flow-matching Euler


class PredictionType(enum.IntEnum):
    """What the model predicts (the op's ``prediction_type`` argument); the member names are
    diffusers' ``prediction_type`` strings in upper case."""

    EPSILON = 0
    SAMPLE = 1
    V_PREDICTION = 2


NUM_COEF = 12  # scalars per step (the op's coef list)

# sample dtypes; the arithmetic is float32 for all of them
declare_kernels(
    ["sampler_step", "sampler_step_out"],
    cpu=(torch.float32, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)


def sampler_step(
    mode: int,
    sample: Tensor,
    model_output: Tensor,
    coef: Sequence[float],
    *,
    prediction_type: int = PredictionType.EPSILON,
    history: Sequence[Tensor] = (),
    noise: Tensor | None = None,
    threshold_scale: Tensor | None = None,
    clip: bool = False,
    guidance_scale: float | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One fused sampler step: returns (prev_sample, x0) like sample. `guidance_scale` given means
    model_output holds [uncond, cond] along dim 0, combined as u + w * (c - u) in the kernel.
    `out` / `x0_out`: contiguous tensors shaped and typed like sample to write into (out may be
    the sample itself: an in-place step; x0_out must not alias an input), for loops that keep
    static buffers, e.g. under CUDA-graph capture. Any other sharing of memory between an output
    and an input or the other output (a partial overlap included) raises RuntimeError. Modes and
    coefficients: see the module docstring.

    Not differentiable (sampling only): it runs under ``torch.no_grad()``, so its outputs never
    require grad, even for inputs that do; differentiating through the raw
    ``torch.ops.genext.sampler_step`` raises NotImplementedError."""
    if type(coef) is list and len(coef) == NUM_COEF:
        c = coef  # schedulers pass full lists of floats: no copy on this per-step path
    else:
        c = [float(v) for v in coef] + [0.0] * (NUM_COEF - len(coef))
        if len(c) != NUM_COEF:
            raise ValueError(f"sampler_step: at most {NUM_COEF} coefficients, got {len(coef)}")
    args = (
        int(mode),
        sample,
        model_output,
        list(history),
        noise,
        threshold_scale,
        c,
        int(prediction_type),
        bool(clip),
        guidance_scale is not None,
        float(guidance_scale) if guidance_scale is not None else 1.0,
    )
    with torch.no_grad():
        if out is None and x0_out is None:
            return _OP(*args)
        if out is None:
            out = torch.empty_like(sample, memory_format=torch.contiguous_format)
        if x0_out is None:
            x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format)
        _OP_OUT(*args, out, x0_out)
    return out, x0_out


_OP = torch.ops.genext.sampler_step.default
_OP_OUT = torch.ops.genext.sampler_step_out.default

_OPNAME = "sampler_step"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_input(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``t`` when the kernels read it as it is (contiguous, in ``dtype`` when given), None when the
    binding reads a copy of it (``.to(dtype).contiguous()``), which no output can clash with."""
    if t is None or not t.is_contiguous() or (dtype is not None and t.dtype != dtype):
        return None
    return t


def _check(
    kind, sample, model_output, history, noise, threshold_scale, coef, prediction_type, guidance
) -> dict[str, Tensor | None]:
    """The checks of ``prepare`` in csrc/sampler_step/sampler_step_checks.h, in its order, with its
    exception types and messages. Returns the inputs the kernels read without a copy, by name."""
    op = _OPNAME
    check_value(
        0 <= kind <= 3,
        lambda: (
            f"{op}: mode must be 0 (DDIM), 1 (DDPM), 2 (DPM-Solver++) or 3 (flow Euler), got {kind}"
        ),
    )
    check_value(
        0 <= prediction_type <= 2,
        lambda: (
            f"{op}: prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), "
            f"got {prediction_type}"
        ),
    )
    check_value(
        len(coef) == NUM_COEF,
        lambda: f"{op}: coef must hold {NUM_COEF} values, got {len(coef)}",
    )
    check_type(
        sample.dtype in _FLOATS and model_output.dtype in _FLOATS,
        lambda: (
            f"{op}: sample and model_output must be float32, float16 or bfloat16, got "
            f"{sample.dtype} and {model_output.dtype}"
        ),
    )
    check_value(sample.dim() >= 1, lambda: f"{op}: sample must have a batch dim")
    check_same_device(op, "sample", {"sample": sample, "model_output": model_output})
    want = list(sample.shape)
    if guidance:
        want[0] = want[0] * 2
    check_value(
        same_shape(model_output.shape, want),
        lambda: (
            f"{op}: model_output must have shape {tuple(want)}"
            + (" ([uncond; cond] along dim 0)" if guidance else "")
            + f", got {tuple(model_output.shape)}"
        ),
    )
    check_value(len(history) <= 2, lambda: f"{op}: at most 2 history tensors, got {len(history)}")
    check_value(
        len(history) == 0 or kind == StepKind.DPM,
        lambda: f"{op}: history is used by mode 2 only",
    )
    read = {
        "sample": _kernel_input(sample, None),
        "model_output": _kernel_input(model_output, None),
    }
    likes = [(f"history[{i}]", h) for i, h in enumerate(history)] + [("noise", noise)]
    for name, t in likes:
        if t is None:
            continue
        check_value(
            same_shape(t.shape, sample.shape),
            lambda name=name, t=t: (
                f"{op}: {name} must have the sample's shape "
                f"{tuple(sample.shape)}, got {tuple(t.shape)}"
            ),
        )
        check_same_device(op, "sample", {"sample": sample, name: t})
        check_type(
            t.dtype in _FLOATS,
            lambda name=name, t=t: (
                f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}"
            ),
        )
        read[name] = _kernel_input(t, sample.dtype)
    if threshold_scale is not None:
        s = threshold_scale
        check_value(
            s.dim() == 1 and s.shape[0] == sample.shape[0],
            lambda: (
                f"{op}: threshold_scale must have shape ({sample.shape[0]},), got {tuple(s.shape)}"
            ),
        )
        check_same_device(op, "sample", {"sample": sample, "threshold_scale": s})
        read["threshold_scale"] = _kernel_input(s, torch.float32)
    return read


def _check_out(name: str, out: Tensor, sample: Tensor) -> None:
    """``check_out`` of sampler_step_checks.h."""
    op = _OPNAME + "_out"
    check_value(
        same_shape(out.shape, sample.shape),
        lambda: (
            f"{op}: {name} must have the sample's shape {tuple(sample.shape)}, got "
            f"{tuple(out.shape)}"
        ),
    )
    check_type(
        out.dtype == sample.dtype,
        lambda: f"{op}: {name} must have the sample's dtype {sample.dtype}, got {out.dtype}",
    )
    check_same_device(op, "sample", {"sample": sample, name: out})
    check_value(out.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _overlap(a: Tensor, b: Tensor) -> str:
    """ATen's get_overlap_status for two contiguous tensors: "full", "partial" or "no"."""
    if a is b:
        return "full"
    if a.numel() == 0 or b.numel() == 0:
        return "no"
    if StorageWeakRef(a.untyped_storage()) != StorageWeakRef(b.untyped_storage()):
        return "no"
    a_begin = a.storage_offset() * a.element_size()
    b_begin = b.storage_offset() * b.element_size()
    a_end = a_begin + a.numel() * a.element_size()
    b_end = b_begin + b.numel() * b.element_size()
    if a_begin == b_begin and a_end == b_end:
        return "full" if a.stride() == b.stride() else "partial"
    return "partial" if a_begin < b_end and b_begin < a_end else "no"


def _check_no_overlap(read: dict[str, Tensor | None], prev: Tensor, x0: Tensor) -> None:
    """``check_no_overlap`` of sampler_step_checks.h: the outputs share memory with no input the
    kernels read and with each other, except prev being exactly the sample (an in-place step)."""
    for out_name, out in (("out (prev)", prev), ("x0_out (x0)", x0)):
        for name, t in read.items():
            if t is None:
                continue
            st = _overlap(out, t)
            in_place = out is prev and name == "sample" and st == "full"
            check(
                st == "no" or in_place,
                lambda out_name=out_name, name=name: (
                    f"{_OPNAME}: {out_name} and {name} share "
                    "memory; an output may share memory with no input and no other output, except "
                    "out = sample exactly (an in-place step)"
                ),
            )
    check(
        _overlap(prev, x0) == "no",
        lambda: (
            f"{_OPNAME}: out (prev) and x0_out (x0) share memory; they must be separate tensors"
        ),
    )


@torch.library.register_fake("genext::sampler_step")
def _fake(
    kind,
    sample,
    model_output,
    history,
    noise,
    threshold_scale,
    coef,
    prediction_type,
    clip,
    guidance,
    guidance_scale,
):
    _check(
        kind, sample, model_output, history, noise, threshold_scale, coef, prediction_type, guidance
    )
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape)


@torch.library.register_fake("genext::sampler_step_out")
def _fake_out(
    kind,
    sample,
    model_output,
    history,
    noise,
    threshold_scale,
    coef,
    prediction_type,
    clip,
    guidance,
    guidance_scale,
    prev,
    x0,
):
    read = _check(
        kind, sample, model_output, history, noise, threshold_scale, coef, prediction_type, guidance
    )
    _check_out("prev", prev, sample)
    _check_out("x0", x0, sample)
    _check_no_overlap(read, prev, x0)
    return None


def _no_backward(ctx, *grads):
    raise NotImplementedError(
        f"{_OPNAME}: not differentiable (an inference-only sampler step); call it under "
        "torch.no_grad() or detach its inputs"
    )


def _no_context(ctx, inputs, output):
    pass


# Without an autograd formula the raw op's outputs would require grad and silently give no
# gradient; this makes a backward through it a clear error instead.
torch.library.register_autograd("genext::sampler_step", _no_backward, setup_context=_no_context)
