"""pytest-benchmark over every case of every bench `genext bench` runs: one test per (bench, case,
implementation, direction), parametrized from genext.bench's registry, with the same inputs,
correctness check and warm-up and repeat counts as `genext bench`.

    pytest benchmarks --benchmark-json=bench.json [--quick] [--no-compile] [-k attention]

pytest-benchmark times each call on the host clock with a device sync after it; the figures of
merit per unit (ms, GB/s and % of the copy bandwidth, TFLOP/s, peak extra MiB on CUDA) go to each
result's extra_info.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from genext.bench import Config, benches, check_text, copy_bandwidth, figures, peak_extra_mib, sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_checks: dict = {}  # (bench, case, dtype) -> the case's check, run once per case


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    config = Config(DEVICE, quick=opt("quick"), compile=not opt("no_compile"))
    params = [
        pytest.param(
            (bench, case, t),
            id="/".join((bench.name, case.name, str(case.dtype)[6:], t.impl, t.direction)),
        )
        for bench in benches().values()
        for case in bench.cases(config)
        for t in case.timings
    ]
    metafunc.parametrize("item", params)


@cache
def _copy_bps() -> float:
    return copy_bandwidth(DEVICE)


def test_bench(benchmark, item):
    bench, case, timing = item
    inputs = case.inputs()
    key = (bench.name, case.name, case.dtype)
    if key not in _checks:
        _checks[key] = case.check(inputs)
    ok, note = _checks[key]
    assert ok is not False, f"{bench.name} {case.name}: {note}"
    benchmark.extra_info.update(
        op=bench.name,
        case=case.name,
        dtype=str(case.dtype)[6:],
        impl=timing.impl,
        direction=timing.direction,
        device=DEVICE,
        units=timing.units,
        case_check=check_text(ok, note),
    )
    with timing.context():
        fn = timing.setup(inputs)
        if fn is None:
            pytest.skip(f"{timing.impl} is not available here")
        counter = itertools.count()

        def call():
            fn(next(counter))
            sync(DEVICE)

        if timing.on_error:
            try:
                call()
            except RuntimeError as e:  # e.g. a backend that does not take this case
                pytest.skip(f"{timing.impl}: {str(e).splitlines()[0]}")
        benchmark.pedantic(call, warmup_rounds=timing.warmup, rounds=timing.reps, iterations=1)
        if timing.peak_memory and DEVICE == "cuda":
            benchmark.extra_info["peak_extra_MiB"] = peak_extra_mib(lambda: fn(0), DEVICE)
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.median / timing.units
    gbps, pct, extra = figures(timing, seconds, _copy_bps())
    benchmark.extra_info.update(ms=seconds * 1e3, **extra)
    if timing.nbytes:
        benchmark.extra_info.update(GBps=gbps, pct_copy=pct)
