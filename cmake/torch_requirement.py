"""scikit-build-core metadata provider: genext's run-time dependencies, with torch pinned to the
major.minor version the extension is compiled against (its C++ ABI changes between minor
versions), so that pip refuses a mismatched torch instead of genext failing at import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def torch_pin(version: str) -> str:
    """``torch>=X.Y,<X.(Y+1)`` for a torch version string such as ``2.14.1+cu130``; a pre-release
    or development torch pins its own minor's pre-releases too."""
    release = version.split("+")[0]
    parts = release.split(".")
    major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()))
    pre = any(tag in release for tag in ("a", "b", "rc", "dev"))
    low = f"{major}.{minor}.0.dev0" if pre else f"{major}.{minor}"
    return f"torch>={low},<{major}.{minor + 1}"


def dynamic_metadata(field: str, settings: Mapping[str, Any] | None = None) -> list[str]:
    if field != "dependencies":
        raise RuntimeError(f"torch_requirement provides 'dependencies' only, not {field!r}")
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "genext builds against the installed torch: install torch first and build with "
            "`pip install --no-build-isolation .`"
        ) from e
    return [torch_pin(torch.__version__), *(settings or {}).get("extra", [])]
