"""The fuzz suite: every op family's property-based cases (tests/fuzz/fuzz_*.py), each family in a
subprocess, so that a crash (a signal, an abort) fails one test and names the case that caused it
instead of ending the test run.

Profiles: by default each property draws a fixed set of examples (derandomised, the same every
run: CI stays deterministic), 25 in the full test profile (GENEXT_TESTS=full) and 5 in the quick
one. GENEXT_FUZZ_EXAMPLES above 25 draws fresh random examples on every run, e.g. the long
profile::

    GENEXT_FUZZ_EXAMPLES=2000 pytest tests/fuzz -x

On a GPU (every case's tensors on CUDA; the valid cases only where a C++ ValueError would kill
the process)::

    GENEXT_FUZZ_DEVICE=cuda GENEXT_FUZZ_VALID_ONLY=1 pytest tests/fuzz

One family alone, in this process (hypothesis' own report, no crash protection)::

    pytest tests/fuzz/fuzz_vq.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_CUDA

HERE = Path(__file__).parent
FAMILIES = sorted(
    p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py") if p.stem != "fuzz_harness"
)
# seconds per family at the default profile on a 2-core machine, with room for a busy one
TIMEOUT = int(os.environ.get("GENEXT_FUZZ_TIMEOUT", "900"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, tmp_path):
    if os.environ.get("GENEXT_FUZZ_DEVICE", "cpu") != "cpu" and not HAS_CUDA:
        pytest.skip("GENEXT_FUZZ_DEVICE asks for a GPU")
    last = tmp_path / "last_case.txt"
    env = dict(os.environ, GENEXT_FUZZ_LAST=str(last), PYTHONFAULTHANDLER="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        str(HERE / f"fuzz_{family}.py"),
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        case = last.read_text() if last.exists() else "?"
        pytest.fail(f"fuzz_{family} ran past {TIMEOUT} s (at: {case})\n{(e.stdout or '')[-4000:]}")
    tail = (proc.stdout + proc.stderr)[-12000:]
    if proc.returncode < 0:
        case = last.read_text() if last.exists() else "?"
        sig = signal.Signals(-proc.returncode).name
        pytest.fail(f"fuzz_{family} crashed with {sig} on: {case}\n{tail}")
    if proc.returncode != 0:
        pytest.fail(f"fuzz_{family} found a failing case:\n{tail}")
