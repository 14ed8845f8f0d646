"""The CPU emulation of CUDA (tests/cuda_emu/emu/cuda_emu.h) checked on small kernels
(kernels/selftest.cu): block barriers and shared memory, cuda_utils.cuh's block reduction, the warp
shuffles (with widths) and ballot, threads that return before a barrier, atomics, dynamic shared
memory, and what it reports: a missing barrier shows in the results, a warp operation that a lane
never joins is a deadlock error, a block too large is cudaErrorInvalidConfiguration, and a write
one element past the end of a guarded tensor (guard.py) is an error of the launch; warp
operations on partial masks (disjoint and interleaved groups of lanes) meet only their own lanes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
import guard  # noqa: E402

INVALID_CONFIGURATION = 9  # cudaErrorInvalidConfiguration


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("selftest")


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_sums(emu, threads):
    x = torch.randint(-8, 8, (3 * threads,)).float()  # small integers: exact sums in any order
    out, out2 = torch.zeros(3), torch.zeros(3)
    assert emu.block_sums(x, out, out2, threads) == 0
    rows = x.view(3, threads)
    assert torch.equal(out, rows.sum(1))
    assert torch.equal(out2, (rows * rows).sum(1))


@pytest.mark.parametrize("threads", [64, 200])
def test_a_missing_barrier_shows(emu, threads):
    want = torch.tensor(
        [[1000 * b + (t + 1) % threads + 1 for t in range(threads)] for b in range(3)]
    ).int()
    out = torch.zeros(3, threads, dtype=torch.int32)
    assert emu.neighbours(out, 3, threads, True) == 0
    assert torch.equal(out, want)
    out.zero_()
    assert emu.neighbours(out, 3, threads, False) == 0
    # blocks 0 and 2 run their lowest runnable thread first: every thread but the last reads a
    # slot its neighbour writes after it; block 1 runs its highest first: only the last thread
    # (which reads slot 0) reads too early
    for b in (0, 2):
        assert (out[b, :-1] != want[b, :-1]).all()
    assert torch.equal(out[1, :-1], want[1, :-1]) and out[1, -1] != want[1, -1]


def test_shuffles(emu):
    threads = 64
    x = torch.randint(0, 1000, (threads,), dtype=torch.int32)
    out = torch.zeros(threads, 5, dtype=torch.int32)
    assert emu.shuffles(x, out) == 0
    for t in range(threads):
        lane, seg16, warp = t % 32, t - t % 16, t - t % 32
        down = t + 3 if t + 3 < seg16 + 16 else t
        up = t - 5 if t - 5 >= seg16 else t
        ballot = sum(1 << i for i in range(32) if int(x[warp + i]) & 1)
        ballot = ballot - (1 << 32) if ballot >= 1 << 31 else ballot  # as an int32
        assert out[t].tolist() == [
            int(x[down]),
            int(x[up]),
            int(x[warp + 7]),
            int(x[warp + (lane ^ 1)]),
            ballot,
        ], t


@pytest.mark.parametrize("live", [1, 33, 100, 128])
def test_returned_threads_count_as_arrived(emu, live):
    out = torch.zeros(2, dtype=torch.int32)
    assert emu.early_exit(out, 128, live) == 0
    assert out.tolist() == [live * (live - 1) // 2] * 2


def test_a_shuffle_a_lane_never_joins_is_a_deadlock(emu):
    with pytest.raises(RuntimeError, match="deadlock in block"):
        emu.lone_shuffle(torch.zeros(1, dtype=torch.int32))


def test_atomics_across_blocks(emu):
    x = torch.randint(0, 10_000, (1000,), dtype=torch.int32)
    hist = torch.zeros(7, dtype=torch.int32)
    assert emu.histogram(x, hist) == 0
    assert torch.equal(hist, torch.bincount(x % 7, minlength=7).int())


def test_dynamic_shared_memory(emu):
    x = torch.arange(3 * 96).float()
    out = torch.zeros_like(x)
    assert emu.reverse(x, out, 96) == 0
    assert torch.equal(out.view(3, 96), x.view(3, 96).flip(1))


def test_a_block_too_large_is_an_invalid_configuration(emu):
    x = torch.zeros(2048)
    assert emu.block_sums(x, torch.zeros(1), torch.zeros(1), 2048) == INVALID_CONFIGURATION


def test_rewrite_of_launches_and_dynamic_shared_memory():
    src = (
        "  if (n > 0) k<T, 4><<<dim3(a, b), 128, s, st>>>(p, f(q, r));\n"
        "  g<<<1, 32>>>();\n"
        "  extern __shared__ __align__(16) unsigned char smem_raw[];\n"
    )
    assert emu_build.rewrite(src) == (
        "  if (n > 0) ::emu::launch(dim3(a, b), 128, s, st, k<T, 4>, p, f(q, r));\n"
        "  ::emu::launch(1, 32, g);\n"
        "  unsigned char* const smem_raw = reinterpret_cast<unsigned char*>(::emu::dyn_smem());\n"
    )


@pytest.mark.parametrize("last", [99, 100])
def test_guard_pages_catch_a_write_past_the_end(emu, last):
    out = guard.guarded(torch.zeros(100))
    if last == 100:  # one element past the end
        with pytest.raises(RuntimeError, match="touched inaccessible memory"):
            emu.fill_to(out, last)
        # the first block (lowest thread first) finished before the second's faulting thread ran
        assert torch.equal(out[:64], torch.arange(64.0))
    else:
        assert emu.fill_to(out, last) == 0
        assert torch.equal(out, torch.arange(100.0))
    out.zero_()
    assert emu.fill_to(out, 99) == 0  # the emulation works on after a fault
    assert torch.equal(out, torch.arange(100.0))


def test_partial_masks_meet_only_their_lanes(emu):
    # lanes 1 and 2 meet under mask 0x6 first; then lanes 0 and 1 swap values through shared
    # memory under mask 0x3, and lanes 4-7 sum by shuffles under mask 0xF0
    out = torch.zeros(32, dtype=torch.int32)
    assert emu.partial_masks(out) == 0
    want = [0] * 32
    want[0], want[1] = 17, 7  # swapped
    for lane in range(4, 8):
        want[lane] = sum(10 * i for i in range(4, 8))
    assert out.tolist() == want
