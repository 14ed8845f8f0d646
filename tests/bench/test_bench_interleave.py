"""On the CPU `genext bench` times a case's implementations of one direction call by call in turn,
so that load from other work, which changes over seconds on a shared machine, falls on all of
them alike. A fake clock and a fake machine load make that deterministic: each fake call advances
the clock by its cost times the load at that moment, and the load grows as the clock runs."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from genext.bench import Bench, Case, Config, Timing, harness, measure, run_bench, runner
from genext.bench.harness import Contender, interleaved_samples, rounds


class FakeMachine:
    """A host clock that only moves when a fake call runs: a call of cost c takes c times the
    load at its start, and the load grows by 1 every `ramp` seconds of clock (other work
    arriving on the machine)."""

    def __init__(self, ramp: float):
        self.now, self.ramp = 0.0, ramp
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def load(self) -> float:
        return 1.0 + self.now / self.ramp

    def call(self, name: str, cost: float):
        def fn(i: int) -> None:
            self.calls.append(name)
            self.now += cost * self.load()

        return fn


# genext's call costs 1 ms on an idle machine, the baseline's 2 ms: the true speed-up is 2.0
COSTS = {"genext": 1e-3, "eager": 2e-3}
WARMUP, REPS = 2, 9


def _bench(machine: FakeMachine, directions=("fwd",), **timing_args) -> Bench:
    timings = tuple(
        Timing(
            impl,
            d,
            lambda _, impl=impl, d=d: machine.call(f"{impl} {d}", COSTS[impl]),
            WARMUP,
            REPS,
            **timing_args,
        )
        for impl in COSTS
        for d in directions
    )
    case = Case("fake", torch.float32, timings, check=lambda _: (True, "fake check"))
    return Bench("fake", "", lambda config: [case], ())


@pytest.fixture
def machine(monkeypatch) -> FakeMachine:
    # the load grows by 1 every 100 ms: over one implementation's eleven calls (a few tens of ms)
    # it moves by a few tens of percent
    fake = FakeMachine(ramp=0.1)
    monkeypatch.setattr(harness, "clock", fake.clock)
    return fake


def test_interleaved_calls_share_the_load_where_sequential_ones_do_not(machine):
    bench = _bench(machine)
    rows, ok = run_bench(bench, Config("cpu"), 1e9)
    assert ok and [r.impl for r in rows] == ["genext", "eager"]
    interleaved = rows[1].ms / rows[0].ms
    assert rows[0].extra["speedup_vs_best"] == pytest.approx(interleaved)
    assert interleaved == pytest.approx(2.0, rel=0.03)
    # the same implementations timed one after the other (CUDA's way, and the CPU's before):
    # the baseline ran later, under more load, and looks slower than it is
    machine.now = 0.0
    (case,) = bench.cases(Config("cpu"))
    genext, eager = (measure(bench, case, t, None, "cpu", 1e9) for t in case.timings)
    sequential = eager.ms / genext.ms
    assert sequential > 2.0 * 1.15
    assert abs(sequential / 2.0 - 1) > 5 * abs(interleaved / 2.0 - 1)


def test_rounds_call_each_once_and_rotate_who_goes_first(machine):
    run_bench(_bench(machine), Config("cpu"), 1e9)
    calls = [name.split()[0] for name in machine.calls]
    assert calls.count("genext") == calls.count("eager") == WARMUP + REPS
    pairs = [calls[i : i + 2] for i in range(0, len(calls), 2)]
    assert all(sorted(p) == ["eager", "genext"] for p in pairs)  # one call of each per round
    # the first of each round alternates, in the warm-up rounds and in the timed ones
    assert [p[0] for p in pairs] == ["genext", "eager"] * (WARMUP // 2) + [
        ["genext", "eager"][r % 2] for r in range(REPS)
    ]


def test_each_direction_is_interleaved_on_its_own(machine):
    rows, _ = run_bench(_bench(machine, directions=("fwd", "f+b")), Config("cpu"), 1e9)
    # rows in the case's order; the calls: every fwd call, then every f+b call
    assert [(r.impl, r.direction) for r in rows] == [
        ("genext", "fwd"),
        ("genext", "f+b"),
        ("eager", "fwd"),
        ("eager", "f+b"),
    ]
    n = 2 * (WARMUP + REPS)
    assert {c.split()[1] for c in machine.calls[:n]} == {"fwd"}
    assert {c.split()[1] for c in machine.calls[n:]} == {"f+b"}


def test_rounds_with_unequal_counts_and_three_contenders():
    assert list(rounds([2, 0, 1])) == [(0, 0), (2, 0), (0, 1)]
    order = list(rounds([2, 2, 2]))
    assert order == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (0, 1)]
    assert list(rounds([])) == []


def test_each_call_runs_inside_its_own_timings_context(machine):
    state = {"mode": None}

    @contextlib.contextmanager
    def mode(name: str):
        before, state["mode"] = state["mode"], name
        try:
            yield
        finally:
            state["mode"] = before

    seen = []

    def setup(name: str):
        assert state["mode"] == name  # set up inside the context
        return lambda i: seen.append((name, state["mode"]))

    timings = tuple(
        Timing(name, "fwd", lambda _, n=name: setup(n), 1, 3, context=lambda n=name: mode(n))
        for name in ("genext", "eager")
    )
    case = Case("ctx", torch.float32, timings, check=lambda _: (None, "nothing compared"))
    rows, _ = run_bench(Bench("ctx", "", lambda c: [case], ()), Config("cpu"), 1e9)
    assert len(rows) == 2 and len(seen) == 2 * 4
    assert all(name == active for name, active in seen)  # never the other timing's context
    assert state["mode"] is None  # each restored after its calls


def test_unavailable_and_failing_implementations_behave_as_alone(machine):
    def fails_on_third_call(_):
        count = iter(range(100))

        def fn(i):
            if next(count) == 2:
                raise RuntimeError("this backend gave up\nsecond line")
            machine.now += 1e-3

        return fn

    def setup_fails(_):
        raise RuntimeError("does not take the case")

    def steady(_):
        return machine.call("genext", 1e-3)

    timings = (
        Timing("genext", "fwd", steady, WARMUP, REPS, shows_check=True),
        Timing("missing", "fwd", lambda _: None, WARMUP, REPS),
        Timing("flaky", "fwd", fails_on_third_call, WARMUP, REPS, on_error="n/a"),
        Timing("picky", "fwd", setup_fails, WARMUP, REPS, on_error="n/a"),
    )
    case = Case("errors", torch.float32, timings, check=lambda _: (True, "fine"))
    rows, ok = run_bench(Bench("e", "", lambda c: [case], ()), Config("cpu"), 1e9)
    assert ok and [r.impl for r in rows] == ["genext", "flaky", "picky"]  # "missing" left out
    assert rows[0].check == "ok fine" and math.isfinite(rows[0].ms) and rows[0].ms > 0
    assert machine.calls.count("genext") == WARMUP + REPS  # its rounds went on without the others
    assert math.isnan(rows[1].ms) and rows[1].check == "n/a: this backend gave up"
    assert math.isnan(rows[2].ms) and rows[2].check == "n/a: does not take the case"
    assert rows[1].ok is rows[2].ok is True
    # without on_error the error ends the case, as it does when timed alone
    strict = (
        Timing("genext", "fwd", steady, 1, 2),
        Timing("flaky", "fwd", fails_on_third_call, 1, 2),
    )
    case = Case("strict", torch.float32, strict, check=lambda _: (True, "fine"))
    with pytest.raises(RuntimeError, match="this backend gave up"):
        run_bench(Bench("s", "", lambda c: [case], ()), Config("cpu"), 1e9)


@pytest.mark.parametrize("clock, ms", [("device", 1.25), ("host", 1.5)])
def test_units_and_the_host_clock_statistics_as_alone(machine, clock, ms):
    machine.ramp = math.inf  # a steady machine: each call costs what its index says

    def setup(_):
        def fn(i):  # 1, 2, 3, 4 ms
            machine.now += (i + 1) * 1e-3

        return fn

    timings = tuple(
        Timing(impl, "step", setup, 1, 4, units=2, clock=clock) for impl in ("genext", "eager")
    )
    case = Case("units", torch.float32, timings, check=lambda _: (True, "fine"))
    bench = Bench("u", "", lambda c: [case], ())
    rows, _ = run_bench(bench, Config("cpu"), 1e9)
    alone = [measure(bench, case, t, None, "cpu", 1e9) for t in timings]
    # per unit (two per call): the median of 0.5, 1, 1.5, 2 ms, or on the host clock the upper
    # median (a time one loop really took)
    assert [r.ms for r in rows] == pytest.approx([r.ms for r in alone]) == [ms, ms]
    assert (rows[0].min_ms, rows[0].max_ms) == (pytest.approx(0.5), pytest.approx(2.0))
    assert rows[0].iqr_pct == pytest.approx(alone[0].iqr_pct)


def test_interleaved_samples_counts_and_errors():
    calls = []
    fast = Contender(lambda i: calls.append(("a", i)), warmup=1, reps=3)
    slow = Contender(lambda i: calls.append(("b", i)), warmup=2, reps=1)
    times = interleaved_samples([fast, slow])
    assert [len(t) for t in times] == [3, 1]
    assert all(t >= 0 for t in times[0] + times[1])
    # warm-ups count from 0, then the timed calls from 0 again
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 0), ("b", 0), ("a", 1), ("a", 2)]

    def boom(i):
        raise RuntimeError("no")

    caught = interleaved_samples([Contender(boom, 0, 2, catch=True), fast])
    assert isinstance(caught[0], RuntimeError) and len(caught[1]) == 3
    with pytest.raises(RuntimeError, match="no"):
        interleaved_samples([Contender(boom, 0, 2), fast])


def test_a_time_budget_extends_the_rounds_in_turn_until_each_has_its_seconds(machine):
    machine.ramp = math.inf  # a steady machine
    fast = Contender(machine.call("fast", 1e-3), warmup=1, reps=2)
    slow = Contender(machine.call("slow", 3e-3), warmup=1, reps=2)
    times = interleaved_samples([fast, slow], min_seconds=0.0095)
    # the fast one needs 10 calls of 1 ms; the slow one keeps its turn in every round meanwhile
    assert [len(t) for t in times] == [10, 10]
    assert sum(times[0]) >= 0.0095 > sum(times[0][:-1])
    # the warm-up round, then ten timed rounds whose first caller alternates
    rounds_ = [["fast", "slow"] if r % 2 == 0 else ["slow", "fast"] for r in range(10)]
    assert machine.calls == ["fast", "slow"] + sum(rounds_, [])
    # without a budget, the fixed counts
    assert [len(t) for t in interleaved_samples([fast, slow])] == [2, 2]


def test_a_time_budget_stops_at_the_call_cap_and_skips_retired_contenders(machine, monkeypatch):
    machine.ramp = math.inf
    monkeypatch.setattr(harness, "MAX_EXTENDED_REPS", 6)

    def boom(i):
        raise RuntimeError("gave up")

    steady = Contender(machine.call("steady", 1e-3), warmup=0, reps=2)
    times = interleaved_samples([steady, Contender(boom, 0, 2, catch=True)], min_seconds=10.0)
    assert len(times[0]) == 6 and isinstance(times[1], RuntimeError)
    assert machine.calls == ["steady"] * 6


def test_a_time_budget_stops_when_the_calls_together_took_twice_it_each(machine):
    machine.ramp = math.inf
    fast = Contender(machine.call("fast", 1e-3), warmup=0, reps=1)
    slow = Contender(machine.call("slow", 9e-3), warmup=0, reps=1)
    times = interleaved_samples([fast, slow], min_seconds=0.0095)
    # 10 ms a round: the rounds stop at 2 x 2 x 9.5 = 38 ms, before the fast one has its 9.5 ms
    assert [len(t) for t in times] == [4, 4] and sum(times[0]) < 0.0095


def test_busy_rows_report_the_mean_call_where_quiet_ones_report_the_median(machine, monkeypatch):
    machine.ramp = math.inf
    monkeypatch.setattr(runner, "BUSY_REL_SEM", 0.0)  # the time budget alone (the test above)

    def setup(_):
        def fn(i):  # every fifth call waits 10 ms (a scheduler slice), the others take 1 ms
            machine.now += 10e-3 if i % 5 == 4 else 1e-3

        return fn

    timings = tuple(Timing(impl, "fwd", setup, 1, 5) for impl in ("genext", "eager"))
    case = Case("slices", torch.float32, timings, check=lambda _: (True, "fine"))
    bench = Bench("b", "", lambda c: [case], ())
    quiet, _ = run_bench(bench, Config("cpu"), 1e9)
    assert [r.ms for r in quiet] == pytest.approx([1.0, 1.0])
    busy, _ = run_bench(bench, Config("cpu", busy=True), 1e9)
    # rounds go on until each has runner.BUSY_MIN_SECONDS (0.5 s) of calls: 180 calls, 36 of
    # them slow (504 ms), a mean of 2.8 ms
    assert runner.BUSY_MIN_SECONDS == 0.5
    assert [r.ms for r in busy] == pytest.approx([2.8, 2.8])
    assert [r.extra["median_ms"] for r in busy] == pytest.approx([1.0, 1.0])
    assert [r.extra["calls"] for r in busy] == [180, 180]
    # and the mean's precision: its standard error over it (about 9.6%)
    calls = [10e-3 if i % 5 == 4 else 1e-3 for i in range(180)]
    want = 100 * harness.relative_sem(calls)
    assert [r.extra["sem_pct"] for r in busy] == pytest.approx([want, want])
    assert 9 < want < 10


def test_cuda_keeps_timing_each_implementation_alone(machine, monkeypatch):
    # no GPU needed: the runner's choice of path, with the single-timing measure recorded
    alone = []

    def measure_alone(bench, case, timing, inputs, device, copy_bps, check="", ok=None):
        alone.append((timing.impl, device))
        return None if timing.impl == "eager" else "row"

    def no_interleaving(contenders):
        raise AssertionError("CUDA timings are not interleaved")

    monkeypatch.setattr(runner, "measure", measure_alone)
    monkeypatch.setattr(runner, "interleaved_samples", no_interleaving)
    (case,) = _bench(machine).cases(Config("cuda"))
    assert runner.measure_case(_bench(machine), case, None, "cuda", 1e9) == ["row"]
    assert alone == [("genext", "cuda"), ("eager", "cuda")]


def test_an_imprecise_mean_extends_the_rounds_up_to_a_cap(machine):
    machine.ramp = math.inf

    def noisy(name: str, costs: list[float]):
        # calls that cost each of `costs` in turn (a heavy tail: one call in four is slow)
        made = [0]

        def fn(i: int) -> None:
            machine.calls.append(name)
            machine.now += costs[made[0] % len(costs)]
            made[0] += 1

        return fn

    steady = Contender(machine.call("steady", 1e-3), warmup=0, reps=2)
    tail = Contender(noisy("tail", [1e-3, 1e-3, 1e-3, 20e-3]), warmup=0, reps=2)
    # a steady contender's mean is exact: the time budget alone decides, as before
    times = interleaved_samples([steady], min_seconds=0.01, rel_sem=0.15, max_seconds=1.0)
    assert len(times[0]) == 10
    # a heavy-tailed one goes on past the budget until its mean is within 15% (about 90 calls,
    # half a second), the steady one keeping its turn in every round
    machine.calls.clear()
    times = interleaved_samples([steady, tail], min_seconds=0.01, rel_sem=0.15, max_seconds=1.0)
    n = len(times[1])
    assert len(times[0]) == n and 0.3 < sum(times[1]) < 1.0
    assert harness.relative_sem(times[1]) <= 0.15 < harness.relative_sem(times[1][:-1])
    # ... or until its calls add up to max_seconds
    machine.calls.clear()
    times = interleaved_samples([steady, tail], min_seconds=0.01, rel_sem=0.001, max_seconds=0.2)
    assert 0.2 <= sum(times[1]) < 0.2 + 20e-3
    # without rel_sem the time budget alone, as before: rounds until the steady one has its
    # 10 ms or all calls together took twice the budget per contender (40 ms, 8 rounds here)
    machine.calls.clear()
    times = interleaved_samples([steady, tail], min_seconds=0.01)
    assert len(times[0]) == len(times[1]) == 8 < n


def test_relative_sem():
    assert harness.relative_sem([1.0]) == math.inf
    assert harness.relative_sem([2.0, 2.0, 2.0]) == 0.0
    # stdev 1.29, four calls: standard error 0.645 over a mean of 2.5
    assert harness.relative_sem([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        (1.2909944487358056 / 2) / 2.5
    )


def test_env_switch_sets_and_restores(monkeypatch):
    from genext.bench import env_switch

    monkeypatch.delenv("GENEXT_TEST_SWITCH", raising=False)
    with env_switch("GENEXT_TEST_SWITCH", False):
        assert "GENEXT_TEST_SWITCH" not in os.environ
    with env_switch("GENEXT_TEST_SWITCH", True):
        assert os.environ["GENEXT_TEST_SWITCH"] == "1"
    assert "GENEXT_TEST_SWITCH" not in os.environ
    monkeypatch.setenv("GENEXT_TEST_SWITCH", "0")
    try:
        with env_switch("GENEXT_TEST_SWITCH", True):
            assert os.environ["GENEXT_TEST_SWITCH"] == "1"
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert os.environ["GENEXT_TEST_SWITCH"] == "0"
    with env_switch("GENEXT_TEST_SWITCH", False):  # off means unset, whatever was there
        assert "GENEXT_TEST_SWITCH" not in os.environ
    assert os.environ["GENEXT_TEST_SWITCH"] == "0"
