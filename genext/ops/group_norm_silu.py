"""Fused GroupNorm + SiLU: ``silu(group_norm(x, num_groups, weight, bias, eps))`` in one pass."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ._common import (
    acc_dtype,
    below_autograd,
    check_same_device,
    check_type,
    check_value,
    declare_kernels,
    forbid_double_backward,
    same_shape,
)

__all__ = ["group_norm_silu"]

declare_kernels(
    ["group_norm_silu", "group_norm_silu_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)

_ACTIVATIONS = {"silu": True, None: False}
_OP = torch.ops.genext.group_norm_silu.default  # the overload: a call skips overload resolution


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
        eps: added to the variance; non-negative (ValueError otherwise, NaN included).
        activation: ``"silu"`` (``z * sigmoid(z)``) or ``None`` for plain GroupNorm.

    Returns:
        y with x's shape, dtype and memory format. A NaN or infinite value in x makes its whole
        group NaN (its mean or variance is NaN), as in the float64 reference; other groups are
        unaffected. Differentiable in x, weight and bias (the backward is the
        ``genext::group_norm_silu_backward`` op).

    Fast paths: CUDA fp16/bf16/fp32 (one read and one write of x per pass, groups split over the
    whole GPU when N * G is small); CPU float32 and bfloat16 (vectorised, parallel over groups
    when the work is worth a second thread).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be 'silu' or None, got {activation!r}")
    if not isinstance(num_groups, torch.SymInt):
        if isinstance(num_groups, bool) or not hasattr(type(num_groups), "__index__"):
            raise TypeError(
                f"group_norm_silu: num_groups must be an int, got {type(num_groups).__name__}"
            )
        num_groups = operator.index(num_groups)  # numpy integers too
    y, _, _ = _forward(x, num_groups, weight, bias, float(eps), _ACTIVATIONS[activation])
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


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(op: str, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    """``check_input`` of csrc/group_norm_silu/group_norm_silu_checks.h, in its order, with its
    exception types and messages; float64 is served everywhere but on CUDA, as the bindings do."""
    allow_double = x.device.type != "cuda"
    dtypes = _FLOATS + ((torch.float64,) if allow_double else ())
    names = (
        "float32, float64, float16 or bfloat16" if allow_double else "float32, float16 or bfloat16"
    )
    check_type(
        x.dtype in dtypes,
        lambda: f"{op}: x must be {names} on {x.device.type}, got {x.dtype}",
    )
    check_value(
        3 <= x.dim() <= 5,
        lambda: (
            f"{op}: x must have shape (N, C, *) with 1 to 3 spatial dims (rank 3 to 5), got "
            f"rank {x.dim()} {tuple(x.shape)}"
        ),
    )
    check_value(num_groups > 0, lambda: f"{op}: num_groups must be positive, got {num_groups}")
    c = x.shape[1]
    check_value(
        c % num_groups == 0,
        lambda: f"{op}: channels ({c}) must be divisible by num_groups ({num_groups})",
    )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_value(
            t.dim() == 1 and t.shape[0] == c,
            lambda name=name, t=t: (
                f"{op}: {name} must have shape (C,) = ({c},), got {tuple(t.shape)}"
            ),
        )
        check_same_device(op, "x", {"x": x, name: t})
        check_type(
            t.dtype == x.dtype or t.dtype == torch.float32,
            lambda name=name, t=t: (
                f"{op}: {name} must be float32 or x's dtype ({x.dtype}), got {t.dtype}"
            ),
        )
    check_value(
        (weight is None) == (bias is None),
        lambda: f"{op}: weight and bias must be given together (affine) or both be None",
    )


def _check_eps(op: str, eps: float) -> None:
    """``check_eps`` of group_norm_silu_checks.h."""
    check_value(eps >= 0, lambda: f"{op}: eps must be non-negative, got {eps}")


def _check_backward(
    op: str,
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
) -> None:
    """The backward bindings' checks: ``check_input``, ``check_like_x`` for grad_y,
    ``check_stats``, and on CUDA float32 statistics."""
    _check(op, x, num_groups, weight, bias)
    check_value(
        same_shape(grad_y.shape, x.shape),
        lambda: f"{op}: grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}",
    )
    check_type(
        grad_y.dtype == x.dtype,
        lambda: f"{op}: grad_y must have x's dtype {x.dtype}, got {grad_y.dtype}",
    )
    check_same_device(op, "x", {"x": x, "grad_y": grad_y})
    groups = x.shape[0] * num_groups
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_value(
            t.numel() == groups,
            lambda name=name, t=t: (
                f"{op}: {name} must hold N*num_groups = {groups} values, got shape {tuple(t.shape)}"
            ),
        )
        check_same_device(op, "x", {"x": x, name: t})
    if x.device.type == "cuda":
        check_type(
            mean.dtype == torch.float32 and rstd.dtype == torch.float32,
            lambda: (
                f"{op}: mean and rstd must be float32 (as group_norm_silu returns them for "
                f"this x), got {mean.dtype} and {rstd.dtype}"
            ),
        )


@torch.library.register_fake("genext::group_norm_silu")
def _fake(x, num_groups, weight, bias, eps, silu):
    _check("group_norm_silu", x, num_groups, weight, bias)
    _check_eps("group_norm_silu", eps)
    n = x.shape[0]
    y = _kernel_layout_empty(x)
    stats = x.new_empty((n, num_groups), dtype=acc_dtype(x))
    return y, stats, torch.empty_like(stats)


@torch.library.register_fake("genext::group_norm_silu_backward")
def _fake_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu):
    _check_backward("group_norm_silu_backward", grad_y, x, mean, rstd, weight, bias, num_groups)
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
    with below_autograd():  # create_graph: through the op, whose backward raises
        dx, dw, db = torch.ops.genext.group_norm_silu_backward.default(
            grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu
        )
    if weight is None:
        dw = db = None
    return dx, None, dw, db, None, None


torch.library.register_autograd("genext::group_norm_silu", _backward, setup_context=_setup_context)


# ---- eager calls: an autograd.Function below the registered op's autograd (see _common) ----------


class _EagerGroupNormSiLU(torch.autograd.Function):
    """genext::group_norm_silu with the registered op's backward (_backward), for eager calls that
    need gradients."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = _OP(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no zero tensors for mean and rstd's gradients
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        return _backward(ctx, grad_y, grad_mean, grad_rstd)


def _forward(x, num_groups, weight, bias, eps, silu) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) = genext::group_norm_silu(...), differentiable in x, weight and bias."""
    if torch.compiler.is_compiling():
        return _OP(x, num_groups, weight, bias, eps, silu)
    if not torch.is_grad_enabled():
        with torch._C._AutoDispatchBelowAutograd():  # no graph to record: straight to the kernel
            return _OP(x, num_groups, weight, bias, eps, silu)
    if (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return _EagerGroupNormSiLU.apply(x, num_groups, weight, bias, eps, silu)
    return _OP(x, num_groups, weight, bias, eps, silu)


def group_norm_silu_unchecked(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, silu: bool
) -> Tensor:
    """:func:`group_norm_silu`'s y for callers whose arguments are already of the right Python
    types (an int ``num_groups``, a float ``eps``, a bool for the SiLU), such as a patched
    ``nn.GroupNorm``: no Python-side checks of them (the op checks tensors and values)."""
    return _forward(x, num_groups, weight, bias, eps, silu)[0]


forbid_double_backward("group_norm_silu_backward", "genext.ops.group_norm_silu")
