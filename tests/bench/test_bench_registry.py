"""The bench registry: discovery of bench modules, `genext bench --list` and `--op`, the runner's
rows, checks and exit status, with small benches written into the package's search path."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import genext.bench
from genext.__main__ import main
from genext.bench import Bench, Case, Config, Timing, benches, run_bench

# the ops `genext bench --op` has always taken
NAMES = {"group_norm_silu", "attention", "kvcache", "sampler", "vq", "contrastive"}

# a bench module as a new op would add it; {name} and {ok} filled in per test
DUMMY = """
import torch
from genext.bench.registry import IMPL, MS, GBPS, Bench, Case, Column, Timing

def _setup(x):
    return lambda i: x.sum()

def cases(config):
    t = Timing("genext", "fwd", _setup, warmup=1, reps=2, nbytes=4096, shows_check=True)
    return [Case("tiny", torch.float32, (t, Timing("eager", "fwd", _setup, 1, 2, nbytes=4096)),
                 check=lambda x: ({ok}, "dummy check"), inputs=lambda: torch.ones(1024))]

BENCH = Bench("{name}", "a bench written by a test", cases, (Column("dummy case", "case"), IMPL, MS, GBPS))
"""


@pytest.fixture
def extra_modules(tmp_path, monkeypatch):
    """Write bench modules into a folder on genext.bench's search path: name -> ok of its check."""
    monkeypatch.setattr(genext.bench, "__path__", list(genext.bench.__path__) + [str(tmp_path)])
    written = []

    def add(name: str, ok: bool = True, module: str | None = None):
        module = module or name
        (tmp_path / f"{module}.py").write_text(DUMMY.format(name=name, ok=ok))
        written.append(f"genext.bench.{module}")

    yield add
    for module in written:
        sys.modules.pop(module, None)


def test_every_op_of_the_command_line_is_registered():
    registered = benches()
    assert NAMES <= set(registered)
    assert all(b.name == name and b.summary and b.columns for name, b in registered.items())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("quick", [False, True])
def test_cases_list_without_a_device_and_name_each_row_once(device, quick):
    # listing cases builds no tensors, so even the CUDA lists build here
    for bench in benches().values():
        cases = bench.cases(Config(device, quick=quick))
        assert cases, bench.name
        keys = [(c.name, c.dtype, t.impl, t.direction) for c in cases for t in c.timings]
        assert len(keys) == len(set(keys)), bench.name


def test_a_new_module_is_discovered(extra_modules, capsys):
    extra_modules("dummy")
    assert "dummy" in benches()
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in benches():
        assert name in listed
    assert "a bench written by a test" in listed


def test_op_runs_the_named_benches_only(extra_modules, tmp_path, capsys):
    extra_modules("dummy")
    extra_modules("dummy_two")
    path = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--op", "dummy", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {("dummy", "genext"), ("dummy", "eager")}
    assert [r["check"] for r in rows] == ["ok dummy check", ""]
    assert "dummy case" in capsys.readouterr().out  # its table
    assert (
        main(["bench", "--device", "cpu", "--op", "dummy", "dummy_two", "--json", str(path)]) == 0
    )
    assert {r["op"] for r in json.loads(path.read_text())["rows"]} == {"dummy", "dummy_two"}


def test_busy_runs_beside_a_spinning_process_and_rows_carry_the_speed(
    extra_modules, tmp_path, capsys, monkeypatch
):
    extra_modules("dummy")
    spins = []
    real = genext.bench.runner.busy_core

    def watched():
        cm = real()
        spins.append(cm)
        return cm

    monkeypatch.setattr(genext.bench.runner, "busy_core", watched)
    path = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--op", "dummy", "--busy", "--json", str(path)]) == 0
    assert len(spins) == 1
    saved = json.loads(path.read_text())
    assert saved["env"]["busy_core"] is True
    genext_row = next(r for r in saved["rows"] if r["impl"] == "genext")
    eager_row = next(r for r in saved["rows"] if r["impl"] == "eager")
    assert genext_row["extra"]["best_baseline"] == "eager"
    assert math.isclose(genext_row["extra"]["speedup_vs_best"], eager_row["ms"] / genext_row["ms"])
    assert "one core kept busy" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--op", "dummy", "--json", str(path)]) == 0
    assert len(spins) == 1 and json.loads(path.read_text())["env"]["busy_core"] is False


def test_a_failed_check_fails_the_run(extra_modules, capsys):
    extra_modules("dummy", ok=False)
    assert main(["bench", "--device", "cpu", "--op", "dummy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL dummy check" in out and "a correctness check FAILED" in out


def test_an_unknown_op_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--op", "group_norm", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown bench 'group_norm'" in err and "group_norm_silu" in err


def test_two_modules_with_one_name_are_an_error(extra_modules):
    extra_modules("dummy")
    extra_modules("dummy", module="dummy_again")
    with pytest.raises(ValueError, match="two modules register the bench 'dummy'"):
        benches()


def _bench(*timings: Timing) -> Bench:
    case = Case("c", torch.float32, timings, check=lambda _: (None, "not compared"))
    return Bench("t", "", lambda config: [case], ())


def _raise(_inputs):
    def fn(i):
        raise RuntimeError("backend does not take this case\nmore")

    return fn


def test_runner_rows_for_errors_and_unavailable_implementations():
    ok = Timing("ok", "fwd", lambda _: lambda i: None, 1, 2, flops=1e6, units=2)
    na = Timing("na", "fwd", _raise, 1, 2, on_error="n/a")
    absent = Timing("absent", "fwd", lambda _: None, 1, 2)
    rows, all_ok = run_bench(_bench(ok, na, absent), Config("cpu"), copy_bps=1e9)
    assert all_ok  # nothing compared is not a failure
    assert [r.impl for r in rows] == ["ok", "na"]
    assert rows[0].ms > 0 and rows[0].extra["tflops"] > 0 and rows[0].gbps == 0.0
    assert rows[1].check == "n/a: backend does not take this case" and math.isnan(rows[1].ms)
    with pytest.raises(RuntimeError, match="backend does not take"):
        run_bench(_bench(Timing("raises", "fwd", _raise, 1, 2)), Config("cpu"), copy_bps=1e9)


def test_a_timing_context_is_held_around_setup_and_calls_only():
    seen = []

    def setup(_):
        seen.append(torch.is_grad_enabled())
        return lambda i: seen.append(torch.is_grad_enabled())

    run_bench(_bench(Timing("x", "fwd", setup, 1, 2, context=torch.no_grad)), Config("cpu"), 1e9)
    assert seen and not any(seen)
    assert torch.is_grad_enabled()
