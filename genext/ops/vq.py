"""VQ ops: nearest codebook entry without an N x K distance matrix, and the per-code sums of an
EMA codebook update."""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from ._common import acc_dtype, check_same_device, check_type, check_value, declare_kernels

__all__ = ["vq_nearest", "vq_ema_update"]

declare_kernels(
    ["vq_nearest", "vq_ema_update"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)

_METRICS = ("l2", "cosine")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# The codes are int64 indices, but a (num_codes, D) table beyond this is no codebook: the bound
# turns an absurd num_codes into a clear error instead of an allocator message.
_MAX_CODES = 2**31 - 1


def _allow_double(t: Tensor) -> bool:
    """float64 has a kernel on the CPU only; meta tensors (shape inference) accept it too."""
    return t.device.type != "cuda"


def check_nearest(op: str, z: Tensor, codebook: Tensor) -> None:
    """The argument checks of ``genext::vq_nearest`` (csrc/vq/vq_checks.h, check_nearest), with
    the same exception types and messages; the fake kernel calls it, so a meta tensor beside a
    real one raises as the C++ binding would. z (N, D), codebook (K, D)."""
    dt = z.dtype
    allowed = _FLOATS + ((torch.float64,) if _allow_double(z) else ())
    check_type(
        dt in allowed,
        lambda: (
            f"{op}: z must be float16, bfloat16, float32"
            f"{' or float64' if _allow_double(z) else ''} on {z.device.type}, got {dt}"
        ),
    )
    check_type(
        codebook.dtype == dt,
        lambda: f"{op}: codebook must have z's dtype {dt}, got {codebook.dtype}",
    )
    check_same_device(op, "z", {"z": z, "codebook": codebook})
    check_value(
        z.dim() == 2 and codebook.dim() == 2,
        lambda: (
            f"{op}: z must be (N, D) and codebook (K, D), got {tuple(z.shape)} and "
            f"{tuple(codebook.shape)}"
        ),
    )
    check_value(
        z.shape[1] == codebook.shape[1],
        lambda: f"{op}: z and codebook must share D, got {z.shape[1]} and {codebook.shape[1]}",
    )
    check_value(z.shape[1] > 0, lambda: f"{op}: D must be positive, got D = 0")
    check_value(codebook.shape[0] > 0, lambda: f"{op}: the codebook is empty (K = 0)")


def check_ema(op: str, indices: Tensor, z: Tensor, num_codes: int) -> None:
    """The argument checks of ``genext::vq_ema_update`` (csrc/vq/vq_checks.h, check_ema), with the
    same exception types and messages: indices (N,) int64/int32, z (N, D), 0 < num_codes."""
    check_type(
        indices.dtype in (torch.int64, torch.int32),
        lambda: f"{op}: indices must be int64 or int32, got {indices.dtype}",
    )
    allowed = _FLOATS + ((torch.float64,) if _allow_double(z) else ())
    check_type(z.dtype in allowed, lambda: f"{op}: z must be a float tensor, got {z.dtype}")
    check_same_device(op, "z", {"z": z, "indices": indices})
    check_value(
        z.dim() == 2 and indices.dim() == 1 and indices.shape[0] == z.shape[0],
        lambda: (
            f"{op}: indices must be (N,) and z (N, D), got {tuple(indices.shape)} and "
            f"{tuple(z.shape)}"
        ),
    )
    check_value(z.shape[1] > 0, lambda: f"{op}: D must be positive, got D = 0")
    check_value(num_codes > 0, lambda: f"{op}: num_codes must be positive, got {num_codes}")
    check_value(
        num_codes <= _MAX_CODES,
        lambda: f"{op}: num_codes must be at most 2**31 - 1, got {num_codes}",
    )


def _lead_rows(op: str, z: Tensor) -> tuple[torch.Size, int, int]:
    """(z.shape[:-1], N, D) for z (..., D), with D > 0 checked first (reshape(-1, 0) of an
    empty tensor is ambiguous)."""
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have a last dimension D, got a 0-dim tensor")
    d = z.shape[-1]
    if d == 0:
        raise ValueError(f"{op}: D must be positive, got z of shape {tuple(z.shape)}")
    lead = z.shape[:-1]
    return lead, math.prod(lead), d


def vq_nearest(z: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Index of the nearest row of `codebook` (K, D) for every vector of z (..., D), D > 0, K > 0.

    metric "l2": the smallest Euclidean distance, computed as a sum of squared differences in
    fp32 (fp64 for fp64 inputs; fp16/bf16 are widened); "cosine": the largest cosine similarity
    (z and the codebook normalised, zero vectors stay zero), distance 1 - similarity. Ties go to the
    smallest index, as torch.argmin. Returns (indices int64 of shape z.shape[:-1], distances of
    that shape, float32 or float64): for "l2" the Euclidean distance itself, the square root of
    the sum of squared differences (not the squared distance ``torch.cdist(...) ** 2``); for
    "cosine" 1 - cosine similarity, in [0, 2]. No N x K matrix is formed: extra memory is O(N + K*D).
    Not differentiable (the layer uses a straight-through estimator around it).

    Non-finite values: a score (squared distance or similarity) that is NaN never wins, so a
    codebook row containing NaN is never picked (it cannot be the nearest of anything) and an
    infinite score is picked only when no finite one exists (ties to the smallest index). A row
    of z whose every score is NaN (a NaN in the row, an inf in it under "cosine", or an
    all-NaN codebook) gets index 0 and distance NaN: the index torch.argmin gives for the float64
    reference of such a row, and a distance that propagates. The same rule on CPU and CUDA.
    Scores are computed in fp32 for 16-bit and fp32 inputs: squared distances beyond fp32's
    range (|z - e| above about 1.8e19) overflow to inf.
    """
    if metric not in _METRICS:
        raise ValueError(f"vq_nearest: metric must be 'l2' or 'cosine', got {metric!r}")
    lead, n, d = _lead_rows("vq_nearest", z)
    idx, dist = torch.ops.genext.vq_nearest.default(z.reshape(n, d), codebook, metric == "cosine")
    return idx.view(lead), dist.view(lead)


def vq_ema_update(
    indices: Tensor, z: Tensor, num_codes: int, deterministic: bool = False
) -> tuple[Tensor, Tensor]:
    """(counts (K,), sums (K, D)): how many vectors of z (..., D) each code received and their sum,
    in float32 (float64 for fp64 z), for EMA codebook learning. indices: z.shape[:-1], int64 or
    int32, each in [0, num_codes) (the CPU raises ValueError for one outside; CUDA skips such rows
    rather than synchronise to check). deterministic: bit-identical sums run to run (on CUDA a
    sort-based reduction instead of atomics; the CPU is always deterministic). Rows of z are
    summed as they are: a NaN or inf in a row reaches its code's sum (genext.nn.VectorQuantizer
    leaves such rows out of its statistics)."""
    try:
        num_codes = operator.index(num_codes)
    except TypeError:
        raise TypeError(
            f"vq_ema_update: num_codes must be an int, got {type(num_codes).__name__}"
        ) from None
    lead, n, d = _lead_rows("vq_ema_update", z)
    if indices.shape != lead:
        raise ValueError(
            f"vq_ema_update: indices must have z's leading shape {tuple(lead)}, got "
            f"{tuple(indices.shape)}"
        )
    # before the op: a huge num_codes would reach the allocator before the kernel's check
    if num_codes <= 0:
        raise ValueError(f"vq_ema_update: num_codes must be positive, got {num_codes}")
    if num_codes > _MAX_CODES:
        raise ValueError(f"vq_ema_update: num_codes must be at most 2**31 - 1, got {num_codes}")
    return torch.ops.genext.vq_ema_update.default(
        indices.reshape(n), z.reshape(n, d), num_codes, bool(deterministic)
    )


@torch.library.register_fake("genext::vq_nearest")
def _fake_nearest(z, codebook, cosine):
    check_nearest("vq_nearest", z, codebook)
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=acc_dtype(z))


@torch.library.register_fake("genext::vq_ema_update")
def _fake_ema(indices, z, num_codes, deterministic):
    check_ema("vq_ema_update", indices, z, num_codes)
    return (
        z.new_empty((num_codes,), dtype=acc_dtype(z)),
        z.new_empty((num_codes, z.shape[1]), dtype=acc_dtype(z)),
    )
