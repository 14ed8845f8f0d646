"""genext.ops.clip_loss / siglip_loss and their tiled primitives against float64 eager losses:
values and gradients, N across tile edges, N = 1, odd D, rectangular blocks, extreme logit
scales in 16-bit, gradcheck, opcheck, compile, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext import _C, reference
from genext.ops import clip_loss, siglip_loss

from conftest import slow


def _ref_clip(i, t, s, b, offset=0):
    return reference.clip_loss(
        i.double(), t.double(), s.double(), b.double() if b is not None else None, offset
    )


def _ref_siglip(i, t, s, b, negative_only=False):
    return reference.siglip_loss(i.double(), t.double(), s.double(), b.double(), negative_only)


def _leaves(n, m, d, device, dtype=torch.float32, scale=10.0, bias=-2.0):
    g = torch.Generator().manual_seed(n * 131 + m * 7 + d)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    t = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    s = torch.tensor(scale, device=device, requires_grad=True)
    b = torch.tensor(bias, device=device, requires_grad=True)
    return i, t, s, b


def _compare(ours, ref, leaves, tol):
    assert torch.isfinite(ours).all()
    assert abs(ours.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    g1 = torch.autograd.grad(ours, leaves, allow_unused=True)
    g2 = torch.autograd.grad(ref, leaves, allow_unused=True)
    for a, b in zip(g1, g2):
        if b is None:
            continue
        assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a - b).abs().max()


@pytest.mark.parametrize("n,d", [(1, 5), (7, 13), (64, 32), (1100, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_reference(n, d, with_bias, device):
    i, t, s, b = _leaves(n, n, d, device)
    bias = b if with_bias else None
    leaves = (i, t, s, b) if with_bias else (i, t, s)
    _compare(clip_loss(i, t, s, bias), _ref_clip(i, t, s, bias), leaves, 1e-5)


@pytest.mark.parametrize("n,m,offset", [(4, 12, 0), (4, 12, 8), (3, 5, 2)])
def test_clip_rectangular(n, m, offset, device):
    i, t, s, _ = _leaves(n, m, 16, device)
    _compare(
        clip_loss(i, t, s, labels_offset=offset), _ref_clip(i, t, s, None, offset), (i, t, s), 1e-5
    )


@pytest.mark.parametrize("n,d", [(1, 5), (9, 13), (1100, 8)])
@pytest.mark.parametrize("negative_only", [False, True])
def test_siglip_matches_reference(n, d, negative_only, device):
    m = n if not negative_only else n + 3
    i, t, s, b = _leaves(n, m, d, device)
    _compare(
        siglip_loss(i, t, s, b, negative_only=negative_only),
        _ref_siglip(i, t, s, b, negative_only),
        (i, t, s, b),
        1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_scale_16bit(dtype, device):
    i, t, s, b = _leaves(33, 33, 24, device, dtype=dtype, scale=150.0, bias=-10.0)
    for ours, ref in (
        (clip_loss(i, t, s, b), _ref_clip(i, t, s, b)),
        (siglip_loss(i, t, s, b), _ref_siglip(i, t, s, b)),
    ):
        assert torch.isfinite(ours)
        grads = torch.autograd.grad(ours, (i, t, s, b))
        assert all(torch.isfinite(g).all() for g in grads)
        assert abs(ours.item() - ref.item()) <= 1e-3 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(130, 200, 136), (70, 129, 512), (1, 65, 8)])
def test_tiled_lse_16bit_against_float64(dtype, n, m, d, device):
    # rows and columns over several 64-row blocks, 64-column tiles and 64-feature chunks (the
    # fused CUDA kernel's, with GENEXT_CONTRASTIVE_FUSED=1), with a bias; float64 of the same
    # rounded features
    a = F.normalize(torch.randn(n, d), dim=1).to(device, dtype)
    b = F.normalize(torch.randn(m, d), dim=1).to(device, dtype)
    scale, bias = torch.tensor(14.3, device=device), torch.tensor(-3.0, device=device)
    rows, cols = torch.ops.genext.tiled_lse.default(a, b, scale, bias, True)
    logits = 14.3 * (a.double() @ b.double().T) - 3.0
    torch.testing.assert_close(rows.double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols.double(), torch.logsumexp(logits, 0), rtol=1e-5, atol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    i = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t2 = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: clip_loss(*x), (i, t, s, b))
    assert torch.autograd.gradcheck(lambda i, t, s: clip_loss(i, t, s, labels_offset=4), (i, t2, s))
    assert torch.autograd.gradcheck(lambda *x: siglip_loss(*x), (i, t, s, b))
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: siglip_loss(i, t, s, b, negative_only=True), (i, t2, s, b)
    )


def test_opcheck_and_compile():
    i, t = torch.randn(6, 8), torch.randn(6, 8)
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    torch.library.opcheck(torch.ops.genext.tiled_lse, (i, t, s, b, True))
    torch.library.opcheck(torch.ops.genext.tiled_lse, (i, t, s, None, False))
    torch.library.opcheck(torch.ops.genext.tiled_softplus_sum, (i, t, s, b))
    torch.library.opcheck(torch.ops.genext.tiled_softplus_sum, (i, t, s, b, True))
    leaves = [x.clone().requires_grad_() for x in (i, t, s, b)]
    torch.library.opcheck(torch.ops.genext.softplus_sum_with_weights, (*leaves, True))
    torch.library.opcheck(torch.ops.genext.softplus_sum_with_weights, (*leaves[:3], None, False))
    _, w, sums = torch.ops.genext.softplus_sum_with_weights(i, t, s, b, True)
    grad = torch.tensor(0.5)
    torch.library.opcheck(
        torch.ops.genext.softplus_sum_with_weights_backward, (grad, w, sums, i, t, s, b)
    )
    torch.library.opcheck(
        torch.ops.genext.softplus_sum_with_weights_backward, (grad, w, sums, i, t, s, None)
    )
    f = torch.compile(
        lambda i, t, s, b: clip_loss(i, t, s, b) + siglip_loss(i, t, s, b), fullgraph=True
    )
    want = clip_loss(i, t, s, b) + siglip_loss(i, t, s, b)
    assert torch.allclose(f(i, t, s, b), want, atol=1e-6)


def test_bad_inputs(device):
    i = torch.randn(4, 8, device=device)
    s = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match="one D"):
        clip_loss(i, torch.randn(4, 9, device=device), s)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        clip_loss(i.long(), i.long(), s)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        clip_loss(i, i, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="exceed"):
        clip_loss(i, torch.randn(5, 8, device=device), s, labels_offset=3)
    with pytest.raises(ValueError, match="negative_only"):
        siglip_loss(i, torch.randn(5, 8, device=device), s, 0.0)


# ---- devices, fake kernels, errors in the public names --------------------------------------


def _cpu_args():
    return torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0), torch.tensor(-1.0)


@pytest.mark.parametrize("loss", [clip_loss, siglip_loss])
@pytest.mark.parametrize("meta_arg", [0, 1, 2, 3])
def test_meta_beside_cpu_raises(loss, meta_arg):
    args = list(_cpu_args())
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match=f"{loss.__name__}: .* is on meta"):
        loss(*args)


@pytest.mark.parametrize("meta_arg", [0, 1, 2, 3])
def test_forward_ops_meta_beside_cpu_raise(meta_arg):
    args = list(_cpu_args())
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match="tiled_lse: .* is on meta"):
        torch.ops.genext.tiled_lse(*args, True)
    with pytest.raises(RuntimeError, match="tiled_softplus_sum: .* is on meta"):
        torch.ops.genext.tiled_softplus_sum(*args)
    with pytest.raises(RuntimeError, match="softplus_sum_with_weights: .* is on meta"):
        torch.ops.genext.softplus_sum_with_weights(*args)


@pytest.mark.parametrize("meta_arg", range(8))
def test_lse_backward_meta_beside_cpu_raises(meta_arg):
    a, b, s, bias = _cpu_args()
    args = [torch.randn(4), torch.randn(4), a, b, s, bias, torch.randn(4), torch.randn(4)]
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match="tiled_lse_backward: .* is on meta"):
        torch.ops.genext.tiled_lse_backward(*args)


@pytest.mark.parametrize("meta_arg", range(5))
def test_softplus_backward_meta_beside_cpu_raises(meta_arg):
    args = [torch.tensor(1.0), *_cpu_args()]
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match="tiled_softplus_sum_backward: .* is on meta"):
        torch.ops.genext.tiled_softplus_sum_backward(*args)


def test_all_meta_works():
    i, t, s, b = (x.to("meta") for x in _cpu_args())
    assert clip_loss(i, t, s, b).shape == () and siglip_loss(i, t, s, b).device.type == "meta"
    row, col = torch.ops.genext.tiled_lse(i, t, s, b, True)
    assert row.shape == (4,) and col.shape == (4,)
    grads = torch.ops.genext.tiled_lse_backward(row, col, i, t, s, b, row, col)
    assert [g.shape for g in grads] == [(4, 8), (4, 8), (), ()]
    grads = torch.ops.genext.tiled_softplus_sum_backward(s, i, t, s, None)
    assert [g.shape for g in grads] == [(4, 8), (4, 8), (), (0,)]
    total, weights, sums = torch.ops.genext.softplus_sum_with_weights(i, t, s, b, True)
    assert (total.shape, weights.shape, sums.shape) == ((), (4, 4), (2,))
    # the fake kernels raise the C++ kernels' exception types
    with pytest.raises(ValueError, match="one D"):
        torch.ops.genext.tiled_lse(i, t[:, :3], s, b, True)
    with pytest.raises(TypeError, match="must share a dtype"):
        torch.ops.genext.tiled_softplus_sum(i, t.double(), s, b)
    with pytest.raises(ValueError, match="grad_row must have shape"):
        torch.ops.genext.tiled_lse_backward(row[:3], col, i, t, s, b, row, col)


def test_backward_ops_check_like_the_fakes():
    # the C++ backwards check the per-row tensors as the fake kernels do
    a, b, s, bias = _cpu_args()
    row = torch.randn(4)
    with pytest.raises(ValueError, match="grad_row must have shape"):
        torch.ops.genext.tiled_lse_backward(row[:3], None, a, b, s, bias, row, None)
    with pytest.raises(ValueError, match="given together"):
        torch.ops.genext.tiled_lse_backward(row, row, a, b, s, bias, row, None)
    with pytest.raises(ValueError, match="grad must have one element"):
        torch.ops.genext.tiled_softplus_sum_backward(row, a, b, s, bias)
    _, w, sums = torch.ops.genext.softplus_sum_with_weights(a, b, s, bias, True)
    with pytest.raises(ValueError, match="grad must have one element"):
        torch.ops.genext.softplus_sum_with_weights_backward(row, w, sums, a, b, s, bias)
    with pytest.raises(ValueError, match="weights must be"):
        torch.ops.genext.softplus_sum_with_weights_backward(s, w[:3], sums, a, b, s, bias)
    with pytest.raises(ValueError, match="weights must be"):
        torch.ops.genext.softplus_sum_with_weights_backward(s, w.double(), sums, a, b, s, bias)
    meta = [x.to("meta") for x in (s, w[:3], sums, a, b, s, bias)]
    with pytest.raises(ValueError, match="weights must be"):  # the fake kernel checks the same
        torch.ops.genext.softplus_sum_with_weights_backward(*meta)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_double_backward_raises(loss, keep, monkeypatch):
    """A graph of the gradients (create_graph=True) is refused, not built wrong: the backward ops
    have no derivatives of their own."""
    from genext.ops import contrastive

    if not keep:
        monkeypatch.setattr(contrastive, "SIGLIP_SAVED_WEIGHTS_MAX", 0)
    i, t, s, b = _leaves(9, 9, 8, "cpu")
    out = (clip_loss if loss == "clip" else siglip_loss)(i, t, s, b)
    with pytest.raises(NotImplementedError, match="gradients of gradients"):
        torch.autograd.grad(out, (i, t, s, b), create_graph=True)
    # without create_graph the same call works
    assert all(g is not None for g in torch.autograd.grad(out, (i, t, s, b)))


def test_compile_siglip_gradients():
    """Compiled with gradients, siglip_loss takes the forward that keeps its weights: the loss and
    the gradients are eager's."""
    f = torch.compile(siglip_loss, fullgraph=True)
    i, t, s, b = _leaves(12, 12, 8, "cpu")
    got = f(i, t, s, b)
    want = siglip_loss(i, t, s, b)
    assert torch.allclose(got, want, atol=1e-6)
    for x, y in zip(
        torch.autograd.grad(got, (i, t, s, b)), torch.autograd.grad(want, (i, t, s, b))
    ):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_compile_dynamic_shapes():
    f = torch.compile(
        lambda i, t, s, b: clip_loss(i, t, s, b) + siglip_loss(i, t, s, b),
        fullgraph=True,
        dynamic=True,
    )
    for n in (5, 9):
        i, t, s, b = torch.randn(n, 8), torch.randn(n, 8), torch.tensor(2.0), torch.tensor(-1.0)
        want = clip_loss(i, t, s, b) + siglip_loss(i, t, s, b)
        assert torch.allclose(f(i, t, s, b), want, atol=1e-6)


