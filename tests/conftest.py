"""Shared test set-up: seeds, the device fixture, the cuda and slow markers, the test profile,
and helpers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import genext  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and genext.build_info()["cuda"]

# The test profile. "quick" (the default) runs every test file but skips the tests marked `slow`:
# long cases whose code the quick ones also reach (bigger shapes, more parameter combinations,
# subprocess and multi-process runs, more fuzz examples). "full" runs everything; CI and the GPU
# queue run it. `pytest -m slow` selects the slow tests and runs them.
PROFILE = os.environ.get("GENEXT_TESTS", "quick")
if PROFILE not in ("quick", "full"):
    raise pytest.UsageError(f"GENEXT_TESTS must be 'quick' or 'full', got {PROFILE!r}")


def full_profile(config: pytest.Config | None = None) -> bool:
    """Whether this run includes the slow tests."""
    return PROFILE == "full" or (config is not None and "slow" in (config.option.markexpr or ""))


def pytest_report_header(config):
    if full_profile(config):
        return "genext tests: full profile"
    return "genext tests: quick profile (tests marked slow skipped; GENEXT_TESTS=full runs them)"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a genext build with CUDA kernels")
    skip_slow = pytest.mark.skip(reason="slow: the full profile runs it (GENEXT_TESTS=full)")
    full = full_profile(config)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
        elif "slow" in item.keywords and not full:
            item.add_marker(skip_slow)


def slow(case: Any, argcount: int = 1) -> Any:
    """A parametrize case (a value, a tuple of `argcount` values, or a pytest.param) marked slow."""
    if type(case) is type(pytest.param(None)):  # already a pytest.param
        return pytest.param(*case.values, marks=(*case.marks, pytest.mark.slow), id=case.id)
    values = tuple(case) if argcount > 1 else (case,)
    return pytest.param(*values, marks=pytest.mark.slow)


def thin(cases: Sequence[Any], keep_every: int, argcount: int = 1) -> list[Any]:
    """`cases` with all but every `keep_every`-th marked slow: the quick profile runs a sample
    spread over a parameter grid (a stride coprime with the grid's inner sizes varies every
    axis), the full profile the whole grid."""
    return [c if i % keep_every == 0 else slow(c, argcount) for i, c in enumerate(cases)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_attention_routing(monkeypatch, avx512: bool, amx: bool) -> None:
    """Makes the CPU attention routing rule (genext.ops.flash_attention.CPU_ROUTING) that of
    another machine for one test: which calls go to PyTorch's SDPA depends on the machine."""
    import sys

    from genext.ops.flash_attention import CpuRouting

    module = sys.modules["genext.ops.flash_attention"]  # the package attribute is the function
    monkeypatch.setattr(module, "CPU_ROUTING", CpuRouting(avx512=avx512, amx=amx))


@pytest.fixture
def avx2_routing(monkeypatch):
    """The attention routing rule of a machine where genext runs its AVX2 kernels and has no
    AMX, whatever machine the tests run on: for tests that need genext's kernel at shapes an
    AVX-512 machine hands to PyTorch."""
    set_attention_routing(monkeypatch, avx512=False, amx=False)


@pytest.fixture(params=[3, 4], ids=["8-lane", "16-lane"])
def cpu_loop_level(request):
    """Runs a test with the CPU loops of one width, where a kernel has both (GroupNorm+SiLU, the
    decode attention's float tiles): the 8-lane ones (as compiled for this machine's level:
    GENEXT_CPU_CLONES picks by the CPU, so on an x86-64-v4 machine this is the v4 build of the
    8-lane code, not the v3 one AVX2 machines run) and the 16-lane ones of x86-64-v4 (the level
    capped to 3 selects the former)."""
    import genext._C as C

    if C._cpu_level() < request.param:
        pytest.skip(f"this CPU runs below x86-64-v{request.param}")
    C._cpu_set_level_cap(request.param)
    try:
        assert C._cpu_level() == request.param
        yield request.param
    finally:
        C._cpu_set_level_cap(4)


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
