"""Builds genext's CUDA kernel sources for the host under the CPU emulation (emu/cuda_emu.h) into a
test-only Python extension, one per op: the .cu files, rewritten (kernel launches and dynamic
shared memory, see :func:`rewrite`), are compiled as C++ together with the op's shim
(shims/<op>.cpp), which runs the CUDA launcher on CPU tensors. Everything genext:: is renamed
genext_emu:: in them, so nothing can resolve to genext's own extension in the same process.

An emulation: a kernel that passes under it has still not run on a GPU."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"

# The .cu sources of each op's CUDA launcher (relative to csrc/; the emulation's own check kernels
# relative to this folder).
SOURCES = {
    "sampler_step": [CSRC / "sampler_step/sampler_step.cu"],
    "vq": [CSRC / "vq/vq.cu", CSRC / "vq/vq_tc.cu"],
    "kvcache_attention": [CSRC / "kvcache_attention/kvcache_attention.cu"],
    "group_norm_silu": [
        CSRC / "group_norm_silu/group_norm_silu_fwd.cu",
        CSRC / "group_norm_silu/group_norm_silu_bwd.cu",
        CSRC / "group_norm_silu/group_norm_silu_plan.cu",
    ],
    "contrastive": [CSRC / "contrastive/lse_rows.cu"],
    "selftest": [HERE / "kernels/selftest.cu"],
}

# Flash attention's head-dim tiles built for the emulation (each tile's forward and backward in
# both 16-bit types): 64 (64-key forward tiles, two m-tiles per warp), 128 (32-key tiles, the
# 8-warp backward) and 160 (one m-tile per warp, dV and dK as separate launches of the 4-warp
# backward). The CMake build's genext_fa_tiles.h, written for these.
FA_TILES = (64, 128, 160)
SOURCES["flash_attention"] = [
    CSRC / "flash_attention/flash_dispatch.cu",
    CSRC / "flash_attention/flash_fp32.cu",
    *(
        CSRC / f"flash_attention/instances/{kind}_hdim{tile}_{dt}.cu"
        for tile in FA_TILES
        for kind in ("fwd", "bwd")
        for dt in ("fp16", "bf16")
    ),
]
# Headers holding kernels and launches, rewritten like the sources into the build's include folder
# (searched before csrc/, so the sources' includes of them find the rewritten copies).
HEADERS = {
    "flash_attention": [
        CSRC / "flash_attention/flash_fwd.cuh",
        CSRC / "flash_attention/flash_bwd.cuh",
    ]
}
GENERATED = {
    "flash_attention": {
        "genext_fa_tiles.h": "#pragma once\n#define GENEXT_FA_HEAD_DIM_TILES "
        + ", ".join(map(str, FA_TILES))
        + "\n"
    }
}

_KERNEL_BEFORE_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;(){}]*>)?)\s*$")
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)\s*\[\s*\]\s*;"
)


def rewrite(src: str) -> str:
    """CUDA syntax the host compiler does not take, as the emulation's calls:
    `kernel<<<grid, block, smem, stream>>>(args);` becomes
    `::emu::launch(grid, block, smem, stream, kernel, args);` and `extern __shared__ T name[];`
    a pointer to the launch's dynamic shared memory."""
    out: list[str] = []
    i = 0
    while (j := src.find("<<<", i)) >= 0:
        line_start = src.rfind("\n", 0, j) + 1
        m = _KERNEL_BEFORE_LAUNCH.search(src, line_start, j)
        if m is None:
            raise ValueError(f"no kernel name before <<< at: {src[line_start : j + 3]!r}")
        k = src.find(">>>", j)
        if k < 0 or src[k + 3] != "(":
            raise ValueError(f"unterminated launch at: {src[j : j + 60]!r}")
        depth, e = 0, k + 3
        while True:  # the argument list's closing parenthesis
            c = src[e]
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                break
            e += 1
        config, args = src[j + 3 : k], src[k + 4 : e]
        out.append(src[i : m.start()])
        out.append(f"::emu::launch({config}, {m.group(1)}{', ' + args if args.strip() else ''})")
        i = e + 1
    out.append(src[i:])
    return _EXTERN_SHARED.sub(
        r"\1* const \2 = reinterpret_cast<\1*>(::emu::dyn_smem());", "".join(out)
    )


def cuda_include() -> Path | None:
    """The CUDA toolkit's headers (the 16-bit types and the runtime's declarations), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


@functools.cache
def load(op: str):
    """The emulated extension of `op` (built on first use, cached for the process)."""
    from torch.utils import cpp_extension

    include = cuda_include()
    if include is None:
        raise FileNotFoundError("no CUDA toolkit headers (cuda_fp16.h) found")
    # one build folder per checkout (two clones must not rebuild each other's)
    tree = hashlib.sha1(str(REPO).encode()).hexdigest()[:10]
    build = Path(tempfile.gettempdir()) / f"genext_cuda_emu_{os.getuid()}_{tree}" / op
    src_dir = build / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    generated = build / "generated"
    generated.mkdir(exist_ok=True)
    files = dict(GENERATED.get(op, {}))
    for path in HEADERS.get(op, []):
        files[str(path.relative_to(CSRC))] = rewrite(path.read_text())
    for name, text in files.items():
        dst = generated / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.read_text() != text:
            dst.write_text(text)
    sources = [str(HERE / "shims" / f"{op}.cpp")]
    for path in SOURCES[op]:
        text = '#include "emu/cuda_emu.h"\n' + rewrite(path.read_text())
        dst = src_dir / (path.stem + "_emu.cpp")  # the stems are distinct
        if not dst.is_file() or dst.read_text() != text:  # keep the build's cache when unchanged
            dst.write_text(text)
        sources.append(str(dst))
    flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-Dgenext=genext_emu", "-w"]
    return cpp_extension.load(
        name=f"genext_emu_{op}",
        sources=sources,
        extra_cflags=flags,
        extra_include_paths=[str(generated), str(CSRC), str(HERE), str(include)],
        build_directory=str(build),
        verbose=False,
    )


def load_or_skip(op: str):
    """:func:`load`, or the calling test skipped where the CUDA headers are missing."""
    import pytest

    if cuda_include() is None:
        pytest.skip("needs the CUDA toolkit's headers (cuda_fp16.h) to compile the kernels")
    return load(op)
