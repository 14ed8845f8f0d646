"""Contrastive losses without the N x N logits: CLIP's symmetric InfoNCE and SigLIP's sigmoid
loss, from the tiled primitives `genext::tiled_lse` and `genext::tiled_softplus_sum` (only one
tile of scores exists at a time; memory is linear in N). Differentiable in the features,
logit_scale and logit_bias."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .. import _C
from ._common import acc_dtype, check_same_device, check_type, check_value, declare_kernels

__all__ = ["clip_loss", "siglip_loss"]

# the products run on the device's BLAS; everything after them is float32 (float64 for float64)
declare_kernels(
    ["tiled_lse", "tiled_lse_backward", "tiled_softplus_sum", "tiled_softplus_sum_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)
declare_kernels(
    ["softplus_sum_with_weights", "softplus_sum_with_weights_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
)

# The most scores (Ni x Nt) for which siglip_loss on the CPU keeps the backward's weights from
# its forward (4 bytes each in float32: 64 MiB), making the backward two matrix products instead
# of three; larger blocks recompute the scores tile by tile and stay linear in memory. At N2048
# D512 the score matrix is 16 MiB and recomputing it was a quarter of forward + backward.
SIGLIP_SAVED_WEIGHTS_MAX = 1 << 24


_PUBLIC_NAMES = ("image_features", "text_features")


def _scalar(t, like: Tensor) -> Tensor:
    """A Python number as a 0-dim tensor on ``like``'s device, in the accumulation dtype (so a
    float64 loss keeps a float64 scale)."""
    if isinstance(t, Tensor):
        return t
    return torch.tensor(float(t), dtype=acc_dtype(like), device=like.device)


_FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_args(
    op: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    names: tuple[str, str] = ("a", "b"),
) -> None:
    """The argument checks of the contrastive primitives (csrc/contrastive/contrastive_checks.h,
    prepare), with the same exception types and messages. The fake kernels call it with the op's
    name, so a meta tensor beside real ones raises as the C++ code would; clip_loss and
    siglip_loss call it first with their own name and the features' public names."""
    dt = a.dtype
    check_type(
        dt in _FEATURE_DTYPES,
        lambda: f"{op}: features must be float16, bfloat16, float32 or float64, got {dt}",
    )
    check_type(
        b.dtype == dt,
        lambda: f"{op}: the two feature tensors must share a dtype, got {dt} and {b.dtype}",
    )
    check_same_device(
        op, names[0], {names[0]: a, names[1]: b, "logit_scale": scale, "logit_bias": bias}
    )
    dev = a.device.type
    if not (dev in ("cpu", "meta") or (dev == "cuda" and _C.cuda)):
        raise NotImplementedError(
            f"{op}: no kernel for {dev} tensors in this genext build "
            f"({'CPU and CUDA' if _C.cuda else 'CPU only: built without CUDA'})"
        )
    check_value(
        a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
        lambda: (
            f"{op}: features must be (Na, D) and (Nb, D) with one D, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        ),
    )
    check_value(b.shape[0] > 0, lambda: f"{op}: the second feature set is empty")
    check_value(
        scale.numel() == 1,
        lambda: f"{op}: logit_scale must be a scalar (one element), got shape {tuple(scale.shape)}",
    )
    check_type(scale.is_floating_point(), lambda: f"{op}: logit_scale must be a float tensor")
    if bias is not None:
        check_value(
            bias.numel() == 1,
            lambda: (
                f"{op}: logit_bias must be a scalar (one element), got shape {tuple(bias.shape)}"
            ),
        )
        check_type(bias.is_floating_point(), lambda: f"{op}: logit_bias must be a float tensor")


def _check_grad_vector(op: str, name: str, g: Tensor, n, a: Tensor) -> None:
    """A per-row tensor of a backward: (n,) on a's device (contrastive_checks.h, check_vector)."""
    check_same_device(op, "a", {"a": a, name: g})
    check_value(
        g.dim() == 1 and g.shape[0] == n,
        lambda: f"{op}: {name} must have shape ({n},), got {tuple(g.shape)}",
    )


def check_lse_backward(op, grad_row, grad_col, a, b, scale, bias, row_lse, col_lse) -> None:
    """The checks of tiled_lse_backward (tiled_lse.cpp): the forward's, then grad_row and row_lse
    (Na,), grad_col and col_lse both given or both None, each (Nb,)."""
    check_args(op, a, b, scale, bias)
    _check_grad_vector(op, "grad_row", grad_row, a.shape[0], a)
    _check_grad_vector(op, "row_lse", row_lse, a.shape[0], a)
    check_value(
        (grad_col is None) == (col_lse is None),
        lambda: f"{op}: grad_col and col_lse must be given together",
    )
    if grad_col is not None:
        _check_grad_vector(op, "grad_col", grad_col, b.shape[0], a)
        _check_grad_vector(op, "col_lse", col_lse, b.shape[0], a)


def check_softplus_backward(op, grad, a, b, scale, bias) -> None:
    """The checks of tiled_softplus_sum_backward: the forward's, then grad one element on a's
    device."""
    check_args(op, a, b, scale, bias)
    check_same_device(op, "a", {"a": a, "grad": grad})
    check_value(
        grad.numel() == 1, lambda: f"{op}: grad must have one element, got {tuple(grad.shape)}"
    )


def _positives(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor | None, offset: int) -> Tensor:
    """scale * <a_i, b_{i + offset}> (+ bias) for every row i of a, in fp32 (fp64 for fp64)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    n = a.shape[0]
    dot = (a.to(acc) * b[offset : offset + n].to(acc)).sum(-1)
    out = scale.to(acc).reshape(()) * dot
    return out + bias.to(acc).reshape(()) if bias is not None else out


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    labels_offset: int = 0,
) -> Tensor:
    """open_clip's ClipLoss on given features, with logits = logit_scale * I T^T (+ logit_bias):

    - Ni == Nt and labels_offset == 0: 0.5 * (CE(logits, arange) + CE(logits^T, arange)), both
      directions from one pass of row and column log-sum-exps;
    - otherwise (local rows against gathered columns, for distributed training): one direction,
      the mean over rows i of CE(logits_i, i + labels_offset). ClipLoss(local_loss=True) calls it
      for local images against all texts and local texts against all images.

    Features (N, D) in fp16/bf16/fp32 (fp64 on the CPU) are multiplied in tiles by the device's
    BLAS and everything after the products is fp32 (fp64), so large logit scales do not overflow.
    logit_scale and logit_bias: one-element float tensors on the features' device, or Python
    numbers. Returns a 0-dim fp32 (fp64) loss.

    Non-finite inputs give what the float64 eager loss gives: NaN for a NaN anywhere, an
    infinite logit_scale or logit_bias, or an infinite feature (its log-softmax subtracts
    infinities), with NaN gradients where that loss's are NaN.
    """
    i, t = image_features, text_features
    if i.dim() != 2 or t.dim() != 2:
        raise ValueError(
            f"clip_loss: features must be (N, D), got {tuple(i.shape)} and {tuple(t.shape)}"
        )
    labels_offset = operator.index(labels_offset)
    scale = _scalar(logit_scale, i)
    bias = _scalar(logit_bias, i) if logit_bias is not None else None
    n, m = i.shape[0], t.shape[0]
    if n == 0:
        raise ValueError("clip_loss: no image features")
    if m == 0:
        raise ValueError("clip_loss: no text features")
    if not torch.compiler.is_compiling():  # traced, the fake kernel checks (naming the op)
        check_args("clip_loss", i, t, scale, bias, _PUBLIC_NAMES)
    square = n == m and labels_offset == 0
    if not square and not (0 <= labels_offset and labels_offset + n <= m):
        raise ValueError(
            f"clip_loss: labels_offset {labels_offset} + {n} rows exceed the {m} text features"
        )
    row_lse, col_lse = torch.ops.genext.tiled_lse.default(i, t, scale, bias, square)
    pos = _positives(i, t, scale, bias, labels_offset)
    if square:
        return 0.5 * ((row_lse - pos).mean() + (col_lse - pos).mean())
    return (row_lse - pos).mean()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias,
    negative_only: bool = False,
) -> Tensor:
    """open_clip's SigLipLoss for one block of features: -sum_ij log sigmoid(z_ij * L_ij) / Ni with
    L = logit_scale * I T^T + logit_bias, z = +1 on the positives (i == j) and -1 elsewhere, or
    all -1 when negative_only (the blocks of other ranks). Computed as
    sum_ij softplus(-z_ij L_ij) / Ni one tile of scores at a time, without the Ni x Nt matrix.
    logit_scale and logit_bias: one-element float tensors on the features' device, Python numbers, or None for
    no bias.

    Non-finite inputs: a NaN anywhere gives NaN; logit_bias = +inf gives +inf (0 for a single
    positive pair) and -inf gives +inf (0 with negative_only), as the float64 eager loss, with its
    finite gradients; a non-finite logit_scale gives NaN (loss and gradients; the eager loss's
    products mix +inf and -inf and give NaN for any real features). An infinite feature gives
    what the eager loss gives (each pair's term is computed on its own, so no inf - inf).
    """
    i, t = image_features, text_features
    if i.dim() != 2 or t.dim() != 2:
        raise ValueError(
            f"siglip_loss: features must be (N, D), got {tuple(i.shape)} and {tuple(t.shape)}"
        )
    scale = _scalar(logit_scale, i)
    bias = _scalar(logit_bias, i) if logit_bias is not None else None
    n, m = i.shape[0], t.shape[0]
    if n == 0:
        raise ValueError("siglip_loss: no image features")
    if m == 0:
        raise ValueError("siglip_loss: no text features")
    if not torch.compiler.is_compiling():  # traced, the fake kernel checks (naming the op)
        check_args("siglip_loss", i, t, scale, bias, _PUBLIC_NAMES)
    if not negative_only and m != n:
        raise ValueError(
            "siglip_loss: positives need as many text as image features "
            f"({n} vs {m}); pass negative_only=True for other ranks' blocks"
        )
    # An infinite scale makes every score +-inf or NaN (inf * 0): NaN throughout, as the eager
    # loss; adding NaN (not replacing the scale) keeps the gradient path to logit_scale.
    scale = scale + torch.where(torch.isfinite(scale), 0.0, float("nan"))
    # the positives (i == j) enter as softplus(-L_ii) inside the op: exact for infinite scores
    if _keeps_weights(i, t, scale, bias):
        total = torch.ops.genext.softplus_sum_with_weights.default(
            i, t, scale, bias, not negative_only
        )[0]
    else:
        total = torch.ops.genext.tiled_softplus_sum.default(i, t, scale, bias, not negative_only)
    return total / n


def _keeps_weights(i: Tensor, t: Tensor, scale: Tensor, bias: Tensor | None) -> bool:
    """Whether siglip_loss takes the forward that keeps its backward's weights: on the CPU, when a
    gradient will be asked for and the score matrix is small enough to store."""
    return (
        i.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in (i, t, scale, bias))
        and i.shape[0] * t.shape[0] <= SIGLIP_SAVED_WEIGHTS_MAX
    )


# ---- fake kernels and autograd ------------------------------------------------------------------


@torch.library.register_fake("genext::tiled_lse")
def _fake_lse(a, b, scale, bias, cols):
    check_args("tiled_lse", a, b, scale, bias)
    if cols:
        check_value(a.shape[0] > 0, lambda: "tiled_lse: column log-sum-exp needs rows")
    return (
        a.new_empty((a.shape[0],), dtype=acc_dtype(a)),
        a.new_empty((b.shape[0] if cols else 0,), dtype=acc_dtype(a)),
    )


@torch.library.register_fake("genext::tiled_lse_backward")
def _fake_lse_bwd(grad_row, grad_col, a, b, scale, bias, row_lse, col_lse):
    check_lse_backward(
        "tiled_lse_backward", grad_row, grad_col, a, b, scale, bias, row_lse, col_lse
    )
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        torch.empty_like(bias) if bias is not None else scale.new_empty((0,)),
    )


@torch.library.register_fake("genext::tiled_softplus_sum")
def _fake_sp(a, b, scale, bias, positives=False):
    check_args("tiled_softplus_sum", a, b, scale, bias)
    return a.new_empty((), dtype=acc_dtype(a))


@torch.library.register_fake("genext::tiled_softplus_sum_backward")
def _fake_sp_bwd(grad, a, b, scale, bias, positives=False):
    check_softplus_backward("tiled_softplus_sum_backward", grad, a, b, scale, bias)
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        torch.empty_like(bias) if bias is not None else scale.new_empty((0,)),
    )


def _refuse_double_backward(op: str, *tensors: Tensor | None) -> None:
    """The backward ops have no derivatives of their own: asked for a graph of the gradients
    (create_graph=True) with inputs that need gradients, they raise rather than let a gradient of
    these gradients come out silently wrong."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"{op}: gradients of gradients (create_graph=True) are not implemented"
        )


def _lse_setup(ctx, inputs, output):
    a, b, scale, bias, cols = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
    ctx.has_bias = bias is not None
    ctx.cols = cols


def _lse_backward(ctx, g_row, g_col):
    a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
    _refuse_double_backward("tiled_lse", g_row, g_col, a, b, scale, bias)
    if g_row is None:
        g_row = torch.zeros_like(row_lse)
    use_cols = ctx.cols and g_col is not None
    da, db, ds, dbias = torch.ops.genext.tiled_lse_backward.default(
        g_row,
        g_col if use_cols else None,
        a,
        b,
        scale,
        bias if ctx.has_bias else None,
        row_lse,
        col_lse if use_cols else None,
    )
    return da, db, ds, (dbias if ctx.has_bias else None), None


torch.library.register_autograd("genext::tiled_lse", _lse_backward, setup_context=_lse_setup)


def _sp_setup(ctx, inputs, output):
    a, b, scale, bias, positives = inputs
    ctx.save_for_backward(a, b, scale, bias)
    ctx.has_bias = bias is not None
    ctx.positives = positives


def _sp_backward(ctx, grad):
    a, b, scale, bias = ctx.saved_tensors
    _refuse_double_backward("tiled_softplus_sum", grad, a, b, scale, bias)
    da, db, ds, dbias = torch.ops.genext.tiled_softplus_sum_backward.default(
        grad, a, b, scale, bias if ctx.has_bias else None, ctx.positives
    )
    return da, db, ds, (dbias if ctx.has_bias else None), None


torch.library.register_autograd("genext::tiled_softplus_sum", _sp_backward, setup_context=_sp_setup)


@torch.library.register_fake("genext::softplus_sum_with_weights")
def _fake_spw(a, b, scale, bias, positives=False):
    check_args("softplus_sum_with_weights", a, b, scale, bias)
    acc = acc_dtype(a)
    return (
        a.new_empty((), dtype=acc),
        a.new_empty((a.shape[0], b.shape[0]), dtype=acc),
        a.new_empty((2,), dtype=acc),
    )


@torch.library.register_fake("genext::softplus_sum_with_weights_backward")
def _fake_spw_bwd(grad, weights, sums, a, b, scale, bias):
    check_softplus_backward("softplus_sum_with_weights_backward", grad, a, b, scale, bias)
    acc = acc_dtype(a)
    check_value(
        weights.shape == (a.shape[0], b.shape[0]) and weights.dtype == acc,
        lambda: (
            f"softplus_sum_with_weights_backward: weights must be ({a.shape[0]}, "
            f"{b.shape[0]}) in {acc}, got {tuple(weights.shape)} in {weights.dtype}"
        ),
    )
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        torch.empty_like(bias) if bias is not None else scale.new_empty((0,)),
    )


def _spw_setup(ctx, inputs, output):
    a, b, scale, bias, _positives = inputs
    _total, weights, sums = output
    ctx.mark_non_differentiable(weights, sums)
    ctx.save_for_backward(a, b, scale, bias, weights, sums)
    ctx.has_bias = bias is not None


def _spw_backward(ctx, grad, _grad_weights, _grad_sums):
    a, b, scale, bias, weights, sums = ctx.saved_tensors
    _refuse_double_backward("softplus_sum_with_weights", grad, a, b, scale, bias)
    da, db, ds, dbias = torch.ops.genext.softplus_sum_with_weights_backward.default(
        grad, weights, sums, a, b, scale, bias if ctx.has_bias else None
    )
    return da, db, ds, (dbias if ctx.has_bias else None), None


torch.library.register_autograd(
    "genext::softplus_sum_with_weights", _spw_backward, setup_context=_spw_setup
)
