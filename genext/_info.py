"""build_info(): what this genext build holds, for bug reports and `python -m genext info`;
summary(): the same, short, for a person."""

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


def version_text(info: dict[str, Any] | None = None) -> str:
    """`genext --version`: "genext 0.1.0", with the build's commit when it has one."""
    info = info or build_info()
    return f"genext {info['version']}" + (f" (commit {info['commit']})" if info["commit"] else "")


def summary(info: dict[str, Any] | None = None) -> str:
    """A few lines for a person: version, torch, CUDA on/off and architectures, the CPU ISA when
    known, then one line per op with its devices and dtypes."""
    info = info or build_info()
    if info["cuda"]:
        cuda = f"CUDA kernels: on, architectures {' '.join(info['cuda_archs']) or '?'}"
        if info["cuda_compiler"]:
            cuda += f" (nvcc {info['cuda_compiler']})"
        cuda += f"; GPU: {info['gpu']}" if info["gpu"] else "; no GPU visible"
    else:
        cuda = "CUDA kernels: off (a CPU-only build)"
    lines = [
        version_text(info),
        f"torch {info['torch_running']} (genext built against {info['torch_built']})",
        cuda,
    ]
    if info.get("cpu_isa"):
        lines.append(f"CPU kernels: {info['cpu_isa']} selected at load")
    width = max(map(len, info["ops"]), default=0)
    lines.append("ops (device: dtypes):")
    for op, devices in info["ops"].items():
        served = "; ".join(f"{dev}: {', '.join(dts)}" for dev, dts in devices.items())
        lines.append(f"  {op:<{width}}  {served or 'no kernel'}")
    lines.append("(`genext info --json` prints the full record)")
    return "\n".join(lines)