def test_errors_name_the_public_function(device):
    i = torch.randn(4, 8, device=device)
    s = torch.tensor(1.0, device=device)
    for loss in (clip_loss, siglip_loss):
        name = loss.__name__
        with pytest.raises(ValueError, match=f"{name}: .*one D"):
            loss(i, torch.randn(4, 9, device=device), s, 0.0)
        with pytest.raises(TypeError, match=f"{name}: features must be float16"):
            loss(i.long(), i.long(), s, 0.0)
        with pytest.raises(TypeError, match=f"{name}: the two feature tensors"):
            loss(i, i.double(), s, 0.0)
        with pytest.raises(ValueError, match=f"{name}: logit_scale must be a scalar"):
            loss(i, i, torch.ones(2, device=device), 0.0)
        with pytest.raises(TypeError, match=f"{name}: logit_bias must be a float tensor"):
            loss(i, i, s, torch.tensor(1, device=device))
        with pytest.raises(ValueError, match=f"{name}: no text features"):
            loss(i, i[:0], s, 0.0)


def test_python_scale_keeps_float64():
    i, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    s = 1 / 0.07  # not a float32 number
    s64 = torch.tensor(s, dtype=torch.float64)
    assert clip_loss(i, t, s).item() == clip_loss(i, t, s64).item()
    assert siglip_loss(i, t, s, -0.3).item() == siglip_loss(i, t, s64, -0.3).item()


