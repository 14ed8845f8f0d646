"""`genext bench` and `genext info` as a user meets them: argument errors (exit status 2 and a
message naming the option), --version, --list with cases, progress on stderr, strict JSON with
an `ok` per row and an env block, busy-machine warnings, --plot, the run without diffusers, and
info's summary and --json. Timings are faked or tiny: no test here runs a real bench at size."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys

import pytest
import torch

import genext
import genext.bench
from genext import _build_config
from genext.__main__ import main
from genext.bench import Bench, Case, Config, Timing, run_bench, runner, strict

# a bench module as a new op would add it: a checked genext row, a baseline, and a row whose
# implementation fails (its figures are NaN: null in the JSON)
TINY = """
import torch
from genext.bench.registry import IMPL, MS, GBPS, PCT_COPY, TFLOPS, PEAK_MIB, Bench, Case, Column, Timing

def _setup(x):
    return lambda i: x.sum()

def _fails(x):
    def fn(i):
        raise RuntimeError("this backend does not take the case")
    return fn

def cases(config):
    timings = (
        Timing("genext", "fwd", _setup, 1, 3, nbytes=4096, shows_check=True, peak_memory=True),
        Timing("eager", "fwd", _setup, 1, 3, nbytes=4096, peak_memory=True),
        Timing("other", "fwd", _fails, 1, 3, on_error="n/a"),
    )
    return [Case("tiny", torch.float32, timings, check=lambda x: (True, "tiny check"),
                 inputs=lambda: torch.ones(1024))]

BENCH = Bench("tiny", "a bench written by a test", cases,
              (Column("tiny case", "case"), IMPL, MS, GBPS, PCT_COPY, TFLOPS, PEAK_MIB))
"""


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The bench "tiny" on genext.bench's search path, with steady fake timings (1 ms calls, 2%
    apart) and a quiet machine (load 0), so that nothing here depends on this machine's load."""
    folder = tmp_path / "benches"
    folder.mkdir()
    (folder / "tiny_bench.py").write_text(TINY)
    monkeypatch.setattr(genext.bench, "__path__", list(genext.bench.__path__) + [str(folder)])
    fake_timings(monkeypatch, STEADY)
    monkeypatch.setattr(runner, "load_average", lambda: 0.0)
    monkeypatch.setattr(runner, "copy_bandwidth", lambda device: 1e9)
    yield
    sys.modules.pop("genext.bench.tiny_bench", None)


STEADY = [1.00e-3, 1.01e-3, 0.99e-3, 1.02e-3, 1.00e-3]


def fake_times(times: list[float]):
    """A stand-in for the harness's samplers: one call of fn (so that a failing implementation
    still fails), then `times` as the timed calls."""

    def samples(fn, device, warmup, reps):
        fn(0)
        return list(times)

    return samples


def fake_interleaved(times: list[float]):
    """A stand-in for the harness's interleaved sampler (the CPU's): one call of each contender
    inside its context (a RuntimeError retires it where it catches), then `times` as each one's
    timed calls."""

    def samples(contenders, min_seconds=0.0, rel_sem=0.0, max_seconds=0.0):
        results = []
        for c in contenders:
            try:
                with c.context():
                    c.fn(0)
            except RuntimeError as e:
                if not c.catch:
                    raise
                results.append(e)
                continue
            results.append(list(times))
        return results

    return samples


