"""CPU kernels size their thread team from the work: small inputs run on the calling thread (no
team to wake, so no wait for a descheduled thread when another process holds a core), large ones
use the team. genext._C._cpu_team_launches() counts the teams the CPU kernels woke."""

import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    # the tests below take the AVX2 machines' routing rule (avx2_routing), which keeps these head
    # dims on genext's kernel (a machine with AMX hands them to PyTorch's SDPA)
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
def test_small_inputs_run_on_the_calling_thread(two_threads, avx2_routing, name, small, large):
    assert _launches(small) == 0, f"{name}: a thread team for a small input"
    assert _launches(large) >= 1, f"{name}: no thread team for a large input"


@pytest.mark.parametrize("name,small,large", CASES, ids=[c[0] for c in CASES])
def test_one_thread_never_launches_a_team(avx2_routing, name, small, large):
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


# ---- the thread pool ------------------------------------------------------------------------------
# parallel_for's team is genext's own pool: the calling thread takes chunks with the workers that
# wake in time and waits only for those that joined. _C._cpu_parallel_for_check runs it directly:
# items spin for ns_per_item, each chunk tries a nested parallel_for (which must run inline), and
# one item may raise; it returns (every item ran once, team launches during the call, the most
# threads at::get_num_threads() reported inside a chunk: 1, so ATen ops there start no team, how
# many distinct threads ran chunks, whether every chunk ran inside a parallel region as ATen's
# parallel_for marks it). Its mode flags: item 0 waits (up to 2 s) until a second thread has
# started a chunk; a chunk on a thread other than the caller raises ValueError.
#
# A pool that deadlocks would hang the test run, so the checks that run the pool directly run in a
# fresh Python process that the test kills after a timeout: a hang fails the test instead.
WAIT_FOR_HELPER = 1
THROW_OFF_CALLER = 2


