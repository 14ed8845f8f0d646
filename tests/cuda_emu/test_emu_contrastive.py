"""The fused row log-sum-exp of the contrastive losses (csrc/contrastive/lse_rows.cu: mma.sync
score tiles over a cp.async ring of feature chunks, reduced in registers) under the CPU emulation
(tests/cuda_emu/README.md): against the float64 log-sum-exp of the same 16-bit features, around
its 64-row blocks, 64-column tiles and 64-feature chunks, with and without a bias, a large scale,
columns as rows (the column log-sum-exps); guarded inputs and output. An emulation, not a GPU
run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
from guard import guarded  # noqa: E402

# a build of about 20 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("contrastive")


def _lse(emu, x, y, scale, bias=None):
    s = guarded(torch.tensor(scale, dtype=torch.float32))
    b = None if bias is None else guarded(torch.tensor(bias, dtype=torch.float32))
    return emu.lse_rows(guarded(x), guarded(y), s, b)


def _ref(x, y, scale, bias=None):
    """max + log sum exp(L - max) in float64, as genext's composite tiled_lse computes it (a row
    whose maximum is +inf gives NaN, where torch.logsumexp gives inf)."""
    logits = scale * (x.double() @ y.double().T) + (0.0 if bias is None else bias)
    mx = logits.max(1, keepdim=True).values
    return (mx + (logits - mx).exp().sum(1, keepdim=True).log()).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,m,d",
    [(100, 150, 64), (64, 64, 128), (1, 1, 8), (130, 65, 136), (17, 200, 40), (70, 129, 512)],
)
def test_matches_float64(emu, dtype, n, m, d):
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(m, d), dim=1).to(dtype)
    got = _lse(emu, x, y, 14.3)
    ref = _ref(x, y, 14.3)
    # products of 16-bit values are exact; fp32 sums over d and over the columns
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    cols = _lse(emu, y, x, 14.3)  # column log-sum-exps: the same call, features swapped
    torch.testing.assert_close(cols.double(), _ref(y, x, 14.3), rtol=1e-5, atol=1e-5)


def test_bias_and_a_large_scale(emu):
    x = torch.randn(90, 72).to(torch.bfloat16)
    y = torch.randn(110, 72).to(torch.bfloat16)
    got = _lse(emu, x, y, 100.0, -10.0)  # scores in the thousands: the running maximum matters
    torch.testing.assert_close(got.double(), _ref(x, y, 100.0, -10.0), rtol=1e-5, atol=1e-3)


def test_infinite_scores_give_what_the_reference_gives(emu):
    x = torch.randn(70, 16).to(torch.float16)
    y = torch.randn(80, 16).to(torch.float16)
    x[5, 0] = float("inf")  # row 5's scores: +inf or -inf (or NaN where the product is 0 * inf)
    got = _lse(emu, x, y, 1.0)
    ref = _ref(x, y, 1.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_nan_gives_nan(emu):
    # a NaN feature makes its row's scores NaN (the running maximum would skip them); a NaN
    # scale makes every score NaN: the composite's log-sum-exp is NaN there, and so is this one
    x = torch.randn(130, 72).to(torch.bfloat16)
    y = torch.randn(70, 72).to(torch.bfloat16)
    x[[3, 100], [5, 70]] = float("nan")
    got = _lse(emu, x, y, 2.0)
    torch.testing.assert_close(got.double(), _ref(x, y, 2.0), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got.isnan().tolist() == [i in (3, 100) for i in range(130)]
    assert _lse(emu, x[:5], y, float("nan")).isnan().all()