# ---- non-finite values against the float64 eager losses -----------------------------------------


def _values_and_grads(loss_fn, leaves):
    out = loss_fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out, grads


def _same_nonfinite(a, b, rtol=1e-5):
    """Equal NaN pattern, equal infinities, finite parts close."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isposinf(a), torch.isposinf(b))
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    assert torch.allclose(a[fin], b[fin], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("n,negative_only", [(5, False), (1, False), (5, True)])
@pytest.mark.parametrize("bias", [float("inf"), float("-inf")])
def test_siglip_infinite_bias(n, negative_only, bias, device):
    m = n + 2 if negative_only else n
    i, t, s, _ = _leaves(n, m, 7, device)
    b = torch.tensor(bias, device=device, requires_grad=True)
    ours, g = _values_and_grads(
        lambda *x: siglip_loss(*x, negative_only=negative_only), (i, t, s, b)
    )
    ref, rg = _values_and_grads(lambda *x: _ref_siglip(*x, negative_only), (i, t, s, b))
    _same_nonfinite(ours, ref)
    for a, r in zip(g, rg):
        _same_nonfinite(a, r)


def test_siglip_infinite_feature_as_eager(device):
    # an infinite coordinate in image 0 and text 0, of one sign: L_00 = +inf (a positive pair,
    # whose term -log sigmoid(+inf) is 0) and every other score of row 0 and column 0 is finite
    # or -inf (negatives, whose terms are 0 too). The eager loss is finite; subtracting L_00 from
    # a sum that holds softplus(L_00) = inf would give inf - inf = NaN.
    i, t, s, b = _leaves(4, 4, 5, device)
    with torch.no_grad():
        i[0].zero_()
        i[0, 0] = float("inf")
        t[:, 0] = torch.tensor([1.0, -0.5, -0.25, -1.0])
    ours = siglip_loss(i, t, s, b)
    ref = _ref_siglip(i, t, s, b)
    assert torch.isfinite(ref)
    _same_nonfinite(ours, ref)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize(
    "place,value",
    [
        ("scale", float("inf")),
        ("scale", float("-inf")),
        ("scale", float("nan")),
        ("bias", float("nan")),
        ("image", float("nan")),
        ("text", float("nan")),
        ("bias", float("inf")),
    ],
)
def test_nonfinite_inputs_match_float64(loss, place, value, device):
    i, t, s, b = _leaves(5, 5, 7, device)
    with torch.no_grad():
        {"scale": s, "bias": b, "image": i[2:3, 1:2], "text": t[4:5, 3:4]}[place].fill_(value)
    fn = clip_loss if loss == "clip" else siglip_loss
    ref_fn = _ref_clip if loss == "clip" else _ref_siglip
    ours, g = _values_and_grads(fn, (i, t, s, b))
    ref, rg = _values_and_grads(ref_fn, (i, t, s, b))
    _same_nonfinite(ours, ref)
    for a, r in zip(g, rg):
        _same_nonfinite(a, r)


# ---- the CPU kernels (csrc/contrastive/*_cpu.cpp) against float64, the composite, threads ------
# The CPU kernels split the scores into tiles of 256 rows x 512 columns and groups of row tiles
# (contrastive_cpu.h): the sizes below cross those edges (tails in both directions, one tile,
# several groups). 16-bit features are computed on in fp32 (widened, or bfloat16 products exact
# in float on MKL's bfloat16 GEMM), so every dtype is held to the fp32 tolerance against float64
# on the same values; 16-bit gradients are rounded to their dtype.

_CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_TOL = {torch.float64: 1e-10}


def _op_inputs(n, m, d, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    b = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(12.5, dtype=acc)
    bi = torch.tensor(-3.0, dtype=acc) if bias else None
    return a, b, s, bi


def _scores64(a, b, s, bi):
    logits = s.double() * a.double() @ b.double().T
    return logits + bi.double() if bi is not None else logits


def _close(out, ref, tol):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    assert err <= tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), err


def _leaves64(a, b, s, bi):
    return [t.detach().double().requires_grad_() for t in (a, b, s)] + (
        [bi.detach().double().requires_grad_()] if bi is not None else []
    )


@pytest.mark.parametrize("dtype", _CPU_DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (63, 65), (130, 515), slow((530, 1030), 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_lse_against_float64(dtype, n, m, with_bias):
    a, b, s, bi = _op_inputs(n, m, 19, dtype, with_bias)
    tol = _TOL.get(dtype, 1e-5)
    row, col = torch.ops.genext.tiled_lse(a, b, s, bi, True)
    row_only, empty = torch.ops.genext.tiled_lse(a, b, s, bi, False)
    assert row.dtype == s.dtype and empty.shape == (0,)
    leaves = _leaves64(a, b, s, bi)
    logits = _scores64(*leaves) if with_bias else _scores64(*leaves, None)
    ref_row, ref_col = logits.logsumexp(1), logits.logsumexp(0)
    _close(row, ref_row, tol)
    _close(col, ref_col, tol)
    assert torch.equal(row, row_only)
    # gradients of sum g_r row_lse + sum g_c col_lse, with both and with the rows alone
    g = torch.Generator().manual_seed(5)
    gr, gc = torch.randn(n, generator=g), torch.randn(m, generator=g)
    gr, gc = gr.to(s.dtype), gc.to(s.dtype)
    for use_cols in (True, False):
        obj = (ref_row * gr.double()).sum() + ((ref_col * gc.double()).sum() if use_cols else 0)
        want = torch.autograd.grad(obj, leaves, retain_graph=True)
        got = torch.ops.genext.tiled_lse_backward(
            gr, gc if use_cols else None, a, b, s, bi, row, col if use_cols else None
        )
        assert got[0].dtype == dtype and got[1].dtype == dtype
        # 16-bit gradients are rounded once to their dtype
        gtol = tol if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
        for x, y in zip(got[:2], want[:2]):
            _close(x, y, gtol)
        _close(got[2], want[2], tol)
        if with_bias:
            _close(got[3], want[3], tol)
        else:
            assert got[3].shape == (0,)


def _softplus_sum64(a, b, s, bi, positives):
    """float64 leaves, the scores L, the signs z (-1 on the diagonal with positives) and the sum
    of softplus(z L), differentiable in the leaves."""
    leaves = _leaves64(a, b, s, bi)
    logits = _scores64(*leaves) if bi is not None else _scores64(*leaves, None)
    z = torch.ones_like(logits)
    if positives:
        z -= 2 * torch.eye(*logits.shape, dtype=z.dtype)
    return leaves, logits, z, F.softplus(z * logits).sum()


@pytest.mark.parametrize("dtype", _CPU_DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (63, 65), (130, 515), slow((530, 1030), 2)])
@pytest.mark.parametrize("positives", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_softplus_against_float64(dtype, n, m, positives, with_bias):
    a, b, s, bi = _op_inputs(n, m, 19, dtype, with_bias)
    tol = _TOL.get(dtype, 1e-5)
    total = torch.ops.genext.tiled_softplus_sum(a, b, s, bi, positives)
    assert total.dtype == s.dtype
    leaves, logits, z, ref = _softplus_sum64(a, b, s, bi, positives)
    _close(total, ref, tol)
    want = torch.autograd.grad(ref * 0.75, leaves)
    grad = torch.tensor(0.75, dtype=s.dtype)
    got = torch.ops.genext.tiled_softplus_sum_backward(grad, a, b, s, bi, positives)
    gtol = tol if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    for x, y in zip(got[:2], want[:2]):
        _close(x, y, gtol)
    for x, y in zip(got[2:], want[2:]):
        _close(x, y, tol)


@pytest.mark.parametrize("dtype", _CPU_DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (63, 65), (300, 515), slow((530, 1030), 2)])
@pytest.mark.parametrize("positives", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_softplus_with_weights_against_float64(dtype, n, m, positives, with_bias):
    """The forward that keeps its weights: the sum, W = dsum/dL per score, sum W raw and sum W,
    and the gradients of its autograd rule (two products with W), against float64."""
    a, b, s, bi = _op_inputs(n, m, 19, dtype, with_bias)
    tol = _TOL.get(dtype, 1e-5)
    leaves = [x.detach().requires_grad_() for x in (a, b, s)] + (
        [bi.detach().requires_grad_()] if with_bias else []
    )
    total, weights, sums = torch.ops.genext.softplus_sum_with_weights(
        *leaves[:3], leaves[3] if with_bias else None, positives
    )
    acc = s.dtype
    assert total.dtype == weights.dtype == sums.dtype == acc and weights.shape == (n, m)
    assert not weights.requires_grad and not sums.requires_grad
    leaves64, logits, z, ref = _softplus_sum64(a, b, s, bi, positives)
    _close(total, ref, tol)
    w64 = z * torch.sigmoid(z * logits)
    _close(weights, w64, tol)
    raw = a.double() @ b.double().T
    _close(sums, torch.stack([(w64 * raw).sum(), w64.sum()]), tol)
    got = torch.autograd.grad(total * 0.75, leaves)
    want = torch.autograd.grad(ref * 0.75, leaves64)
    gtol = tol if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    for x, y, leaf in zip(got, want, leaves):
        assert x.dtype == leaf.dtype and x.shape == leaf.shape
        _close(x, y, gtol if x.dim() else tol)


def test_siglip_keeps_weights_only_for_cpu_gradients_of_small_blocks(monkeypatch):
    from genext.ops import contrastive

    i, t, s, b = _leaves(40, 40, 16, "cpu")
    assert contrastive._keeps_weights(i, t, s, b)
    assert not contrastive._keeps_weights(i.detach(), t.detach(), s.detach(), b.detach())
    with torch.no_grad():
        assert not contrastive._keeps_weights(i, t, s, b)
    kept = siglip_loss(i, t, s, b)
    g_kept = torch.autograd.grad(kept, (i, t, s, b))
    monkeypatch.setattr(contrastive, "SIGLIP_SAVED_WEIGHTS_MAX", 40 * 40 - 1)
    assert not contrastive._keeps_weights(i, t, s, b)
    tiled = siglip_loss(i, t, s, b)
    g_tiled = torch.autograd.grad(tiled, (i, t, s, b))
    _close(kept, tiled, 1e-6)
    for x, y in zip(g_kept, g_tiled):
        _close(x, y, 1e-5)


def _composite(op, *args):
    """The composite (ATen) kernel of a genext op, bypassing the CPU kernel."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return getattr(torch.ops.genext, op).default.redispatch(keys, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_the_composite(dtype):
    a, b, s, bi = _op_inputs(130, 515, 24, dtype)
    row, col = torch.ops.genext.tiled_lse(a, b, s, bi, True)
    crow, ccol = _composite("tiled_lse", a, b, s, bi, True)
    _close(row, crow, 1e-5)
    _close(col, ccol, 1e-5)
    gr, gc = torch.randn(130), torch.randn(515)
    for x, y in zip(
        torch.ops.genext.tiled_lse_backward(gr, gc, a, b, s, bi, row, col),
        _composite("tiled_lse_backward", gr, gc, a, b, s, bi, row, col),
    ):
        _close(x, y, 1e-5 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps)
    for positives in (False, True):
        _close(
            torch.ops.genext.tiled_softplus_sum(a, b, s, bi, positives),
            _composite("tiled_softplus_sum", a, b, s, bi, positives),
            1e-5,
        )
        grad = torch.tensor(1.5)
        for x, y in zip(
            torch.ops.genext.tiled_softplus_sum_backward(grad, a, b, s, bi, positives),
            _composite("tiled_softplus_sum_backward", grad, a, b, s, bi, positives),
        ):
            _close(x, y, 1e-5 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps)