def _isolated(check, timeout: float = 120.0) -> None:
    """Runs check(), a function of this module, in a fresh Python process; fails on its error or
    when it has not finished after `timeout` seconds (the process is killed)."""
    here = Path(__file__).resolve()
    script = (
        f"import sys; sys.path.insert(0, {str(here.parent)!r}); "
        f"import {here.stem} as t; t.{check.__name__}()"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{check.__name__} hung: no result after {timeout:.0f} s")
    assert proc.returncode == 0, f"{check.__name__} failed:\n{proc.stdout}{proc.stderr[-6000:]}"


def _assert_plain_job(result, what: str) -> None:
    """A job without a raise: every item once, one launch, no nested team, a parallel region."""
    once, launches, aten, threads, region = result
    assert once, f"{what}: an item ran twice or never"
    assert launches == 1, f"{what}: {launches} launches (a nested team ran)"
    assert aten == 1, f"{what}: ATen would start {aten} threads inside a chunk"
    assert 1 <= threads <= torch.get_num_threads(), f"{what}: chunks ran on {threads} threads"
    assert region, f"{what}: a chunk ran outside a parallel region"


def _check_pool_covers_every_item_once_and_never_nests():
    _C._cpu_set_team_mode("pool")  # the pool itself, not the automatic choice
    for threads in (2, 4):
        torch.set_num_threads(threads)
        for n in [2, 3, 17, 97, 1025]:  # fewer items than threads, odd counts, chunk tails
            result = _C._cpu_parallel_for_check(n, 4e6 / n, -1)  # 4 ms in all
            _assert_plain_job(result, f"{threads} threads, {n} items")


@pytest.mark.slow  # a subprocess of its own; the quick profile keeps one such pool check
def test_pool_covers_every_item_once_and_never_nests():
    _isolated(_check_pool_covers_every_item_once_and_never_nests)


def _check_workers_run_chunks():
    _C._cpu_set_team_mode("pool")  # the pool itself, not the automatic choice
    torch.set_num_threads(2)
    result = _C._cpu_parallel_for_check(64, 50_000.0, -1, WAIT_FOR_HELPER)
    _assert_plain_job(result, "item 0 waiting for a helper")
    assert result[3] >= 2, "no pool worker ran a chunk in 2 s"
    # An exception raised on a worker reaches the caller with its type and message.
    with pytest.raises(ValueError, match="a chunk raised on a pool worker"):
        _C._cpu_parallel_for_check(64, 50_000.0, -1, WAIT_FOR_HELPER | THROW_OFF_CALLER)
    for _ in range(3):  # the pool is free and whole again
        _assert_plain_job(_C._cpu_parallel_for_check(64, 50_000.0, -1), "after a worker raised")


def test_workers_run_chunks_and_their_exceptions_reach_the_caller():
    _isolated(_check_workers_run_chunks)


def _check_pool_propagates_an_exception_and_keeps_working():
    _C._cpu_set_team_mode("pool")  # the pool itself, not the automatic choice
    torch.set_num_threads(2)
    for throw_at in [0, 31, 63]:  # first chunk (caller), middle, last item
        with pytest.raises(RuntimeError, match=f"item {throw_at} raised"):
            _C._cpu_parallel_for_check(64, 100_000.0, throw_at)
        for _ in range(3):  # the pool is free and whole again
            _assert_plain_job(_C._cpu_parallel_for_check(64, 50_000.0, -1), f"after {throw_at}")


@pytest.mark.slow  # a subprocess of its own; the quick profile keeps one such pool check
def test_pool_propagates_an_exception_and_keeps_working():
    _isolated(_check_pool_propagates_an_exception_and_keeps_working)


def _gn_fwd_bwd(x, w, b, gy):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = gops.group_norm_silu(x, 8, w, b, 1e-5)
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


def _attention_fwd_bwd(q, k, v, go):
    # return_lse: genext's kernel on every machine (a call without lse may be handed to
    # PyTorch's SDPA, whose results depend on the thread count)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = gops.flash_attention(q, k, v, return_lse=True)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), go))


def _thread_cases():
    """(name, fn, args): ops large enough for a team at 2 threads, in fp32 and fp64."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for dtype in (torch.float32, torch.float64):

        def r(*shape, dtype=dtype):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        x = r(2, 64, 48, 48) + 1.0  # non-zero mean
        cases.append((f"group_norm_silu {dtype}", _gn_fwd_bwd, (x, r(64), r(64), r(2, 64, 48, 48))))
        q, k, v, go = (r(1, 4, 257, 32) for _ in range(4))  # 257: a ragged last tile
        cases.append((f"flash attention {dtype}", _attention_fwd_bwd, (q, k, v, go)))
        z, codebook = r(4097, 64), r(1024, 64)  # 4097: a chunk tail
        cases.append((f"vq_nearest {dtype}", gops.vq_nearest, (z, codebook)))
    return cases


def _assert_same(name, got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{name}: output {i} differs"


def test_results_identical_across_1_2_4_threads():
    before = torch.get_num_threads()
    try:
        for name, fn, args in _thread_cases():
            results = {}
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                results[threads] = fn(*args)
            _assert_same(f"{name}, 2 threads", results[2], results[1])
            _assert_same(f"{name}, 4 threads", results[4], results[1])
    finally:
        torch.set_num_threads(before)


def _check_python_threads_calling_ops_at_once():
    _C._cpu_set_team_mode("pool")  # the pool itself, not the automatic choice
    torch.set_num_threads(2)
    cases = _thread_cases()
    want = [fn(*args) for _, fn, args in cases]
    errors: list[str] = []

    def worker(seed):
        try:
            for i in range(len(cases) * 2):
                j = (i + seed) % len(cases)
                name, fn, args = cases[j]
                _assert_same(f"thread {seed}: {name}", fn(*args), want[j])
                once = _C._cpu_parallel_for_check(37, 30_000.0, -1)[0]
                assert once, f"thread {seed}: pool check"
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a Python thread hung"
    assert not errors, errors


@pytest.mark.slow  # a subprocess of its own; the quick profile keeps one such pool check
def test_python_threads_calling_ops_at_once():
    """Several Python threads run kernels (and the pool directly) at once: one owns the pool, the
    others run their ranges inline; every result equals the one computed alone."""
    _isolated(_check_python_threads_calling_ops_at_once)


def _forward_cases():
    """Forward ops that run genext's kernels and no ATen op that starts a team (in a forked child,
    ATen's OpenMP team from the parent hangs: DataLoader workers set one thread for that reason)."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 64, 48, 48, generator=g) + 1.0, torch.randn(64), torch.randn(64)
    q, k, v = (torch.randn(1, 4, 257, 32, generator=g) for _ in range(3))
    return [
        (lambda: gops.group_norm_silu(x, 8, w, b, 1e-5)[0]),
        (lambda: gops.flash_attention(q, k, v, return_lse=True)[0]),  # genext's kernel, not SDPA
    ]


def _child_runs_ops(conn, cases):
    """In a forked child: the pool's jobs and kernels at two threads; results as raw bytes (a
    comparison in the child would be an ATen op that may start a team)."""
    try:
        launches = _C._cpu_team_launches()
        once, check_launches, aten, _, region = _C._cpu_parallel_for_check(64, 50_000.0, -1)
        check = (once, check_launches, aten, region)
        outs = [fn().numpy().tobytes() for fn in cases]
        conn.send((check, _C._cpu_team_launches() - launches, outs))
    except Exception as e:  # noqa: BLE001 (reported by the parent)
        conn.send(repr(e))
    finally:
        conn.close()


def _check_forked_child_runs_ops():
    torch.set_num_threads(2)
    cases = _forward_cases()
    want = [fn().numpy().tobytes() for fn in cases]  # on OpenMP teams (the automatic choice)
    _C._cpu_set_team_mode("pool")
    _assert_plain_job(_C._cpu_parallel_for_check(64, 50_000.0, -1), "parent")  # its pool runs
    _C._cpu_set_team_mode("auto")  # the child's choice: always the pool after a fork
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_runs_ops, args=(child_end, cases), daemon=True)
    child.start()
    child_end.close()
    try:
        assert parent_end.poll(60), "the forked child hung"
        result = parent_end.recv()
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert not isinstance(result, str), result
    check, launches, outs = result
    assert check == (True, 1, 1, True)
    assert launches >= 2, "the child's kernels ran no team"
    assert outs == want, "the child's results differ"
    assert child.exitcode == 0


