"""genext::sampler_step, the fused scheduler step, against its plain-PyTorch specification
(genext.reference.sampler_step): bit-identical in fp32 on every mode and option, 16-bit samples
within rounding, bad inputs, opcheck, torch.compile, and CUDA graph capture of a step loop."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from genext.ops._sampler_step import StepKind, sampler_step
from genext.reference import sampler_step as eager_step

FWD = torch.ops.genext.sampler_step


def _coef(mode: int, rng: random.Random) -> list[float]:
    c = [rng.uniform(0.3, 1.2) for _ in range(12)]
    c[6] = rng.choice([0.0, 1.0]) if mode == StepKind.DDIM else c[6]
    return c


def _cases():
    for mode, pt, guided, n_hist, noise, thr, clip in itertools.product(
        range(4), range(3), (False, True), (0, 1, 2), (False, True), (False, True), (False, True)
    ):
        if n_hist and mode != StepKind.DPM:
            continue
        if mode == StepKind.FLOW and (pt or thr or clip):
            continue  # flow matching ignores these
        yield mode, pt, guided, n_hist, noise, thr, clip


def _inputs(shape, dtype, device, guided, n_hist, noise, thr, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x = r(*shape)
    m = r(2 * shape[0], *shape[1:]) if guided else r(*shape)
    hist = [r(*shape) for _ in range(n_hist)]
    nz = r(*shape) if noise else None
    s = (torch.rand(shape[0], generator=g) + 1.0).to(device) if thr else None
    return x, m, hist, nz, s


@pytest.mark.parametrize("case", list(_cases()))
def test_matches_eager_bit_for_bit(case, device):
    mode, pt, guided, n_hist, noise, thr, clip = case
    x, m, hist, nz, s = _inputs((2, 4, 9, 7), torch.float32, device, guided, n_hist, noise, thr)
    coef = _coef(mode, random.Random(hash(case) & 0xFFFF))
    kw = dict(
        prediction_type=pt,
        history=hist,
        noise=nz,
        threshold_scale=s,
        clip=clip,
        guidance_scale=7.5 if guided else None,
    )
    prev, x0 = sampler_step(mode, x, m, coef, **kw)
    want_prev, want_x0 = eager_step(mode, x, m, coef, **kw)
    assert torch.equal(prev, want_prev)
    assert torch.equal(x0, want_x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, "same"])
def test_16bit_samples(dtype, model_dtype, device):
    x, m, hist, nz, _ = _inputs((3, 4, 8, 8), dtype, device, True, 2, True, False)
    if model_dtype != "same":
        m = m.to(model_dtype)
    coef = _coef(StepKind.DPM, random.Random(1))
    kw = dict(history=hist, noise=nz, guidance_scale=5.0)
    prev, x0 = sampler_step(StepKind.DPM, x, m, coef, **kw)
    want_prev, want_x0 = eager_step(StepKind.DPM, x, m, coef, **kw)
    assert prev.dtype == dtype and x0.dtype == dtype
    # same fp32 arithmetic, one rounding to the sample dtype at the end
    assert torch.equal(prev, want_prev)
    assert torch.equal(x0, want_x0)


def test_odd_sizes_and_views(device):
    # 5 * 3 * 7 elements (not a multiple of 4), and a non-contiguous sample
    x, m, hist, nz, s = _inputs((5, 3, 7), torch.float32, device, False, 0, True, True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    coef = _coef(StepKind.DDIM, random.Random(2))
    a = sampler_step(StepKind.DDIM, xt, m, coef, noise=nz, threshold_scale=s)
    b = eager_step(StepKind.DDIM, x, m, coef, noise=nz, threshold_scale=s)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs(device):
    x = torch.randn(2, 4, 8, 8, device=device)
    c = [1.0] * 12
    with pytest.raises(ValueError, match="mode must be"):
        FWD(7, x, x, [], None, None, c, 0, False, False, 1.0)
    with pytest.raises(ValueError, match="prediction_type must be"):
        FWD(0, x, x, [], None, None, c, 5, False, False, 1.0)
    with pytest.raises(ValueError, match="coef must hold 12"):
        FWD(0, x, x, [], None, None, c[:5], 0, False, False, 1.0)
    with pytest.raises(ValueError, match=r"\[uncond; cond\]"):
        FWD(0, x, x, [], None, None, c, 0, False, True, 5.0)
    with pytest.raises(ValueError, match="history is used by mode 2 only"):
        FWD(0, x, x, [x], None, None, c, 0, False, False, 1.0)
    with pytest.raises(ValueError, match="threshold_scale must have shape"):
        FWD(0, x, x, [], None, torch.ones(3, device=device), c, 0, False, False, 1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        FWD(0, x.long(), x, [], None, None, c, 0, False, False, 1.0)
    with pytest.raises(ValueError, match="noise must have the sample's shape"):
        FWD(0, x, x, [], x[:1], None, c, 0, False, False, 1.0)


def test_opcheck():
    x, m, hist, nz, s = _inputs((2, 4, 6, 6), torch.float32, "cpu", True, 2, True, True)
    torch.library.opcheck(FWD, (StepKind.DPM, x, m, hist, nz, s, [0.5] * 12, 2, False, True, 3.0))
    torch.library.opcheck(
        FWD, (StepKind.DDIM, x, m[:2], [], None, None, [0.9] * 12, 0, True, False, 1.0)
    )


def test_compile_fullgraph():
    x, m, hist, _, _ = _inputs((2, 4, 8, 8), torch.float32, "cpu", False, 1, False, False)
    coef = _coef(StepKind.DPM, random.Random(3))

    def step(x, m, h):
        return sampler_step(StepKind.DPM, x, m, coef, history=[h])

    got = torch.compile(step, fullgraph=True)(x, m, hist[0])
    want = step(x, m, hist[0])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda
def test_cuda_graph_loop_replays():
    # a 10-step DPM-style loop captured once; replay equals the eager loop
    x0_init, m_fixed, _, _, _ = _inputs(
        (2, 4, 16, 16), torch.float32, "cuda", False, 0, False, False
    )
    coefs = [_coef(StepKind.DPM, random.Random(10 + i)) for i in range(10)]

    def loop(x):
        hist: list[torch.Tensor] = []
        for c in coefs:
            x, d = sampler_step(StepKind.DPM, x, m_fixed * x.tanh(), c, history=hist[:1])
            hist = [d] + hist
        return x

    want = loop(x0_init.clone())
    static_x = x0_init.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_out_and_in_place(mode, device):
    x, m, hist, nz, _ = _inputs(
        (2, 4, 8, 8), torch.float32, device, True, 2 if mode == StepKind.DPM else 0, True, False
    )
    coef = _coef(mode, random.Random(4))
    kw = dict(history=hist, noise=nz, guidance_scale=3.0)
    want_prev, want_x0 = sampler_step(mode, x, m, coef, **kw)
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    got = sampler_step(mode, x, m, coef, out=out, x0_out=x0, **kw)
    assert got[0] is out and got[1] is x0
    assert torch.equal(out, want_prev) and torch.equal(x0, want_x0)
    y = x.clone()  # in place: the sample is overwritten by the new sample
    sampler_step(mode, y, m, coef, out=y, **kw)
    assert torch.equal(y, want_prev)


def test_out_bad_and_opcheck(device):
    x = torch.randn(2, 4, 8, 8, device=device)
    c = [0.5] * 12
    with pytest.raises(ValueError, match="prev must have the sample's shape"):
        torch.ops.genext.sampler_step_out(
            0,
            x,
            x,
            [],
            None,
            None,
            c,
            0,
            False,
            False,
            1.0,
            torch.empty(3, device=device),
            torch.empty_like(x),
        )
    with pytest.raises(TypeError, match="x0 must have the sample's dtype"):
        torch.ops.genext.sampler_step_out(
            0,
            x,
            x,
            [],
            None,
            None,
            c,
            0,
            False,
            False,
            1.0,
            torch.empty_like(x),
            torch.empty_like(x).half(),
        )
    if device == "cpu":
        torch.library.opcheck(
            torch.ops.genext.sampler_step_out,
            (
                2,
                x,
                x,
                [x.clone()],
                None,
                None,
                c,
                0,
                False,
                False,
                1.0,
                torch.empty_like(x),
                torch.empty_like(x),
            ),
        )


def test_scheduler_step_in_place_matches():
    from genext.samplers import DDIMScheduler, DPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    m = torch.randn(2, 4, 16, 16, generator=g)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        a, b = cls(), cls()
        a.set_timesteps(10)
        b.set_timesteps(10)
        ya, yb = x.clone(), x.clone()
        for t in a.timesteps:
            ya = a.step(m * ya.tanh(), t, ya).prev_sample
            b.step(m * yb.tanh(), t, yb, out=yb)  # in place
        assert torch.equal(ya, yb)
