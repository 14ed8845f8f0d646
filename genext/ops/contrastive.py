"""Contrastive losses without the N x N logits: CLIP's symmetric InfoNCE and SigLIP's sigmoid
loss, from the tiled primitives `genext::tiled_lse` and `genext::tiled_softplus_sum` (only one
tile of scores exists at a time; memory is linear in N). Differentiable in the features,
logit_scale and logit_bias."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, declare_kernels

__all__ = ["clip_loss", "siglip_loss"]

# the products run on the device's BLAS; everything after them is float32 (float64 for float64)
declare_kernels(
    ["tiled_lse", "tiled_lse_backward", "tiled_softplus_sum", "tiled_softplus_sum_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)


def _scalar(t, like: Tensor) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), device=like.device)


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
    Returns a 0-dim fp32 (fp64) loss.
    """
    i, t = image_features, text_features
    if i.dim() != 2 or t.dim() != 2:
        raise ValueError(
            f"clip_loss: features must be (N, D), got {tuple(i.shape)} and {tuple(t.shape)}"
        )
    scale = _scalar(logit_scale, i)
    bias = _scalar(logit_bias, i) if logit_bias is not None else None
    n = i.shape[0]
    if n == 0:
        raise ValueError("clip_loss: no image features")
    square = i.shape[0] == t.shape[0] and labels_offset == 0
    if not square and not (0 <= labels_offset and labels_offset + n <= t.shape[0]):
        raise ValueError(
            f"clip_loss: labels_offset {labels_offset} + {n} rows exceed the "
            f"{t.shape[0]} text features"
        )
    row_lse, col_lse = torch.ops.genext.tiled_lse(i, t, scale, bias, square)
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
    (sum_ij softplus(L_ij) - sum_i L_ii) / Ni without the Ni x Nt matrix."""
    i, t = image_features, text_features
    if i.dim() != 2 or t.dim() != 2:
        raise ValueError(
            f"siglip_loss: features must be (N, D), got {tuple(i.shape)} and {tuple(t.shape)}"
        )
    scale = _scalar(logit_scale, i)
    bias = _scalar(logit_bias, i) if logit_bias is not None else None
    n = i.shape[0]
    if n == 0:
        raise ValueError("siglip_loss: no image features")
    total = torch.ops.genext.tiled_softplus_sum(i, t, scale, bias)
    if not negative_only:
        if t.shape[0] != n:
            raise ValueError(
                "siglip_loss: positives need as many text as image features "
                f"({n} vs {t.shape[0]}); pass negative_only=True for other ranks' blocks"
            )
        total = total - _positives(i, t, scale, bias, 0).sum()
    return total / n


# ---- fake kernels and autograd ------------------------------------------------------------------


@torch.library.register_fake("genext::tiled_lse")
def _fake_lse(a, b, scale, bias, cols):
    torch._check(
        a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
        lambda: "tiled_lse: features must be (Na, D) and (Nb, D)",
    )
    return (
        a.new_empty((a.shape[0],), dtype=acc_dtype(a)),
        a.new_empty((b.shape[0] if cols else 0,), dtype=acc_dtype(a)),
    )


@torch.library.register_fake("genext::tiled_lse_backward")
def _fake_lse_bwd(grad_row, grad_col, a, b, scale, bias, row_lse, col_lse):
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        torch.empty_like(bias) if bias is not None else scale.new_empty((0,)),
    )


@torch.library.register_fake("genext::tiled_softplus_sum")
def _fake_sp(a, b, scale, bias):
    return a.new_empty((), dtype=acc_dtype(a))


@torch.library.register_fake("genext::tiled_softplus_sum_backward")
def _fake_sp_bwd(grad, a, b, scale, bias):
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        torch.empty_like(bias) if bias is not None else scale.new_empty((0,)),
    )


def _lse_setup(ctx, inputs, output):
    a, b, scale, bias, cols = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
    ctx.has_bias = bias is not None
    ctx.cols = cols


def _lse_backward(ctx, g_row, g_col):
    a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
    if g_row is None:
        g_row = torch.zeros_like(row_lse)
    use_cols = ctx.cols and g_col is not None
    da, db, ds, dbias = torch.ops.genext.tiled_lse_backward(
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
    a, b, scale, bias = inputs
    ctx.save_for_backward(a, b, scale, bias)
    ctx.has_bias = bias is not None


def _sp_backward(ctx, grad):
    a, b, scale, bias = ctx.saved_tensors
    da, db, ds, dbias = torch.ops.genext.tiled_softplus_sum_backward(
        grad, a, b, scale, bias if ctx.has_bias else None
    )
    return da, db, ds, (dbias if ctx.has_bias else None)


torch.library.register_autograd("genext::tiled_softplus_sum", _sp_backward, setup_context=_sp_setup)
