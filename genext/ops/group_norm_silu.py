"""Fused GroupNorm + SiLU: ``silu(group_norm(x, num_groups, weight, bias, eps))`` in one pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, declare_kernels, forbid_double_backward

__all__ = ["group_norm_silu"]

declare_kernels(
    ["group_norm_silu", "group_norm_silu_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)

_ACTIVATIONS = {"silu": True, None: False}


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> Tensor:
    """GroupNorm over ``(N, C, *)`` followed by SiLU (or nothing), fused.

    Args:
        x: ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float32, float16 or bfloat16
            (float64 too on the CPU). Contiguous or channels-last; other strides are copied once.
        num_groups: G, dividing C. Statistics are taken over each sample's C/G channels and all
            spatial positions, in float32 (float64 for float64 input), biased variance.
        weight, bias: ``(C,)`` affine parameters, both or neither; float32 or x's dtype.
        eps: added to the variance.
        activation: ``"silu"`` (``z * sigmoid(z)``) or ``None`` for plain GroupNorm.

    Returns:
        y with x's shape, dtype and memory format. Differentiable in x, weight and bias
        (the backward is the ``genext::group_norm_silu_backward`` op).

    Fast paths: CUDA fp16/bf16/fp32 (one read and one write of x per pass, groups split over the
    whole GPU when N * G is small); CPU float32 (vectorised, parallel over groups).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be 'silu' or None, got {activation!r}")
    y, _, _ = torch.ops.genext.group_norm_silu(
        x, num_groups, weight, bias, float(eps), _ACTIVATIONS[activation]
    )
    return y


def _kernel_layout_empty(x: Tensor) -> Tensor:
    """An empty tensor laid out as the kernels write outputs: like x when x is contiguous or
    channels-last (``(N, L, C)`` storage for rank 3), else contiguous (x is copied to that)."""
    if x.is_contiguous():
        return torch.empty_like(x)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty_like(x)
    if x.dim() == 3 and x.transpose(1, 2).is_contiguous():
        return torch.empty_like(x)
    return x.new_empty(x.shape)


@torch.library.register_fake("genext::group_norm_silu")
def _fake(x, num_groups, weight, bias, eps, silu):
    torch._check(
        x.dim() in (3, 4, 5), lambda: f"group_norm_silu: x must have rank 3 to 5, got {x.dim()}"
    )
    torch._check(
        num_groups > 0 and x.shape[1] % num_groups == 0,
        lambda: (
            f"group_norm_silu: channels ({x.shape[1]}) must be divisible by num_groups ({num_groups})"
        ),
    )
    n = x.shape[0]
    y = _kernel_layout_empty(x)
    stats = x.new_empty((n, num_groups), dtype=acc_dtype(x))
    return y, stats, torch.empty_like(stats)


@torch.library.register_fake("genext::group_norm_silu_backward")
def _fake_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu):
    dx = _kernel_layout_empty(x)
    if weight is None:
        none = x.new_empty((0,))
        return dx, none, none.clone()
    return dx, torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups = num_groups
    ctx.silu = silu


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None
    dx, dw, db = torch.ops.genext.group_norm_silu_backward(
        grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu
    )
    if weight is None:
        dw = db = None
    return dx, None, dw, db, None, None


torch.library.register_autograd("genext::group_norm_silu", _backward, setup_context=_setup_context)


forbid_double_backward("group_norm_silu_backward", "genext.ops.group_norm_silu")
