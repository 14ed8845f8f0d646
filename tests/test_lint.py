"""Lint and format: ruff over the Python tree and clang-format over csrc/ and the CUDA emulation's
C++ (tests/cuda_emu), both pinned in the test extras. A lint error or a file that is not formatted
fails the test suite, so it fails CI.

Fix with `ruff check --fix . && ruff format .` and `clang-format -i $(git ls-files 'csrc/*.h'
'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cuda_emu/*.h' 'tests/cuda_emu/*.cpp'
'tests/cuda_emu/*.cu')`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPP_SUFFIXES = {".h", ".cpp", ".cu", ".cuh"}


def _tool(name: str) -> str:
    """The tool installed beside this Python (the test extras), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it pins the version)")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    proc = _run(_tool("ruff"), "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = _run(_tool("ruff"), "format", "--no-cache", "--check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_clang_format():
    files = sorted(
        str(p.relative_to(ROOT))
        for tree in ("csrc", "tests/cuda_emu")
        for p in (ROOT / tree).rglob("*")
        if p.suffix in CPP_SUFFIXES
    )
    assert files, "no C++ sources found under csrc/"
    proc = _run(_tool("clang-format"), "--dry-run", "--Werror", *files)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
