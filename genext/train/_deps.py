"""Imports of the optional training dependencies, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> the name pip knows it by
_PIP_NAMES = {
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "open_clip": "open_clip_torch",
}


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) or raise an ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pip = _PIP_NAMES.get(top, top)
        raise ImportError(
            f"genext.train needs {pip} (module {module!r}), which is not installed: "
            "install the training extra with `pip install 'genext[train]'`"
        ) from e
