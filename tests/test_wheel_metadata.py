"""What the installed distribution declares: torch pinned to the major.minor genext was compiled
against (so pip refuses a mismatched torch instead of genext failing at import), and the typing
marker."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from genext import _build_config

ROOT = Path(__file__).resolve().parents[1]


def _provider():
    spec = importlib.util.spec_from_file_location(
        "torch_requirement", ROOT / "cmake" / "torch_requirement.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "version,pin",
    [
        ("2.14.1+cu130", "torch>=2.14,<2.15"),
        ("2.14.0", "torch>=2.14,<2.15"),
        ("2.9.1+cpu", "torch>=2.9,<2.10"),
        ("2.15.0.dev20261001+cu130", "torch>=2.15.0.dev0,<2.16"),
        ("2.15.0rc1", "torch>=2.15.0.dev0,<2.16"),
    ],
)
def test_pin_of_a_torch_version(version, pin):
    assert _provider().torch_pin(version) == pin
    spec = Requirement(pin).specifier
    assert spec.contains(Version(version.split("+")[0]), prereleases=True)
    major, minor = (int(x) for x in version.split(".")[:2])
    assert not spec.contains(Version(f"{major}.{minor + 1}.0"), prereleases=True)
    assert not spec.contains(Version(f"{major}.{minor - 1}.9"), prereleases=True)


def test_provider_gives_dependencies_only():
    deps = _provider().dynamic_metadata("dependencies", {"extra": ["numpy"]})
    assert deps[0].startswith("torch>=") and deps[1:] == ["numpy"]
    with pytest.raises(RuntimeError, match="dependencies"):
        _provider().dynamic_metadata("version", {})


def test_installed_metadata_pins_the_torch_genext_was_built_against():
    requirements = [Requirement(r) for r in importlib.metadata.requires("genext") or []]
    torch_reqs = [r for r in requirements if r.name == "torch" and r.marker is None]
    assert len(torch_reqs) == 1, requirements
    spec = torch_reqs[0].specifier
    built = Version(_build_config.torch_version)
    running = Version(torch.__version__.split("+")[0])
    assert spec.contains(built, prereleases=True) and spec.contains(running, prereleases=True)
    assert not spec.contains(Version(f"{built.major}.{built.minor + 1}.0"), prereleases=True)
    assert any(r.name == "numpy" and r.marker is None for r in requirements)


def test_package_ships_the_typing_marker():
    assert importlib.resources.files("genext").joinpath("py.typed").is_file()
