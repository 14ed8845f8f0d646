"""genext: hand-written C++/CUDA kernels for generative models, as PyTorch ops.

Importing genext registers its ops under ``torch.ops.genext``; the typed public functions live in
:mod:`genext.ops`, drop-in modules in :mod:`genext.nn`. Ops without a kernel for a device raise a
clear error per call; importing never fails because a GPU is missing.
"""
from __future__ import annotations

import torch

try:
    from . import _build_config
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "genext is not built: install it with `pip install --no-build-isolation .` "
        "(see README.md)"
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

from . import _C  # noqa: E402  (registers torch.ops.genext.*)
from . import ops  # noqa: E402
from . import nn  # noqa: E402
from . import losses  # noqa: E402
from . import reference  # noqa: E402
from .kvcache import KVCache  # noqa: E402
from ._info import build_info  # noqa: E402

__version__ = _build_config.version
__all__ = ["ops", "nn", "reference", "KVCache", "build_info", "__version__"]
