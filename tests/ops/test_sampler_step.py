"""genext::sampler_step, the fused scheduler step, against its plain-PyTorch specification
(genext.reference.sampler_step): bit-identical in fp32 on every mode and option, 16-bit samples
within rounding, bad inputs, opcheck, torch.compile, and CUDA graph capture of a step loop."""

from __future__ import annotations

import itertools
import random
import re

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


# ---- memory shared between outputs and inputs -----------------------------------------------------


def _alias_case(case, device):
    """Inputs and outputs of a DPM order-3 step with noise (every input the kernels read) where
    the outputs share memory as `case` says; returns (kwargs of sampler_step, expected message)."""
    shape = (2, 3, 5, 7)
    x, m, hist, nz, _ = _inputs(shape, torch.float32, device, False, 2, True, False)
    buf = torch.randn(2 * x.numel() + 1, device=device)
    flat = x.numel()
    out, x0 = torch.randn_like(x), torch.randn_like(x)  # not empty: compared after the call
    if case == "x0_out=sample":
        x0, want = x, "x0_out \\(x0\\) and sample"
    elif case == "x0_out=model_output":
        x0, want = m, "x0_out \\(x0\\) and model_output"
    elif case == "out=model_output":
        out, want = m, "out \\(prev\\) and model_output"
    elif case == "out=noise":
        out, want = nz, "out \\(prev\\) and noise"
    elif case == "x0_out=noise":
        x0, want = nz, "x0_out \\(x0\\) and noise"
    elif case == "out=history[0]":
        out, want = hist[0], "out \\(prev\\) and history\\[0\\]"
    elif case == "out=history[1]":
        out, want = hist[1], "out \\(prev\\) and history\\[1\\]"
    elif case == "x0_out=history[0]":
        x0, want = hist[0], "x0_out \\(x0\\) and history\\[0\\]"
    elif case == "out=x0_out":
        x0, want = out, "out \\(prev\\) and x0_out \\(x0\\)"
    elif case == "out shifted over sample":  # partial overlap: one element apart
        x = buf[:flat].view(shape)
        out, want = buf[1 : flat + 1].view(shape), "out \\(prev\\) and sample"
    elif case == "out shifted over x0_out":
        out = buf[:flat].view(shape)
        x0, want = buf[1 : flat + 1].view(shape), "out \\(prev\\) and x0_out \\(x0\\)"
    elif case == "x0_out half over noise":
        nz = buf[:flat].view(shape)
        x0, want = buf[flat // 2 : flat // 2 + flat].view(shape), "x0_out \\(x0\\) and noise"
    elif case == "out=sample, noise=sample":  # in place, but the sample is read again as noise
        out, nz, want = x, x, "out \\(prev\\) and noise"
    else:
        raise AssertionError(case)
    kw = dict(history=hist, noise=nz, out=out, x0_out=x0)
    return x, m, kw, want


_ALIAS_CASES = [
    "x0_out=sample",
    "x0_out=model_output",
    "out=model_output",
    "out=noise",
    "x0_out=noise",
    "out=history[0]",
    "out=history[1]",
    "x0_out=history[0]",
    "out=x0_out",
    "out shifted over sample",
    "out shifted over x0_out",
    "x0_out half over noise",
    "out=sample, noise=sample",
]


@pytest.mark.parametrize("case", _ALIAS_CASES)
def test_outputs_sharing_memory_raise(case, device):
    # each case gave wrong values without an error; the outputs are left untouched
    x, m, kw, want = _alias_case(case, device)
    coef = _coef(StepKind.DPM, random.Random(5))
    before = [t.clone() for t in (x, m, kw["out"], kw["x0_out"], kw["noise"], *kw["history"])]
    with pytest.raises(RuntimeError, match=f"sampler_step: {want}.* share memory"):
        sampler_step(StepKind.DPM, x, m, coef, **kw)
    after = [x, m, kw["out"], kw["x0_out"], kw["noise"], *kw["history"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("case", _ALIAS_CASES)
def test_fake_kernel_rejects_the_same_sharing(case):
    # meta tensors reach the fake kernel: it must raise as the CPU and CUDA bindings do
    x, m, kw, want = _alias_case(case, "meta")
    with pytest.raises(RuntimeError, match=f"sampler_step: {want}.* share memory"):
        sampler_step(StepKind.DPM, x, m, [0.5] * 12, **kw)


def test_threshold_scale_as_output_raises(device):
    # a 1-D sample of N elements: threshold_scale (N,) float32 can be passed as out
    x = torch.randn(6, device=device)
    m = torch.randn(6, device=device)
    s = torch.rand(6, device=device) + 1.0
    for dev in (device, "meta"):
        xx, mm, ss = (t.to(dev) for t in (x, m, s))
        with pytest.raises(RuntimeError, match="out \\(prev\\) and threshold_scale share memory"):
            sampler_step(StepKind.DDIM, xx, mm, [0.5] * 12, threshold_scale=ss, out=ss)


def test_raw_op_rejects_sharing_too(device):
    x, m, hist, nz, _ = _inputs((2, 4, 8, 8), torch.float32, device, False, 0, True, False)
    with pytest.raises(RuntimeError, match="x0_out \\(x0\\) and sample share memory"):
        torch.ops.genext.sampler_step_out(
            0, x, m, [], nz, None, [0.5] * 12, 0, False, False, 1.0, torch.empty_like(x), x
        )


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_matches_reference(mode, dtype, device):
    # out = sample, the one sharing allowed, with every input the mode reads
    n_hist = 2 if mode == StepKind.DPM else 0
    x, m, hist, nz, s = _inputs(
        (2, 4, 9, 7), dtype, device, True, n_hist, True, mode != StepKind.FLOW
    )
    coef = _coef(mode, random.Random(6))
    kw = dict(history=hist, noise=nz, threshold_scale=s, guidance_scale=2.0)
    want_prev, want_x0 = eager_step(mode, x, m, coef, **kw)
    y, x0 = x.clone(), torch.full_like(x, float("nan"))
    got = sampler_step(mode, y, m, coef, out=y, x0_out=x0, **kw)
    assert got[0] is y
    assert torch.equal(y, want_prev) and torch.equal(x0, want_x0)
    # all on meta: the fake kernel lets the in-place step through as well
    ym = y.to("meta")
    hm = [h.to("meta") for h in hist]
    sampler_step(mode, ym, m.to("meta"), coef, out=ym, history=hm, guidance_scale=2.0)


def test_expanded_output_raises(device):
    # an output with internal overlap (stride 0) would have many elements written at one address
    for dev in (device, "meta"):
        x = torch.randn(2, 4, 8, 8, device=dev)
        out = torch.empty(1, 4, 8, 8, device=dev).expand(2, 4, 8, 8)
        with pytest.raises(ValueError, match="sampler_step_out: prev must be contiguous"):
            sampler_step(0, x, x * 2, [0.5] * 12, out=out)


# ---- meta tensors and the fake kernels -----------------------------------------------------------

_TENSOR_ARGS = [
    "sample",
    "model_output",
    "history[0]",
    "history[1]",
    "noise",
    "threshold_scale",
    "out",
    "x0_out",
]


def _all_args(device):
    x, m, hist, nz, s = _inputs((2, 4, 6, 6), torch.float32, device, False, 2, True, True)
    return dict(
        sample=x,
        model_output=m,
        history=hist,
        noise=nz,
        threshold_scale=s,
        out=torch.empty_like(x),
        x0_out=torch.empty_like(x),
    )


def _call(a, out=True):
    kw = dict(history=a["history"], noise=a["noise"], threshold_scale=a["threshold_scale"])
    if out:
        kw.update(out=a["out"], x0_out=a["x0_out"])
    return sampler_step(StepKind.DPM, a["sample"], a["model_output"], [0.5] * 12, **kw)


@pytest.mark.parametrize("arg", _TENSOR_ARGS)
@pytest.mark.parametrize("out", [False, True])
def test_meta_argument_beside_cpu_raises(arg, out):
    # the dispatcher sends a call with any meta tensor to the fake kernel, which returned
    # uninitialised outputs without checking devices
    if arg in ("out", "x0_out") and not out:
        pytest.skip("no output tensors without out")
    a = _all_args("cpu")
    if arg.startswith("history"):
        i = int(arg[-2])
        a["history"][i] = a["history"][i].to("meta")
    else:
        a[arg] = a[arg].to("meta")
    if arg == "sample":
        want = "sampler_step: model_output is on cpu but sample is on meta"
    else:
        name = {"out": "prev", "x0_out": "x0"}.get(arg, arg)
        op = "sampler_step_out" if arg in ("out", "x0_out") else "sampler_step"
        want = f"{op}: {name} is on meta but sample is on cpu"
    with pytest.raises(RuntimeError, match=re.escape(want)):
        _call(a, out)


@pytest.mark.parametrize("out", [False, True])
def test_all_meta_works(out):
    a = _all_args("meta")
    prev, x0 = _call(a, out)
    assert prev.device.type == "meta" and prev.shape == a["sample"].shape
    assert x0.shape == a["sample"].shape and x0.dtype == torch.float32


def _bad_calls(device):
    """(callable, exception type, message pattern) for each check of the bindings."""
    x = torch.randn(2, 4, 8, 8, device=device)
    c = [1.0] * 12

    def fwd(*args, **kw):
        a = dict(kind=0, x=x, m=x, h=[], nz=None, s=None, c=c, pt=0, clip=False, guide=False, w=1.0)
        a.update(kw)
        return lambda: FWD(*a.values())

    def out(prev, x0):
        return lambda: torch.ops.genext.sampler_step_out(
            0, x, x * 2, [], None, None, c, 0, False, False, 1.0, prev, x0
        )

    e = torch.empty_like
    return [
        (fwd(kind=7), ValueError, "sampler_step: mode must be"),
        (fwd(pt=5), ValueError, "sampler_step: prediction_type must be"),
        (fwd(c=c[:5]), ValueError, "sampler_step: coef must hold 12"),
        (fwd(x=x.long()), TypeError, "sampler_step: sample and model_output must be float32"),
        (fwd(m=x.double()), TypeError, "sampler_step: sample and model_output must be float32"),
        (fwd(x=x[0, 0, 0, 0]), ValueError, "sampler_step: sample must have a batch dim"),
        (fwd(guide=True), ValueError, r"sampler_step: model_output must have shape .*\[uncond"),
        (fwd(m=x[:1]), ValueError, "sampler_step: model_output must have shape"),
        (fwd(kind=2, h=[x, x, x]), ValueError, "sampler_step: at most 2 history tensors"),
        (fwd(h=[x]), ValueError, "sampler_step: history is used by mode 2 only"),
        (fwd(kind=2, h=[x[:1]]), ValueError, r"sampler_step: history\[0\] must have the sample"),
        (fwd(kind=2, h=[x, x.long()]), TypeError, r"sampler_step: history\[1\] must be float32"),
        (fwd(nz=x[:1]), ValueError, "sampler_step: noise must have the sample's shape"),
        (fwd(nz=x.int()), TypeError, "sampler_step: noise must be float32"),
        (fwd(s=x[0, 0, 0]), ValueError, "sampler_step: threshold_scale must have shape"),
        (out(x[:1], e(x)), ValueError, "sampler_step_out: prev must have the sample's shape"),
        (out(e(x), e(x).half()), TypeError, "sampler_step_out: x0 must have the sample's dtype"),
        (out(e(x).mT, e(x)), ValueError, "sampler_step_out: prev must be contiguous"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls("cpu"))))
def test_fake_kernel_checks_like_the_bindings(i, device):
    # the same bad call on the device and on meta raises the same exception type and message
    for dev in (device, "meta"):
        call, exc, pattern = _bad_calls(dev)[i]
        with pytest.raises(exc, match=pattern):
            call()


def test_compile_dynamic_shapes_out():
    # the fake kernels' checks work on symbolic shapes (no data-dependent error, no graph break)
    def step(x, m, h, out):
        return sampler_step(StepKind.DPM, x, m, [0.5] * 12, history=[h], out=out)

    fn = torch.compile(step, fullgraph=True, dynamic=True)
    for shape in [(2, 4, 8, 8), (3, 4, 5, 7)]:
        x, m, h = (torch.randn(shape) for _ in range(3))
        want = sampler_step(StepKind.DPM, x, m, [0.5] * 12, history=[h])
        got = fn(x, m, h, torch.empty_like(x))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- autograd -------------------------------------------------------------------------------------


def test_not_differentiable():
    # outputs required grad and their backward gave None gradients silently
    x, m, _, _, _ = _inputs((2, 4, 8, 8), torch.float32, "cpu", False, 0, False, False)
    x.requires_grad_()
    m.requires_grad_()
    prev, x0 = sampler_step(StepKind.DDIM, x, m, [0.5] * 12)
    assert not prev.requires_grad and not x0.requires_grad
    prev, x0 = FWD(0, x, m, [], None, None, [0.5] * 12, 0, False, False, 1.0)
    with pytest.raises(NotImplementedError, match="sampler_step: not differentiable"):
        prev.sum().backward()


def test_compile_rejects_sharing_and_keeps_in_place():
    # compiled code raises as eager does (the fake kernel while tracing), and in place still works
    def shared(x, m):
        return sampler_step(StepKind.DDIM, x, m, [0.5] * 12, x0_out=x)

    def in_place(x, m):
        return sampler_step(StepKind.DDIM, x, m, [0.5] * 12, out=x)

    x, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(Exception, match="x0_out \\(x0\\) and sample share memory"):
        torch.compile(shared, fullgraph=True)(x.clone(), m)
    want = eager_step(StepKind.DDIM, x, m, [0.5] * 12)
    y = x.clone()
    torch.compile(in_place, fullgraph=True)(y, m)
    assert torch.equal(y, want[0])


@pytest.mark.parametrize("case", [c for c in _cases() if c[2] and c[4]])  # guided, with noise
def test_nonfinite_inputs_propagate_as_in_the_reference(case, device):
    # NaN and inf in any input give NaN / inf exactly where the eager specification does (clamp
    # and thresholding included: a NaN is never clamped to a finite value), the rest bit-identical
    mode, pt, guided, n_hist, noise, thr, clip = case
    x, m, hist, nz, s = _inputs((2, 3, 5, 7), torch.float32, device, guided, n_hist, noise, thr)
    x[0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    m[1, 1, 1, 2:4] = torch.tensor([float("nan"), -float("inf")])  # the uncond half
    m[3, 2, 2, 4] = float("inf")  # the cond half
    nz[1, 2, 3, 5] = float("nan")
    for h in hist:
        h[0, 1, 4, 6] = float("inf")
    coef = _coef(mode, random.Random(hash(case) & 0xFFFF))
    kw = dict(prediction_type=pt, history=hist, noise=nz, threshold_scale=s, clip=clip)
    kw["guidance_scale"] = 3.0
    got = sampler_step(mode, x, m, coef, **kw)
    want = eager_step(mode, x, m, coef, **kw)
    for a, b in zip(got, want):
        assert not torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
