"""What the op modules share: the table of devices and dtypes each op serves (declared by each op's
module, next to the op), the lookup of what this build really serves, and small helpers of the
fake kernels and wrappers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import _C

__all__ = [
    "KERNELS",
    "acc_dtype",
    "below_autograd",
    "check",
    "check_heads",
    "check_same_device",
    "check_type",
    "check_value",
    "declare_kernels",
    "forbid_double_backward",
    "has_kernel",
    "served_dtypes",
    "softmax_scale",
]

# op name -> device type ("cpu", "cuda") -> dtypes with a kernel; filled by declare_kernels.
KERNELS: dict[str, dict[str, tuple[torch.dtype, ...]]] = {}


def declare_kernels(ops: Iterable[str], **devices: Iterable[torch.dtype]) -> None:
    """Record that each op in ``ops`` has kernels for these devices and dtypes, e.g.
    ``declare_kernels(["vq_nearest"], cpu=(torch.float32,), cuda=(torch.float32,))``."""
    for op in ops:
        KERNELS[op] = {dev: tuple(dtypes) for dev, dtypes in devices.items()}


def has_kernel(op: str, device: str) -> bool:
    """Whether this build serves ``genext::op`` on the device type ``device``. "Computed": a kernel
    registered once for every device (CompositeExplicitAutograd, the contrastive ops) counts too;
    those serve CUDA tensors only in a build with CUDA kernels, hence the check of ``_C.cuda``."""
    if device == "cuda" and not _C.cuda:
        return False
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"genext::{op}", device.upper())


def served_dtypes(op: str) -> dict[str, tuple[torch.dtype, ...]]:
    """Device type -> dtypes of ``op`` with a kernel in this build (the declaration, restricted to
    the devices the dispatcher has a kernel for)."""
    return {dev: dtypes for dev, dtypes in KERNELS[op].items() if has_kernel(op, dev)}


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate and return statistics in: float64 for float64 inputs,
    float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softmax_scale(q: Tensor, scale: float | None, op: str = "attention") -> float:
    """The attention softmax scale: ``scale``, or ``1 / sqrt(D)`` for q's head dim D.

    Errors name ``op``: a ValueError for D = 0 (no default scale; the kernels reject D = 0 too)
    and for a number out of float range, a TypeError for what float() does not take. NaN
    and infinite scales are accepted; an infinite one is passed on as NaN, so that both give NaN
    in every row that sees a key.
    """
    if scale is None:
        d = q.shape[-1]
        if d == 0:
            raise ValueError(
                f"{op}: head dim must be positive (the default scale is 1 / sqrt(D)), "
                f"got q of shape {tuple(q.shape)}"
            )
        return 1.0 / math.sqrt(d)
    try:
        scale = float(scale)
    except OverflowError:
        raise ValueError(f"{op}: scale {scale} is out of the range of a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"{op}: scale must be a float or None, got {scale!r}") from None
    # an infinite scale makes every score +-inf or NaN (0 * inf) by chance; NaN makes the rule
    # simple: every row that sees a key is NaN
    return scale if not math.isinf(scale) else math.nan


# torch._check, torch._check_type and torch._check_value import torch's symbolic-shapes module
# (and sympy with it) on their first call, 0.4-0.7 s that the first call of a genext op paid. A
# condition that is True returns here; anything else (False, whose error torch builds, a SymBool
# while torch.compile traces, or a wrong type, which torch rejects) goes to torch's check.


def check(cond, message=None) -> None:
    """torch._check (RuntimeError), returning at once when ``cond`` is True."""
    if cond is not True:
        torch._check(cond, message)


def check_type(cond, message=None) -> None:
    """torch._check_type (TypeError), returning at once when ``cond`` is True."""
    if cond is not True:
        torch._check_type(cond, message)


def check_value(cond, message=None) -> None:
    """torch._check_value (ValueError), returning at once when ``cond`` is True."""
    if cond is not True:
        torch._check_value(cond, message)


def check_heads(op: str, hq, hk, d, on_cuda: bool) -> None:
    """The attention kernels' head checks, as the C++ bindings make them (ValueError): Hk > 0
    dividing Hq, D > 0, and on CUDA D a multiple of 8 up to the largest compiled head dim."""
    check_value(
        hk > 0 and hq % hk == 0,
        lambda: (
            f"{op}: the number of query heads ({hq}) must be a multiple of the number of "
            f"key/value heads ({hk})"
        ),
    )
    check_value(d > 0, lambda: f"{op}: head dim must be positive")
    if on_cuda:
        limit = _C.cuda_max_head_dim
        check_value(
            d % 8 == 0 and d <= limit,
            lambda: (
                f"{op}: on cuda the head dim must be a multiple of 8 and at most {limit}, got {d}"
            ),
        )


def same_shape(a: Iterable, b: Iterable) -> bool:
    """Whether two shapes are equal; symbolic sizes (under torch.compile) are compared with
    ``sym_eq``, which tests without guarding. Its module (and sympy with it) is imported only
    then: plain integer shapes need neither, and importing them costs ``import genext`` seconds."""
    a, b = tuple(a), tuple(b)
    if all(type(s) is int for s in a + b):
        return a == b
    from torch.fx.experimental.symbolic_shapes import sym_eq

    return sym_eq(a, b)


def check_same_device(op: str, anchor: str, tensors: dict[str, Tensor | None]) -> None:
    """Raise RuntimeError unless every tensor in ``tensors`` (None entries skipped) is on the device
    of ``tensors[anchor]``, as the C++ bindings do.

    The fake kernels must call it: a ``meta`` tensor beside real ones sends the dispatcher to the
    fake kernel, which would otherwise return an uninitialised result instead of raising. The
    message names the op, the argument and both devices.
    """
    want = tensors[anchor].device
    for name, t in tensors.items():
        if t is not None and t.device != want:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {anchor} is on {want}")


def forbid_double_backward(backward_op: str, public_name: str) -> None:
    """Make differentiating through ``genext::<backward_op>`` (a gradient of a gradient) a clear
    NotImplementedError naming ``public_name``, instead of a silent zero or an opaque error."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{public_name}: double backward (gradients of gradients) is not implemented"
        )

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"genext::{backward_op}", backward, setup_context=setup_context)


# PyTorch's autograd layer for custom ops (torch.library.register_autograd, which tracing and
# torch.compile need) runs in Python on every call: on one CPU core about 20 us for a forward
# without gradients and about 100 us more per forward+backward than a torch.autograd.Function that
# calls the kernels below the autograd key. At small shapes that is most of an op's time, so the op
# modules take the shorter way for eager calls and keep the registered op for traced ones.


def below_autograd() -> contextlib.AbstractContextManager:
    """A context that dispatches genext's ops straight to their kernels when no gradient can flow
    through them (grad mode off, not tracing); otherwise a no-op."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()
