"""genext: hand-written C++/CUDA kernels for generative models, as PyTorch ops.

Importing genext registers its ops under ``torch.ops.genext`` and makes every public subpackage
reachable as an attribute. The layers, imports pointing down only:

- :mod:`genext.ops`: one module per op (typed function, devices and dtypes, fake kernel, autograd);
- :mod:`genext.nn` (drop-in modules, ``KVCache``, functional forms), :mod:`genext.losses`
  (contrastive losses) and :mod:`genext.samplers` (diffusion schedulers) on top of the ops;
- :mod:`genext.models`: whole models on top of those;
- :mod:`genext.integrations`: :func:`patch` / :func:`unpatch` / :func:`patch_report`, genext's
  kernels inside the diffusers models and pipelines users already have;
- :mod:`genext.reference` (plain-PyTorch references) and :mod:`genext.bench` (the benchmarks of
  ``genext bench``): leaves that library code never imports.

``samplers``, ``reference``, ``bench`` and ``train`` are loaded on first access: the schedulers
need numpy, which ``import genext`` itself does not, and :mod:`genext.train` (the ``genext train``
command, the top layer: nothing in the library imports it) needs the optional extra
``genext[train]``.

Ops without a kernel for a device raise a clear error per call; importing never fails because a
GPU is missing.
"""

from __future__ import annotations

import torch

try:
    from . import _build_config
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "genext is not built: install it with `pip install --no-build-isolation .` (see README.md)"
    ) from e


def _check_torch() -> None:
    built = _build_config.torch_version.split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"genext was built against torch {_build_config.torch_version} but torch "
            f"{torch.__version__} is running; the compiled ops are tied to torch's major.minor "
            "version. Rebuild genext with this torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )


_check_torch()

from . import (  # noqa: E402
    _C,  # noqa: E402, F401  (registers torch.ops.genext.*)
    integrations,
    losses,
    models,
    nn,
    ops,
)
from ._info import build_info  # noqa: E402
from .integrations import patch, patch_report, unpatch  # noqa: E402
from .nn import KVCache  # noqa: E402
from .nn.functional import sdpa  # noqa: E402

__version__ = _build_config.version
# imported on first access: the leaves (never imported by library code) and the schedulers (numpy)
_LAZY = ("bench", "reference", "samplers", "train")
__all__ = [
    "KVCache",
    "__version__",
    "bench",
    "build_info",
    "integrations",
    "losses",
    "models",
    "nn",
    "ops",
    "patch",
    "patch_report",
    "reference",
    "samplers",
    "sdpa",
    "train",
    "unpatch",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
