"""genext.nn.GroupNormSiLU takes every rank nn.GroupNorm takes: (N, C) and more than three
spatial dims too, with the values and gradients of nn.GroupNorm followed by nn.SiLU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genext

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("shape", [(3, 8), (1, 8), (2, 8, 3, 2, 2, 3), (2, 8, 2, 1, 3, 2, 2)])
def test_matches_group_norm_at_any_rank(shape, activation, dtype):
    torch.manual_seed(0)
    ref = nn.GroupNorm(2, 8, dtype=dtype)  # 4 channels a group (a 2-value group has zero dx)
    with torch.no_grad():  # not the identity affine parameters a fresh GroupNorm has
        ref.weight.normal_()
        ref.bias.normal_()
    ours = genext.nn.GroupNormSiLU.from_group_norm(ref, activation=activation)
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
    act = nn.SiLU() if activation else nn.Identity()
    want = act(ref(x))
    got = ours(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, ref.weight, ref.bias), g)
    got_grads = torch.autograd.grad(got, (x, ours.weight, ours.bias), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def test_rank_two_runs_the_fused_op():
    m = genext.nn.GroupNormSiLU(2, 6)
    x = torch.randn(5, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(x)
    keys = {e.key for e in prof.key_averages()}
    assert "genext::group_norm_silu" in keys
    assert "aten::native_group_norm" not in keys


def test_rank_one_is_refused_as_group_norm_refuses_it():
    with pytest.raises((ValueError, RuntimeError)):
        nn.GroupNorm(2, 6)(torch.randn(6))
    with pytest.raises(ValueError, match="rank"):
        genext.nn.GroupNormSiLU(2, 6)(torch.randn(6))