def _all_outputs(a, b, s, bi):
    row, col = torch.ops.genext.tiled_lse(a, b, s, bi, True)
    gr, gc = torch.ones_like(row) / row.numel(), torch.ones_like(col) / col.numel()
    return (
        row,
        col,
        *torch.ops.genext.tiled_lse_backward(gr, gc, a, b, s, bi, row, col),
        torch.ops.genext.tiled_softplus_sum(a, b, s, bi, True),
        *torch.ops.genext.tiled_softplus_sum_backward(s, a, b, s, bi, True),
        *torch.ops.genext.softplus_sum_with_weights(a, b, s, bi, True),
    )


def test_cpu_results_do_not_depend_on_the_thread_count():
    # large enough for a team of two (about 1 ms of work per op), several row-tile groups
    a, b, s, bi = _op_inputs(700, 600, 64, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        n0 = _C._cpu_team_launches()
        two = _all_outputs(a, b, s, bi)
        assert _C._cpu_team_launches() > n0, "no thread team at this size"
        torch.set_num_threads(1)
        n0 = _C._cpu_team_launches()
        one = _all_outputs(a, b, s, bi)
        assert _C._cpu_team_launches() == n0, "one thread launched a team"
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_cpu_small_inputs_run_on_the_calling_thread():
    a, b, s, bi = _op_inputs(20, 20, 8, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _all_outputs(a, b, s, bi)
        n0 = _C._cpu_team_launches()
        _all_outputs(a, b, s, bi)
        assert _C._cpu_team_launches() == n0
    finally:
        torch.set_num_threads(before)


def test_cpu_scores_minus_inf_for_whole_tiles_leave_finite_log_sum_exps():
    # the first 512 texts score -inf against every image (a whole column tile, and for the texts
    # as rows a whole row group): the log-sum-exps over the rest stay finite, as in float64
    g = torch.Generator().manual_seed(0)
    n, m, d = 4, 600, 8
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    a[:, 0] = a[:, 0].abs() + 0.1
    b = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    b[:512, 0] = -float("inf")
    scale = torch.tensor(10.0)
    ref = torch.logsumexp(scale.double() * a.double() @ b.double().T, 1)
    rows, _ = torch.ops.genext.tiled_lse(a, b, scale, None, False)
    _, cols = torch.ops.genext.tiled_lse(b, a, scale, None, True)
    for got in (rows, cols):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), ref, rtol=1e-5)


