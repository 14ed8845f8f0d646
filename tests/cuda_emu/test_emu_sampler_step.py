"""The sampler step's CUDA kernel (csrc/sampler_step/sampler_step.cu) under the CPU emulation
(tests/cuda_emu/README.md): its launcher, compiled for the host, on CPU tensors against the
plain-PyTorch specification, bit for bit in fp32, on every mode and option, both the 4-element and
the 1-element kernel, 16-bit samples, and in place; every tensor the kernel reads or writes ends at
a guard page (guard.py), so an access past an end is an error. An emulation, not a GPU run."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
from guard import guarded  # noqa: E402

from genext.ops._sampler_step import NUM_COEF, StepKind  # noqa: E402
from genext.reference import sampler_step as eager_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_sampler_step import _cases, _coef, _inputs  # noqa: E402

# (2, 4, 8, 8): 512 elements, the 4-element kernel; (3, 5, 7): 105, the 1-element kernel
SHAPES = [(2, 4, 8, 8), (3, 5, 7)]


# a build of about 40 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("sampler_step")


def _g(t):
    return None if t is None else guarded(t)


def _args(mode, x, m, coef, hist=(), noise=None, s=None, pt=0, clip=False, w=None):
    """The raw op's arguments, every tensor copied into guarded memory."""
    coef = list(coef) + [0.0] * (NUM_COEF - len(coef))
    hist = [_g(h) for h in hist]
    return (mode, _g(x), _g(m), hist, _g(noise), _g(s), coef, pt, clip, w is not None, w or 1.0)


def _kw(hist=(), noise=None, s=None, pt=0, clip=False, w=None):
    return dict(
        history=list(hist),
        noise=noise,
        threshold_scale=s,
        prediction_type=pt,
        clip=clip,
        guidance_scale=w,
    )


def _outs(x):
    return guarded(torch.full_like(x, float("nan"))), guarded(torch.full_like(x, float("nan")))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(_cases()))
def test_matches_eager_bit_for_bit(emu, case, shape):
    mode, pt, guided, n_hist, noise, thr, clip = case
    x, m, hist, nz, s = _inputs(shape, torch.float32, "cpu", guided, n_hist, noise, thr)
    coef = _coef(mode, random.Random(hash(case) & 0xFFFF))
    w = 7.5 if guided else None
    prev, x0 = _outs(x)
    emu.sampler_step_out(*_args(mode, x, m, coef, hist, nz, s, pt, clip, w), prev, x0)
    want_prev, want_x0 = eager_step(mode, x, m, coef, **_kw(hist, nz, s, pt, clip, w))
    assert torch.equal(prev, want_prev)
    assert torch.equal(x0, want_x0)


@pytest.mark.parametrize("shape", SHAPES)
def test_allocating_launch(emu, shape):
    x, m, hist, nz, s = _inputs(shape, torch.float32, "cpu", True, 2, True, True)
    coef = _coef(StepKind.DPM, random.Random(3))
    prev, x0 = emu.sampler_step(*_args(StepKind.DPM, x, m, coef, hist, nz, s, w=4.0))
    want_prev, want_x0 = eager_step(StepKind.DPM, x, m, coef, **_kw(hist, nz, s, w=4.0))
    assert torch.equal(prev, want_prev) and torch.equal(x0, want_x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 5, 7)])
def test_16bit_samples(emu, dtype, model_dtype, shape):
    x, m, hist, nz, _ = _inputs(shape, dtype, "cpu", True, 2, True, False)
    if model_dtype != "same":
        m = m.to(model_dtype)
    coef = _coef(StepKind.DPM, random.Random(1))
    prev, x0 = _outs(x)
    emu.sampler_step_out(*_args(StepKind.DPM, x, m, coef, hist, nz, w=5.0), prev, x0)
    want_prev, want_x0 = eager_step(StepKind.DPM, x, m, coef, **_kw(hist, nz, w=5.0))
    assert torch.equal(prev, want_prev)
    assert torch.equal(x0, want_x0)


def test_misaligned_views_take_the_one_element_kernel(emu):
    # 512 elements starting one float past a 16-byte boundary: no 4-element accesses
    x, m, _, nz, s = _inputs((2, 4, 8, 8), torch.float32, "cpu", False, 0, True, True)
    xs = guarded(torch.empty(x.numel() + 1))[1:].view_as(x).copy_(x)
    coef = _coef(StepKind.DDIM, random.Random(2))
    args = list(_args(StepKind.DDIM, x, m, coef, noise=nz, s=s))
    args[1] = xs
    prev, x0 = _outs(x)
    emu.sampler_step_out(*args, prev, x0)
    want_prev, want_x0 = eager_step(StepKind.DDIM, x, m, coef, **_kw(noise=nz, s=s))
    assert torch.equal(prev, want_prev) and torch.equal(x0, want_x0)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_in_place(emu, mode, shape):
    # out = sample: each thread reads its elements before it writes them
    n_hist = 2 if mode == StepKind.DPM else 0
    x, m, hist, nz, s = _inputs(shape, torch.float32, "cpu", True, n_hist, True, mode != 3)
    coef = _coef(mode, random.Random(6))
    want_prev, want_x0 = eager_step(mode, x, m, coef, **_kw(hist, nz, s, w=2.0))
    args = _args(mode, x, m, coef, hist, nz, s, w=2.0)
    y, x0 = args[1], _outs(x)[1]
    emu.sampler_step_out(*args, y, x0)
    assert torch.equal(y, want_prev) and torch.equal(x0, want_x0)
