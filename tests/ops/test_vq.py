"""genext.ops.vq_nearest and vq_ema_update against float64 references: random data, near ties
(duplicated codebook rows: the smallest index wins), odd sizes, K = 1, empty N, cosine, 16-bit
inputs, bad inputs, opcheck, compile; CUDA runs the same through the device fixture."""

from __future__ import annotations

import pytest
import torch

from genext import reference
from genext.ops import vq_ema_update, vq_nearest


def _ref(z: torch.Tensor, cb: torch.Tensor, metric: str):
    """float64 (indices, distances, scores): scores are squared distances (l2) or negated cosine
    similarities, smaller is nearer."""
    zd, cd = z.double(), cb.double()
    idx, dist = reference.vq_nearest(zd, cd, metric)
    return idx, dist, reference.vq_scores(zd, cd, metric)


def _check(idx, dist, z, cb, metric, tol):
    """idx must be the float64 argmin except where the two best float64 distances are within
    `tol` of each other; then it must be one of them."""
    ri, rd, score = _ref(z, cb, metric)
    assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1]
    chosen = score.gather(-1, idx.cpu().view(-1, 1).to(score.device)).squeeze(-1)
    best = score.min(-1).values
    assert (chosen <= best + tol).all(), "picked a code that is not (near-)nearest"
    ok = (idx.cpu() == ri.cpu()) | ((chosen - best).cpu() <= tol)
    assert ok.all()
    assert torch.allclose(dist.double().cpu(), rd.cpu(), atol=10 * tol, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d", [(1000, 300, 72), (33, 65, 13), (7, 1, 5), (257, 129, 64), (64, 1024, 256)]
)
def test_matches_float64(metric, n, k, d, device):
    z = torch.randn(n, d, device=device)
    cb = torch.randn(k, d, device=device)
    idx, dist = vq_nearest(z, cb, metric)
    _check(idx, dist, z, cb, metric, tol=1e-4)


def test_exact_fp32_argmin_and_ties(device):
    cb = torch.randn(50, 24, device=device)
    cb = torch.cat([cb, cb[10:20]])  # rows 50..59 duplicate rows 10..19
    z = cb[torch.tensor([12, 55, 3, 19], device=device)] + 1e-3 * torch.randn(4, 24, device=device)
    idx, _ = vq_nearest(z, cb)
    assert idx.tolist()[0] == 12 and idx.tolist()[1] == 15 and idx.tolist()[3] == 19
    # exact fp32: the result equals the float64 argmin for random data (no near ties here)
    z = torch.randn(500, 24, device=device)
    idx, _ = vq_nearest(z, cb)
    assert torch.equal(idx.cpu(), _ref(z, cb, "l2")[0].cpu())


def test_leading_dims_and_empty(device):
    z = torch.randn(2, 5, 7, 16, device=device)
    cb = torch.randn(9, 16, device=device)
    idx, dist = vq_nearest(z, cb)
    assert idx.shape == (2, 5, 7) and dist.shape == (2, 5, 7)
    assert torch.equal(idx.reshape(-1), vq_nearest(z.reshape(-1, 16), cb)[0])
    e_idx, e_dist = vq_nearest(torch.empty(0, 16, device=device), cb)
    assert e_idx.shape == (0,) and e_dist.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype, device):
    z = torch.randn(300, 64, device=device).to(dtype)
    cb = torch.randn(100, 64, device=device).to(dtype)
    idx, dist = vq_nearest(z, cb)
    assert dist.dtype == torch.float32
    _check(idx, dist, z, cb, "l2", tol=1e-3)  # the rounded inputs, accumulated in fp32


def test_zero_vectors_cosine(device):
    z = torch.zeros(3, 8, device=device)
    cb = torch.randn(5, 8, device=device)
    idx, dist = vq_nearest(z, cb, "cosine")
    assert idx.tolist() == [0, 0, 0] and torch.allclose(dist.cpu(), torch.ones(3))


@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update(deterministic, device):
    z = torch.randn(1000, 33, device=device)
    idx = torch.randint(0, 50, (1000,), device=device)
    counts, sums = vq_ema_update(idx, z, 50, deterministic=deterministic)
    rc, rs = reference.vq_ema_update(idx.cpu(), z.double().cpu(), 50)
    assert torch.equal(counts.double().cpu(), rc)
    assert torch.allclose(sums.double().cpu(), rs, atol=1e-4)
    if deterministic:
        again = vq_ema_update(idx, z, 50, deterministic=True)
        assert torch.equal(again[0], counts) and torch.equal(again[1], sums)


def test_bad_inputs(device):
    z = torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="share D"):
        vq_nearest(z, torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match="z must be"):
        vq_nearest(z.long(), torch.randn(4, 8, device=device).long())
    with pytest.raises(ValueError, match="K = 0"):
        vq_nearest(z, torch.randn(0, 8, device=device))
    with pytest.raises(TypeError, match="codebook must have z's dtype"):
        vq_nearest(z, torch.randn(4, 8, device=device).double())
    with pytest.raises(ValueError, match="metric must be"):
        vq_nearest(z, torch.randn(4, 8, device=device), "l1")
    with pytest.raises(ValueError, match="num_codes must be positive"):
        vq_ema_update(torch.zeros(10, dtype=torch.long, device=device), z, 0)
    if device == "cpu":
        with pytest.raises(ValueError, match="outside"):
            vq_ema_update(torch.full((10,), 7, device=device), z, 5)


def test_opcheck_and_compile():
    z = torch.randn(40, 12)
    cb = torch.randn(9, 12)
    torch.library.opcheck(torch.ops.genext.vq_nearest, (z, cb, False))
    torch.library.opcheck(torch.ops.genext.vq_nearest, (z, cb, True))
    idx = torch.randint(0, 9, (40,))
    torch.library.opcheck(torch.ops.genext.vq_ema_update, (idx, z, 9, True))
    f = torch.compile(lambda a, b: vq_nearest(a, b)[0], fullgraph=True)
    assert torch.equal(f(z, cb), vq_nearest(z, cb)[0])


def test_float64_cpu():
    z = torch.randn(100, 10, dtype=torch.float64)
    cb = torch.randn(20, 10, dtype=torch.float64)
    idx, dist = vq_nearest(z, cb)
    assert dist.dtype == torch.float64
    ri, rd, _ = _ref(z, cb, "l2")
    assert torch.equal(idx, ri) and torch.allclose(dist, rd, atol=1e-12)
