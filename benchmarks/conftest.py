"""Options of the pytest-benchmark suite, as `genext bench` names them."""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("genext", "genext benchmarks")
    group.addoption(
        "--quick",
        action="store_true",
        help="genext bench's short case lists and repeats (a smoke run)",
    )
    group.addoption("--no-compile", action="store_true", help="skip the torch.compile baselines")
