"""Shared test set-up: seeds, the device fixture, the cuda marker, and helpers."""

from __future__ import annotations

import pytest
import torch

import genext  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and genext.build_info()["cuda"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a genext build with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Runs a test body on the CPU and, where available, on the GPU."""
    return request.param


def poison_allocator(like: torch.Tensor, count: int = 4) -> None:
    """Fill and free a few NaN blocks of `like`'s size on its device, so an op that allocates its
    output probably gets poisoned memory back (certainly on CUDA's caching allocator): an element
    the kernel forgets to write then shows up as NaN instead of a lucky zero."""
    if like.numel() == 0:
        return
    blocks = [torch.full_like(like, float("nan")) for _ in range(count)]
    del blocks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return (out - ref).abs().max().item() if out.numel() else 0.0
