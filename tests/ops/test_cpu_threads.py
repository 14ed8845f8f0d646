"""CPU kernels size their thread team from the work: small inputs run on the calling thread (no
team to wake, so no wait for a descheduled thread when another process holds a core), large ones
use the team. genext._C._cpu_team_launches() counts the teams the CPU kernels woke."""

import pytest
import torch

import genext.ops as gops
from genext import _C
from genext.samplers import DDIMScheduler


def _ddim_step(shape):
    sched = DDIMScheduler()
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(shape, generator=g) for _ in range(2))
    return lambda: sched.step(eps, sched.timesteps[10], x)


def _vq(n, k, d):
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    return lambda: gops.vq_nearest(z, codebook)


def _vq_ema(n, k, d):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    return lambda: gops.vq_ema_update(idx, z, k)


def _decode(b, lk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, 8, 64, generator=g)
    k, v = (torch.randn(b, lk + 1, 2, 64, generator=g) for _ in range(2))
    k_new, v_new = (torch.randn(b, 1, 2, 64, generator=g) for _ in range(2))
    lens = torch.full((b,), lk, dtype=torch.int32)
    return lambda: gops.attention_with_kvcache(q, k, v, lens, k_new, v_new)


def _attention(h, length, d):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, length, d, generator=g) for _ in range(3))
    return lambda: gops.flash_attention(q, k, v)


# (name, small case, large case): the small one is work a core finishes in tens of microseconds
# or less (the SD-latent sampler step is 32k elements, a size PyTorch's own elementwise ops also
# keep on the calling thread), the large one is milliseconds of work.
CASES = [
    ("ddim step", _ddim_step((2, 4, 64, 64)), _ddim_step((8, 4, 128, 128))),
    ("vq_nearest", _vq(64, 64, 16), _vq(4096, 1024, 64)),
    ("vq_ema_update", _vq_ema(1024, 64, 16), _vq_ema(65536, 64, 256)),
    ("decode step", _decode(1, 128), _decode(16, 4096)),
    ("flash attention", _attention(1, 16, 8), _attention(4, 512, 16)),
]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _launches(fn) -> int:
    fn()  # warm-up: lazy initialisation outside the count
    n0 = _C._cpu_team_launches()
    fn()
    return _C._cpu_team_launches() - n0


@pytest.mark.parametrize("name,small,large", CASES, ids=[c[0] for c in CASES])
def test_small_inputs_run_on_the_calling_thread(two_threads, name, small, large):
    assert _launches(small) == 0, f"{name}: a thread team for a small input"
    assert _launches(large) >= 1, f"{name}: no thread team for a large input"


@pytest.mark.parametrize("name,small,large", CASES, ids=[c[0] for c in CASES])
def test_one_thread_never_launches_a_team(name, small, large):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _launches(large) == 0
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count(two_threads):
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(4096, 64, generator=g), torch.randn(1024, 64, generator=g)
    idx2, dist2 = gops.vq_nearest(z, codebook)
    torch.set_num_threads(1)
    idx1, dist1 = gops.vq_nearest(z, codebook)
    assert torch.equal(idx1, idx2) and torch.equal(dist1, dist2)
