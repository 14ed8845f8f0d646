"""build_info(): what this genext build holds, for bug reports and `python -m genext info`."""

from __future__ import annotations

from typing import Any

import torch

from . import _C, _build_config
from .ops import KERNELS, served_dtypes


def build_info() -> dict[str, Any]:
    """Version (and the commit, when the build recorded one), the torch genext was built against,
    CUDA on/off with architectures, the CPU vector ISA the kernels selected at load (when the
    extension reports it), and for each op the devices and dtypes that have kernels (checked
    against the dispatcher)."""
    ops = {
        op: {
            dev: [str(dt).replace("torch.", "") for dt in dtypes]
            for dev, dtypes in served_dtypes(op).items()
        }
        for op in KERNELS
    }
    return {
        "version": _build_config.version,
        "commit": getattr(_build_config, "commit", None) or None,
        "torch_built": _build_config.torch_version,
        "torch_running": torch.__version__,
        "cuda": bool(_C.cuda),
        "cuda_archs": _C.cuda_archs.split() if _C.cuda else [],
        "cuda_compiler": _build_config.cuda_compiler_version or None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_isa": getattr(_C, "cpu_isa", None) or None,
        # fp16/bf16 flash-attention kernels compiled in (head dims up to the largest are served)
        "flash_attention_head_dim_tiles": [
            int(d) for d in getattr(_build_config, "flash_attention_head_dim_tiles", "").split()
        ],
        "ops": ops,
    }