# ---- bfloat16 features on MKL's bfloat16 products (CPUs with AMX-BF16) and widened -------------


@pytest.fixture(params=["bf16-products", "widened"])
def bf16_products(request):
    """Runs a test with each path of bfloat16 features: MKL's bfloat16 products (only where the
    CPU has AMX-BF16) and sgemm on the widened features (every CPU)."""
    supported, before = _C._cpu_contrastive_bf16_gemm()
    on = request.param == "bf16-products"
    if on and not supported:
        pytest.skip("no AMX-BF16 (or no MKL bfloat16 GEMM in this torch)")
    _C._cpu_set_contrastive_bf16_gemm(on)
    try:
        assert _C._cpu_contrastive_bf16_gemm()[1] == on
        yield request.param
    finally:
        _C._cpu_set_contrastive_bf16_gemm(before)


def test_cpu_bf16_products_only_where_the_cpu_has_amx_bf16():
    # on by default where supported; never without AMX-BF16 (the OS may also refuse the tiles, or
    # torch lack MKL's entry point: then it is off too)
    supported, enabled = _C._cpu_contrastive_bf16_gemm()
    with open("/proc/cpuinfo") as f:
        amx = "amx_bf16" in f.read().split()
    assert enabled == supported
    assert amx or not supported
    if not supported:
        with pytest.raises(ValueError, match="AMX-BF16"):
            _C._cpu_set_contrastive_bf16_gemm(True)