def fake_timings(monkeypatch, times: list[float]) -> None:
    """Every sampler the runner uses faked to return `times`."""
    monkeypatch.setattr(runner, "time_samples", fake_times(times))
    monkeypatch.setattr(runner, "host_time_samples", fake_times(times))
    monkeypatch.setattr(runner, "interleaved_samples", fake_interleaved(times))


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--dtype", "fp16"], "choose from"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--op", "group_norm"], "unknown bench 'group_norm'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert _exit_code(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _exit_code(["bench", "--device", "cuda", "--op", "vq"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is visible" in err and "--device cpu" in err
    # the same from Python, without argparse
    assert genext.bench.run(["vq"], device="cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_version(monkeypatch, capsys):
    monkeypatch.setattr(_build_config, "commit", "", raising=False)  # a build outside git
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"genext {genext.__version__}"
    monkeypatch.setattr(_build_config, "commit", "0123abcd", raising=False)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"genext {genext.__version__} (commit 0123abcd)"


def test_list_names_each_bench_and_its_cases(capsys):
    assert main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name, bench in genext.bench.benches().items():
        assert name in out and bench.summary in out
        for case in bench.cases(genext.bench.Config("cpu", compile=False)):
            assert f"{case.name}  {str(case.dtype)[6:]}" in out, (name, case.name)
    # group_norm_silu's quick run is its first and last CPU shape
    assert "1x128x256x256  float32  quick" in out and "2x1280x8x8  float32  quick" in out
    assert "2x320x64x64  float32\n" in out


def test_run_reports_progress_on_stderr_and_writes_strict_json(tiny, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    # one line per case as it finishes, then the wall time; none of it on stdout
    assert "[1/1] tiny tiny float32: ok, 3 rows in" in err and "1 case in" in err
    assert "wall time" in err and "[1/1]" not in out and "WARNING" not in out
    # the table: the meaningless columns (no flops, no peak memory on the CPU) left out
    head = next(line for line in out.splitlines() if line.startswith("tiny case"))
    assert head.split() == ["tiny", "case", "impl", "ms", "GB/s", "%copy", "iqr%"] + [
        "vs",
        "best",
        "check",
    ]
    text = path.read_text()
    record = json.loads(text, parse_constant=_no_constants)  # no NaN / Infinity literals
    rows = {r["impl"]: r for r in record["rows"]}
    assert set(rows) == {"genext", "eager", "other"}
    assert all(r["ok"] is True for r in rows.values())  # the case's check, on every row
    assert rows["genext"]["check"] == "ok tiny check"
    assert rows["other"]["ms"] is None and rows["other"]["check"].startswith("n/a: this backend")
    assert rows["genext"]["extra"]["peak_extra_MiB"] is None  # NaN on the CPU: null
    assert rows["genext"]["min_ms"] == pytest.approx(0.99) and rows["genext"]["max_ms"] == 1.02
    assert rows["genext"]["iqr_pct"] == pytest.approx(1.0) and rows["genext"]["noisy"] is False
    env = record["env"]
    for key in ("genext", "commit", "build", "torch", "device", "cpu", "threads", "load_average"):
        assert key in env, key
    assert env["genext"] == genext.__version__ and env["torch"] == torch.__version__
    assert env["build"]["cuda"] == genext.build_info()["cuda"]
    assert env["machine_busy"] is False and env["noisy_rows"] == 0 and env["wall_s"] > 0


def test_progress_is_a_bar_on_a_terminal(tiny, monkeypatch):
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["bench", "--device", "cpu", "--op", "tiny"]) == 0
    text = err.getvalue()
    assert "1/1" in text and "[1/1]" not in text  # a bar, not the lines
    assert text.rstrip().splitlines()[-1].startswith("genext bench: 1 case in")


def test_rows_carry_the_case_check_as_ok():
    timings = tuple(
        Timing(impl, "fwd", lambda _: lambda i: None, 1, 2, shows_check=impl == "genext")
        for impl in ("genext", "eager")
    )
    for verdict, text in ((False, "FAIL off"), (True, "ok off"), (None, "off")):
        case = Case("c", torch.float32, timings, check=lambda _, v=verdict: (v, "off"))
        rows, all_ok = run_bench(Bench("t", "", lambda c, k=case: [k], ()), Config("cpu"), 1e9)
        assert all_ok is (verdict is not False)
        assert [r.ok for r in rows] == [verdict, verdict] and rows[0].check == text


def test_strict_json_values():
    nan, inf = float("nan"), float("inf")
    assert strict({"a": nan, "b": [inf, -inf, 1.5], "c": ("x", {"d": nan})}) == {
        "a": None,
        "b": [None, None, 1.5],
        "c": ["x", {"d": None}],
    }


def test_busy_machine_and_noisy_rows_are_warned_about(tiny, tmp_path, monkeypatch, capsys):
    path = tmp_path / "out.json"
    monkeypatch.setattr(runner, "load_average", lambda: 64.0)
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the machine is busy at the start (load average 64.0" in out
    assert "busy at the end" in out
    assert json.loads(path.read_text())["env"]["machine_busy"] is True
    # a quiet machine, but calls far apart: the rows are noisy and the run says so
    monkeypatch.setattr(runner, "load_average", lambda: 0.0)
    fake_timings(monkeypatch, [1e-3, 1e-3, 2e-3, 3e-3, 3e-3])
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 timed rows are noisy" in out and "many rows are noisy" in out
    assert "noisy" in next(line for line in out.splitlines() if line.startswith("tiny  "))
    env = json.loads(path.read_text())["env"]
    assert env["machine_busy"] is True and env["noisy_rows"] == 2


def test_busy_keeps_its_process_spinning_while_the_cases_are_timed(
    tiny, monkeypatch, capsys, tmp_path
):
    spinners, alive, budgets = [], [], []
    real = runner.busy_core

    @contextlib.contextmanager
    def watched():
        with real() as spin:
            spinners.append(spin)
            yield spin

    fake = fake_interleaved(STEADY)

    def sampler(contenders, min_seconds=0.0, rel_sem=0.0, max_seconds=0.0):
        alive.append(spinners[0].poll() is None)
        budgets.append((min_seconds, rel_sem, max_seconds))
        return fake(contenders)

    monkeypatch.setattr(runner, "busy_core", watched)
    monkeypatch.setattr(runner, "interleaved_samples", sampler)
    path = tmp_path / "busy.json"
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--busy", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["env"]["row_statistic"] == "mean"
    assert alive == [True] and spinners[0].poll() is not None  # spun while timed, then ended
    # rounds extended for a mean over many calls, and further while it is imprecise
    assert budgets == [(runner.BUSY_MIN_SECONDS, runner.BUSY_REL_SEM, runner.BUSY_MAX_SECONDS)]
    out = capsys.readouterr().out
    assert "one core kept busy by another process" in out
    assert "ms is the mean of its calls" in out
    # STEADY's mean, where a quiet run reports its median
    row = next(line for line in out.splitlines() if line.startswith("tiny  "))
    assert f"{1e3 * statistics.fmean(STEADY):.3f}" in row


def test_plot_writes_a_png(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speed.png"
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {path}" in capsys.readouterr().out


def test_plot_without_a_baseline_says_so(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(genext.bench.table, "speedups", lambda rows: {})
    path = tmp_path / "speed.png"
    assert main(["bench", "--device", "cpu", "--op", "tiny", "--plot", str(path)]) == 0
    assert "no plot written: genext bench --plot: no genext row" in capsys.readouterr().err
    assert not path.exists()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import fails
    assert _exit_code(["bench", "--device", "cpu", "--op", "vq", "--plot", "x.png"]) == 2
    assert "genext[plot]" in capsys.readouterr().err


def test_sampler_without_diffusers_says_what_was_skipped(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    fake_timings(monkeypatch, STEADY)
    path = tmp_path / "out.json"
    argv = ["bench", "--device", "cpu", "--op", "sampler", "--quick", "--no-compile"]
    assert main([*argv, "--json", str(path)]) == 0  # nothing compared is not a failure
    out, err = capsys.readouterr()
    assert "sampler: not compared on 1 case: comparison against diffusers skipped" in out
    assert "diffusers is not importable" in out and "pip install diffusers" in out
    assert "not compared" in err  # the progress line too
    rows = json.loads(path.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"genext", "kernel", "eager"}  # no diffusers row
    assert all(r["ok"] is None for r in rows)


def test_info_prints_a_summary_and_json(capsys):
    info = genext.build_info()
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"genext {genext.__version__}")
    assert f"torch {torch.__version__}" in lines[1]
    assert lines[2].startswith("CUDA kernels: " + ("on" if info["cuda"] else "off"))
    gn = next(line for line in lines if line.split()[:1] == ["group_norm_silu"])
    assert "cpu: float32" in gn
    assert all(any(line.split()[:1] == [op] for line in lines) for op in info["ops"])
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=_no_constants) == info


def test_load_from_the_runs_own_threads_is_not_other_work():
    # two cores, the run's two threads running at the end: load 2.5 is half a core of other work
    assert runner._busy_text(2.5, 2, "at the end", own=2) is None
    assert "load average 4.5" in runner._busy_text(4.5, 2, "at the end", own=2)
    assert runner._busy_text(2.5, 2, "at the start") is not None
