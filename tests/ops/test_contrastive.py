"""genext.ops.clip_loss / siglip_loss and their tiled primitives against float64 eager losses:
values and gradients, N across tile edges, N = 1, odd D, rectangular blocks, extreme logit
scales in 16-bit, gradcheck, opcheck, compile, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext import reference
from genext.ops import clip_loss, siglip_loss


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