def _close_to_largest(out, ref, tol):
    """out within tol times the largest |ref| of ref (gradients far below 1 in size)."""
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * ref.abs().max().item(), (err, ref.abs().max().item())


def test_cpu_bf16_products_change_the_backward_bits():
    # the two paths are not the same code: the products' weights are rounded to bfloat16 on one
    supported, before = _C._cpu_contrastive_bf16_gemm()
    if not supported:
        pytest.skip("no AMX-BF16 (or no MKL bfloat16 GEMM in this torch)")
    a, b, s, bi = _op_inputs(300, 520, 64, torch.bfloat16)
    row, col = torch.ops.genext.tiled_lse(a, b, s, bi, True)
    gr, gc = torch.ones_like(row), torch.ones_like(col)
    outs = []
    try:
        for on in (True, False):
            _C._cpu_set_contrastive_bf16_gemm(on)
            outs.append(torch.ops.genext.tiled_lse_backward(gr, gc, a, b, s, bi, row, col)[0])
    finally:
        _C._cpu_set_contrastive_bf16_gemm(before)
    assert not torch.equal(outs[0], outs[1])
    _close_to_largest(outs[0], outs[1], 2 * torch.finfo(torch.bfloat16).eps)


def test_cpu_bf16_results_do_not_depend_on_the_thread_count(bf16_products):
    a, b, s, bi = _op_inputs(700, 600, 64, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _all_outputs(a, b, s, bi)
        torch.set_num_threads(1)
        one = _all_outputs(a, b, s, bi)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@pytest.mark.parametrize("n,m,d", [(1, 1, 19), (63, 65, 19), (130, 515, 24), (300, 520, 64)])
def test_cpu_bf16_paths_against_float64(bf16_products, n, m, d):
    # row tiles of 256 and column tiles of 512 crossed at (300, 520); head dims off any vector
    for with_bias in (False, True):
        a, b, s, bi = _op_inputs(n, m, d, torch.bfloat16, with_bias)
        leaves = _leaves64(a, b, s, bi)
        logits = _scores64(*leaves) if with_bias else _scores64(*leaves, None)
        row, col = torch.ops.genext.tiled_lse(a, b, s, bi, True)
        # the products of bfloat16 values are exact in float: float32's tolerance
        _close(row, logits.logsumexp(1), 1e-5)
        _close(col, logits.logsumexp(0), 1e-5)
        gr, gc = torch.randn(n).div(n), torch.randn(m).div(m)
        obj = (logits.logsumexp(1) * gr.double()).sum() + (logits.logsumexp(0) * gc.double()).sum()
        want = torch.autograd.grad(obj, leaves)
        got = torch.ops.genext.tiled_lse_backward(gr, gc, a, b, s, bi, row, col)
        # the feature gradients are rounded once to bfloat16 (the products' weights too, on the
        # bfloat16 products), against their own size; the scalar gradients are float sums
        for x, y in zip(got[:2], want[:2]):
            _close_to_largest(x, y, torch.finfo(torch.bfloat16).eps)
        for x, y in zip(got[2:], want[2:]):
            _close(x, y, 1e-5)
        for positives in (False, True):
            sp_leaves, sp_logits, z, total = _softplus_sum64(a, b, s, bi, positives)
            want = torch.autograd.grad(total, sp_leaves)
            _close(torch.ops.genext.tiled_softplus_sum(a, b, s, bi, positives), total, 1e-5)
            for op in ("tiled", "kept"):
                if op == "tiled":
                    got = torch.ops.genext.tiled_softplus_sum_backward(
                        torch.tensor(1.0), a, b, s, bi, positives
                    )
                else:
                    kept_total, w, sums = torch.ops.genext.softplus_sum_with_weights(
                        a, b, s, bi, positives
                    )
                    _close(kept_total, total, 1e-5)
                    got = torch.ops.genext.softplus_sum_with_weights_backward(
                        torch.tensor(1.0), w, sums, a, b, s, bi
                    )
                for x, y in zip(got[:2], want[:2]):
                    _close_to_largest(x, y, torch.finfo(torch.bfloat16).eps)
                for x, y in zip(got[2:], want[2:] if with_bias else want[2:3]):
                    _close(x, y, 1e-5)
