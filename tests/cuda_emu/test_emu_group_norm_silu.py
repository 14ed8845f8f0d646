"""The GroupNorm(+SiLU) CUDA kernels (csrc/group_norm_silu/*.cu) under the CPU emulation
(tests/cuda_emu/README.md): forward and backward against the float64 reference on the op tests'
shapes, in both layouts, with and without the affine and SiLU, in fp32 and 16-bit, on every launch
plan (the fused one-block-per-group forward, the split forward for groups too large for shared
memory, channels-last, with more channels than a block covers at once; the backward's
warp-per-row, split and channels-last kernels), with grids
sized for 1 and for 132 multiprocessors; every buffer a launch touches ends at a guard page. An
emulation, not a GPU run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402

from genext import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_group_norm_silu import FP32_TOL, SHAPES, _grads, make_affine, make_input  # noqa: E402

from conftest import max_err, rel_err  # noqa: E402

# groups too large for one block's shared memory (the split forward), and rows longer than the
# backward's warp-per-row limit (its split kernel): 4 x 10000 fp32 values per group
LARGE = [((1, 4, 100, 100), 1), ((2, 8, 41, 41), 2)]
# more channels than one channels-last block covers at once (256 threads x 4 or 8 channels): its
# kernels loop over chunks of channels, reusing their shared memory
WIDE = [((2, 2080, 3, 2), 16), ((1, 4104, 2, 1), 8)]


# a build of about 40 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("group_norm_silu")


def _ref(x, groups, w, b, silu):
    d = None if w is None else w.double()
    e = None if b is None else b.double()
    return reference.group_norm_silu(x.double(), groups, d, e, 1e-5, "silu" if silu else None)


def _check_forward(emu, shape, groups, dtype, channels_last, affine, silu, sms):
    x = make_input(shape, dtype, "cpu", channels_last)
    w, b = make_affine(shape[1], dtype, "cpu") if affine else (None, None)
    y, mean, rstd = emu.group_norm_silu(x, groups, w, b, 1e-5, silu, sms)
    assert y.shape == x.shape and y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    ref = _ref(x, groups, w, b, silu)
    if dtype == torch.float32:
        assert rel_err(y, ref) < FP32_TOL
    else:
        act = "silu" if silu else None
        pt = reference.group_norm_silu_eager(x, groups, w, b, 1e-5, act)
        assert max_err(y, ref) <= 2 * max_err(pt, ref) + 1e-6
    xg = x.double().reshape(shape[0], groups, -1)
    assert torch.allclose(mean.double(), xg.mean(-1), rtol=1e-5, atol=1e-5)
    want_rstd = (xg.var(-1, unbiased=False) + 1e-5).rsqrt()
    assert torch.allclose(rstd.double(), want_rstd, rtol=1e-4)
    return x, w, b, mean, rstd


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("shape,groups", SHAPES + LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine,silu", [(True, True), (False, False)])
def test_forward(emu, shape, groups, dtype, channels_last, affine, silu, sms):
    _check_forward(emu, shape, groups, dtype, channels_last, affine, silu, sms)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("shape,groups", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[7]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine,silu", [(True, True), (False, True), (True, False)])
def test_backward(emu, shape, groups, dtype, channels_last, affine, silu, sms):
    _check_backward(emu, shape, groups, dtype, channels_last, affine, silu, sms)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("shape,groups", LARGE)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_large(emu, shape, groups, channels_last, sms):
    _check_backward(emu, shape, groups, torch.float32, channels_last, True, True, sms)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("shape,groups", WIDE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_channels_last(emu, shape, groups, dtype, sms):
    _check_backward(emu, shape, groups, dtype, True, True, True, sms)


def _check_backward(emu, shape, groups, dtype, channels_last, affine, silu, sms):
    x, w, b, mean, rstd = _check_forward(
        emu, shape, groups, dtype, channels_last, affine, silu, sms
    )
    gy = make_input(shape, dtype, "cpu", channels_last, offset=0.5, scale=1.0)
    ours = emu.group_norm_silu_backward(gy, x, mean, rstd, w, b, groups, silu, sms)
    act = "silu" if silu else None
    ref = _grads(
        lambda x, *p: reference.group_norm_silu(x, groups, *p, activation=act),
        x.double(),
        None if w is None else w.double(),
        None if b is None else b.double(),
        gy.double(),
    )
    got = ours if affine else ours[:1]
    assert len(got) == len(ref) and got[0].shape == x.shape
    if dtype == torch.float32:
        for o, r in zip(got, ref):
            assert rel_err(o, r) < FP32_TOL
    else:
        pt = _grads(
            lambda x, *p: reference.group_norm_silu_eager(x, groups, *p, activation=act),
            x,
            w,
            b,
            gy,
        )
        for o, p, r in zip(got, pt, ref):
            assert max_err(o, r) <= 2 * max_err(p, r) + 1e-6


@pytest.mark.parametrize("wdtype", [torch.float32, "mixed"])
def test_float32_params_with_16bit_input(emu, wdtype):
    x = make_input((2, 32, 12, 12), torch.bfloat16, "cpu")
    w, b = make_affine(32, torch.float32, "cpu")
    if wdtype == "mixed":  # one float32, one bf16: both read as float32
        b = b.bfloat16()
    y, _, _ = emu.group_norm_silu(x, 8, w, b, 1e-5, True, 132)
    ref = _ref(x, 8, w, b, True)
    pt = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 8, w, b.float()))
    assert max_err(y, ref) <= 2 * max_err(pt.bfloat16(), ref) + 1e-6
