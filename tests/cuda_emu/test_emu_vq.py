"""The VQ CUDA kernels (csrc/vq/vq.cu) under the CPU emulation (tests/cuda_emu/README.md): the
nearest-code kernel against the float64 reference (odd sizes around its 128-row blocks and
32-code, 32-dim tiles, K = 1, near ties, cosine, 16-bit inputs, NaN and inf rows) and both EMA
kernels (atomics and the deterministic sorted sums); every input and output the kernels touch ends
at a guard page (guard.py). An emulation, not a GPU run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
from guard import guarded  # noqa: E402

from genext import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_vq import _check, _ref  # noqa: E402

# a build of about 40 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("vq")


def _nearest(emu, z, cb, metric="l2"):
    n = z.shape[0]
    idx = guarded(torch.full((n,), -7, dtype=torch.long))
    dist = guarded(torch.full((n,), -7.0))
    out = emu.vq_nearest(guarded(z), guarded(cb), metric == "cosine", idx, dist)
    assert out[0].data_ptr() == idx.data_ptr() and out[1].data_ptr() == dist.data_ptr()
    return idx, dist


def test_the_bindings_own_outputs(emu):
    z, cb = torch.randn(40, 12), torch.randn(9, 12)
    idx, dist = emu.vq_nearest(guarded(z), guarded(cb), False)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == (40,)
    _check(idx, dist, z, cb, "l2", tol=1e-4)
    counts, sums = emu.vq_ema_update(guarded(torch.randint(0, 9, (40,))), guarded(z), 9, True)
    assert counts.shape == (9,) and sums.shape == (9, 12) and counts.sum() == 40


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d", [(300, 100, 72), (33, 65, 13), (7, 1, 5), (257, 129, 64), (128, 32, 32), (129, 33, 33)]
)
def test_matches_float64(emu, metric, n, k, d):
    z, cb = torch.randn(n, d), torch.randn(k, d)
    idx, dist = _nearest(emu, z, cb, metric)
    _check(idx, dist, z, cb, metric, tol=1e-4)


def test_ties_take_the_smallest_index(emu):
    cb = torch.randn(50, 24)
    cb = torch.cat([cb, cb[10:20]])  # rows 50..59 duplicate rows 10..19
    z = cb[torch.tensor([12, 55, 3, 19])] + 1e-3 * torch.randn(4, 24)
    idx, _ = _nearest(emu, z, cb)
    assert idx.tolist()[0] == 12 and idx.tolist()[1] == 15 and idx.tolist()[3] == 19
    z = torch.randn(300, 24)
    idx, _ = _nearest(emu, z, cb)
    assert torch.equal(idx, _ref(z, cb, "l2")[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(emu, dtype):
    z, cb = torch.randn(200, 40).to(dtype), torch.randn(70, 40).to(dtype)
    idx, dist = _nearest(emu, z, cb)
    assert dist.dtype == torch.float32
    _check(idx, dist, z, cb, "l2", tol=1e-3)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_rows(emu, metric):
    z, cb = torch.randn(70, 9), torch.randn(40, 9)
    z[[3, 41, 69], [0, 8, 4]] = float("nan")
    cb[[0, 5, 39], 2] = float("nan")
    idx, dist = _nearest(emu, z, cb, metric)
    keep = torch.tensor([k for k in range(40) if k not in (0, 5, 39)])
    bad = torch.zeros(70, dtype=torch.bool)
    bad[[3, 41, 69]] = True
    assert idx[bad].tolist() == [0, 0, 0] and torch.isnan(dist[bad]).all()
    ri, rd, _ = _ref(z[~bad], cb[keep], metric)
    assert torch.equal(idx[~bad], keep[ri])
    assert torch.allclose(dist[~bad].double(), rd, atol=1e-4)
    idx, dist = _nearest(emu, z[:3], torch.full((4, 9), float("nan")), metric)
    assert idx.tolist() == [0, 0, 0] and torch.isnan(dist).all()


def test_inf_rows_l2(emu):
    z, cb = torch.randn(4, 5), torch.randn(6, 5)
    z[1, 3] = float("inf")
    cb[0, 0] = float("-inf")
    idx, dist = _nearest(emu, z, cb)
    ri, _, _ = _ref(z, cb, "l2")
    assert torch.equal(idx, ri) and dist[1].item() == float("inf")


def test_zero_vectors_cosine(emu):
    idx, dist = _nearest(emu, torch.zeros(3, 8), torch.randn(5, 8), "cosine")
    assert idx.tolist() == [0, 0, 0] and torch.allclose(dist, torch.ones(3))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n,k,d", [(1000, 50, 33), (5, 7, 1), (300, 1, 130)])
def test_ema_update(emu, deterministic, n, k, d):
    z = torch.randn(n, d)
    idx = torch.randint(0, k, (n,))
    idx[::7] = -1  # outside [0, K): skipped
    if n > 3:
        idx[3] = k
    counts, sums = guarded(torch.zeros(k)), guarded(torch.zeros(k, d))
    emu.vq_ema_update(guarded(idx), guarded(z), k, deterministic, counts, sums)
    keep = (idx >= 0) & (idx < k)
    rc, rs = reference.vq_ema_update(idx[keep], z[keep].double(), k)
    assert torch.equal(counts.double(), rc)
    assert torch.allclose(sums.double(), rs, atol=1e-4)
    if deterministic:  # rows summed in sorted order: bit for bit the same each time
        again = emu.vq_ema_update(idx, z, k, True)
        assert torch.equal(again[0], counts) and torch.equal(again[1], sums)


# ---- the tensor-core path (csrc/vq/vq_tc.cu): the exact kernel's indices and distances ---------


def _both(emu, z, cb, metric="l2"):
    """(indices, distances) of the exact kernel and of the tensor-core path, on guarded copies."""
    exact = _nearest(emu, z, cb, metric)
    n = z.shape[0]
    idx = guarded(torch.full((n,), -7, dtype=torch.long))
    dist = guarded(torch.full((n,), -7.0))
    emu.vq_nearest(guarded(z), guarded(cb), metric == "cosine", idx, dist, tensor_cores=True)
    return exact, (idx, dist)


def _same(exact, tc):
    assert torch.equal(tc[0], exact[0]), (tc[0] != exact[0]).nonzero().flatten().tolist()
    torch.testing.assert_close(tc[1], exact[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d",
    [(300, 100, 72), (33, 65, 13), (7, 1, 5), (130, 200, 256), (65, 129, 32), (64, 64, 64)],
)
def test_tensor_cores_give_the_exact_kernels_result(emu, dtype, metric, n, k, d):
    # row and code counts around the 64-row blocks and 64-code tiles; D on each tile (32, 64,
    # 128, 256) and between
    z, cb = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    _same(*_both(emu, z, cb, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_tensor_cores_on_clustered_codes(emu, metric):
    # 16 clusters of 24 codes each, near-identical in bf16 (many exact duplicates): more close
    # codes per row than the candidates one lane keeps, and ties that must go to the smallest index
    centres = torch.randn(16, 48)
    cb = (centres.repeat_interleave(24, 0) + 3e-3 * torch.randn(384, 48)).to(torch.bfloat16)
    z = (centres[torch.randint(0, 16, (200,))] + 0.05 * torch.randn(200, 48)).to(torch.bfloat16)
    _same(*_both(emu, z, cb, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_tensor_cores_on_nan_and_inf(emu, metric):
    # rows whose re-checked best is not finite are scanned exactly over every code
    z, cb = torch.randn(70, 24), torch.randn(90, 24)
    z[[3, 41, 69], [0, 8, 4]] = float("nan")
    z[[5, 6], [1, 2]] = float("inf")
    cb[[0, 5, 89], 2] = float("nan")
    cb[7, 3] = float("-inf")
    z, cb = z.to(torch.float16), cb.to(torch.float16)
    _same(*_both(emu, z, cb, metric))
    _same(*_both(emu, z[:3], torch.full((4, 24), float("nan"), dtype=torch.float16), metric))


def test_tensor_cores_leave_float32_to_the_exact_kernel(emu):
    z, cb = torch.randn(40, 16), torch.randn(30, 16)
    _same(*_both(emu, z, cb))


def test_tensor_cores_scan_rows_whose_ranking_overflows(emu):
    # bfloat16 codes near 1.5e19: ||e||^2 overflows fp32, so code 0's ranking score is NaN while
    # code 1's re-checks finite; code 0 (distance 0) must still win
    big = 1.5e19
    cb = torch.tensor([[big, big], [big, 0.0], [0.0, 1.0]]).to(torch.bfloat16)
    z = torch.tensor([[big, big], [0.0, 1.0]]).to(torch.bfloat16)
    exact, tc = _both(emu, z, cb)
    assert exact[0].tolist() == [0, 2]
    _same(exact, tc)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_tensor_cores_where_rounding_decides(emu, metric):
    # tiny codes against rows of norm 4: the squared distances differ by less than the exact
    # kernel's own fp32 rounding, so rounding decides its pick (without the rounding-bound scan,
    # one row's ranking dropped the code the exact kernel picks, in L2)
    torch.manual_seed(1)
    z = (4.0 * torch.nn.functional.normalize(torch.randn(256, 32), dim=1)).to(torch.bfloat16)
    cb = (1e-6 * torch.randn(2048, 32)).to(torch.bfloat16)
    _same(*_both(emu, z, cb, metric))