@pytest.mark.slow  # a subprocess of its own; the quick profile keeps one such pool check
def test_forked_child_runs_ops():
    """A DataLoader-style fork after the parent used OpenMP teams and the pool: the child's kernels
    start a fresh pool and give the parent's results (an OpenMP team would hang there: the
    parent's threads do not exist in the child)."""
    _isolated(_check_forked_child_runs_ops)


def _pin_all_threads(cpus) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def _assert_two_threads_cost_what_one_does(job) -> None:
    """Times job() at 1 and 2 threads, alternating so both see the same load: the 2-thread median
    must stay under twice the 1-thread one (run with every thread pinned to one CPU)."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(11):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            job()
            times[threads].append(time.perf_counter() - t0)
    one, two = (statistics.median(times[t]) for t in (1, 2))
    assert two < 2.0 * one, (
        f"2 threads on one CPU: {two * 1e3:.2f} ms, 1 thread: {one * 1e3:.2f} ms"
    )


def _check_caller_never_waits_for_an_unscheduled_worker():
    _C._cpu_set_team_mode("pool")  # the pool itself, not the automatic choice
    torch.set_num_threads(2)
    job = lambda: _C._cpu_parallel_for_check(64, 20_000.0, -1)  # noqa: E731 (1.3 ms on one core)
    _assert_plain_job(job(), "before pinning")  # the worker exists
    cpus = os.sched_getaffinity(0)
    _pin_all_threads({min(cpus)})
    try:
        _assert_two_threads_cost_what_one_does(job)
    finally:
        _pin_all_threads(cpus)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux thread affinity")
@pytest.mark.slow  # seconds of pinned timing runs in a subprocess
def test_caller_never_waits_for_an_unscheduled_worker():
    """Every thread of the process pinned to one CPU: while the caller computes, its worker cannot
    run, as when another process holds the worker's core. The caller takes every chunk itself and
    returns; a two-thread job costs what one thread does. (An OpenMP team's closing barrier waits
    for the descheduled thread: the same timing loop on the OpenMP team,
    _C._cpu_set_team_mode("openmp"), took 9-11x the one-thread time here; the check before the
    loop holds only for the pool and has to be left out for that comparison.)"""
    _isolated(_check_caller_never_waits_for_an_unscheduled_worker)


def _check_auto_mode_leaves_a_waiting_team_for_the_pool():
    assert _C._cpu_team_mode() == "auto"
    torch.set_num_threads(2)
    job = lambda: _C._cpu_parallel_for_check(64, 20_000.0, -1)  # noqa: E731 (1.3 ms on one core)
    # Teams whose threads all ran keep OpenMP; leaving it takes two teams that kept their caller
    # waiting more than a millisecond (on a loaded machine another process may hold a core: then
    # the pool is the right choice).
    took = []
    for _ in range(8):
        t0 = time.perf_counter()
        job()
        took.append(time.perf_counter() - t0)
    if _C._cpu_next_team_is_pool():
        slow = sum(t > 1e-3 for t in took)
        assert slow >= 2, f"left OpenMP after {slow} slow teams: {took}"
    cpus = os.sched_getaffinity(0)
    _pin_all_threads({min(cpus)})
    try:
        # a team's barrier waits for its descheduled thread, and the second team that waits a
        # slice moves the next ones to the pool; a team whose thread the scheduler happens to run
        # early waits less than a slice and does not count, so up to four more are allowed
        teams = 0
        while teams < 6 and (teams < 2 or not _C._cpu_next_team_is_pool()):
            job()
            teams += 1
        assert _C._cpu_next_team_is_pool(), f"still on OpenMP after {teams} pinned teams"
        _assert_two_threads_cost_what_one_does(job)
    finally:
        _pin_all_threads(cpus)
    _C._cpu_set_team_mode("auto")  # resetting the mode forgets the choice
    assert not _C._cpu_next_team_is_pool()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux thread affinity")
@pytest.mark.slow  # seconds of pinned timing runs in a subprocess
def test_auto_mode_leaves_a_waiting_team_for_the_pool():
    """By default a job runs on an OpenMP team (the threads PyTorch's own ops keep warm) until two
    teams within 100 ms keep their caller waiting a scheduler slice for a descheduled thread; then
    the pool takes the next jobs, which cost what one thread does even with every thread pinned to
    one CPU."""
    _isolated(_check_auto_mode_leaves_a_waiting_team_for_the_pool)


def _check_auto_mode_after_a_pytorch_region():
    assert _C._cpu_team_mode() == "auto"
    torch.set_num_threads(2)
    big = torch.randn(1 << 20)
    torch_op = lambda: torch.add(big, 1.0)  # noqa: E731 (an OpenMP region of PyTorch's own)
    job = lambda: _C._cpu_parallel_for_check(64, 40_000.0, -1)  # noqa: E731 (2.6 ms on one core)
    for _ in range(3):
        torch_op()
        job()
    cpus = os.sched_getaffinity(0)
    _pin_all_threads({min(cpus)})
    spells = _C._cpu_pool_spells()
    try:
        _C._cpu_set_team_mode("auto")
        times: dict[int, list[float]] = {1: [], 2: []}
        # 31 rounds: the choice pays a slow team twice before its first spell on the pool and
        # once more each time a spell ends (after 32, 64, 128 ms, ...), 4-5 rounds in all, which
        # over 11 rounds left the median one hiccup from a slow call
        for _ in range(31):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                torch_op()
                t0 = time.perf_counter()
                job()
                times[threads].append(time.perf_counter() - t0)
    finally:
        _pin_all_threads(cpus)
    assert _C._cpu_pool_spells() > spells, "the automatic choice never moved to the pool"
    one, two = (statistics.median(times[t]) for t in (1, 2))
    assert two < 2.0 * one, (
        f"after a PyTorch op, 2 threads on one CPU: {two * 1e3:.2f} ms, 1 thread: {one * 1e3:.2f} ms"
    )


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux thread affinity")
@pytest.mark.slow  # seconds of pinned timing runs in a subprocess
def test_auto_mode_after_a_pytorch_region():
    """Right after a PyTorch op's OpenMP region, with every thread pinned to one CPU: the region's
    thread, descheduled, can keep the next OpenMP team waiting (libgomp's team start waits for it
    to dock, its closing barrier for it to arrive); the automatic choice must see such a wait and
    move to the pool, so that genext's job right after PyTorch's costs what one thread does.
    (Whether a given team waits depends on when the OS switches threads, so only the cost is
    checked.)"""
    _isolated(_check_auto_mode_after_a_pytorch_region)


def _spell_ends(timeout: float = 2.0) -> None:
    give_up = time.monotonic() + timeout
    while _C._cpu_next_team_is_pool():
        assert time.monotonic() < give_up, "a spell on the pool did not end"
        time.sleep(0.002)


def test_auto_mode_confirms_load_and_lengthens_spells_while_it_lasts():
    """The automatic choice's rule, driven with reported waits (ms): a single slice-long wait is a
    hiccup and keeps OpenMP, as do short waits and waits that are a small share of the call's
    work; a second slice-long wait soon after starts a 32 ms spell on the pool; a wait right after
    a spell ends (the load outlasted it) starts one twice as long; a wait long after starts
    again from one that needs confirming."""
    _C._cpu_set_team_mode("auto")
    try:
        spells = _C._cpu_pool_spells()
        for wait, work in ((0.5, 0.5), (0.5, 0.5), (2.0, 100.0), (2.0, 100.0)):
            _C._cpu_note_team_wait(wait, work)
        assert not _C._cpu_next_team_is_pool()
        _C._cpu_set_team_mode("auto")
        _C._cpu_note_team_wait(2.0, 1.0)
        assert not _C._cpu_next_team_is_pool(), "one wait moved to the pool"
        _C._cpu_note_team_wait(2.0, 1.0)
        assert _C._cpu_next_team_is_pool()
        left, hold = _C._cpu_auto_pool_state()
        assert hold == 32.0 and 0.0 < left <= 32.0
        for _ in range(3):  # waits reported during the spell (teams begun before it) leave it
            _C._cpu_note_team_wait(2.0, 1.0)
        assert _C._cpu_auto_pool_state()[1] == 32.0
        for want in (64.0, 128.0):
            _spell_ends()
            _C._cpu_note_team_wait(2.0, 1.0)
            assert _C._cpu_next_team_is_pool(), "a wait right after a spell did not start one"
            assert _C._cpu_auto_pool_state()[1] == want
        _spell_ends()
        time.sleep(0.15)  # the load seems gone: the next wait needs confirming again
        _C._cpu_note_team_wait(2.0, 1.0)
        assert not _C._cpu_next_team_is_pool()
        _C._cpu_note_team_wait(2.0, 1.0)
        assert _C._cpu_auto_pool_state()[1] == 32.0
        assert _C._cpu_pool_spells() - spells == 4
    finally:
        _C._cpu_set_team_mode("auto")
    assert _C._cpu_auto_pool_state() == (0.0, 32.0)


def _check_team_minimums():
    torch.set_num_threads(2)
    # whether a job of (items, ns per item) ran as a team: its chunks inside a parallel region
    # (the check's launch count would also count the team its one-thread run starts in a chunk)
    teamed = lambda job: bool(_C._cpu_parallel_for_check(*job, -1)[4])  # noqa: E731

    def load_seen():  # two slice-long waits close together: a spell on the pool
        _C._cpu_set_team_mode("auto")
        for _ in range(2):
            _C._cpu_note_team_wait(2.0, 1.0)
        assert _C._cpu_next_team_is_pool()

    # 64 us of work in 64 items (two threads of 32 us), and 40 us (one of 25 us at most)
    mid, small = (64, 1_000.0), (40, 1_000.0)
    _C._cpu_set_team_mode("auto")
    assert teamed(mid), "a quiet machine ran 64 us of work on one thread"
    _C._cpu_set_team_mode("auto")
    assert not teamed(small), "a quiet machine woke a team for 40 us of work"
    for forced in ("openmp", "pool"):
        _C._cpu_set_team_mode(forced)
        assert not teamed(mid), f"mode {forced}: a team for 64 us of work"
    load_seen()
    assert not teamed(mid), "a team for 64 us of work while load was seen"
    load_seen()
    assert teamed((64, 2_000.0)), "no team for 128 us of work while load was seen"


def test_team_minimums():
    """A thread needs 25 us of work while the automatic choice runs OpenMP teams (a quiet
    machine's team, kept spinning by PyTorch's ops, joins within microseconds); the forced modes
    and the automatic choice during a spell on the pool (teams were seen waiting for a thread
    another process kept off its core) need 50 us."""
    _isolated(_check_team_minimums)
