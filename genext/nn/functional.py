"""Functional forms of genext's modules (the ops with PyTorch-style names)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _C, _build_config
from ..ops import served_dtypes, softmax_scale
from ..ops.flash_attention import (
    cpu_forward_prefers_torch,
    differentiable_forward,
)
from ..ops.group_norm_silu import group_norm_silu

__all__ = ["group_norm_silu", "scaled_dot_product_attention", "sdpa", "sdpa_backend"]

# PyTorch's own SDPA (the C function behind torch.nn.functional's name). The drop-in hands calls
# to this object, never to the module attribute, so that the drop-in can take that attribute's
# place (see :func:`sdpa`) without calling itself.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


# looked up once, at import, so that the per-call decision is plain Python torch.compile can trace
_FA_SERVED = served_dtypes("flash_attention_forward")
_CUDA_MAX_HEAD_DIM = _C.cuda_max_head_dim  # the fp32 kernel's limit
# fp16/bf16 are served up to the largest head-dim tile this build compiled
_CUDA_MAX_HEAD_DIM_16BIT = max(
    (int(d) for d in getattr(_build_config, "flash_attention_head_dim_tiles", "").split()),
    default=0,
)


def _genext_can_run(query, key, value, dropout_p, is_causal, enable_gqa, has_mask) -> bool:
    """Whether the genext kernel computes exactly what PyTorch's SDPA would, from shapes, dtypes
    and flags only (no data). It runs before every drop-in call, so it reads each attribute once
    and tells the device kind from ``is_cpu``/``is_cuda`` (``device.type`` costs about 1 us)."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or dropout_p != 0.0:
        return False
    if has_mask and is_causal:
        return False  # PyTorch raises for this; let it
    dev, dt = query.device, query.dtype
    if key.device != dev or value.device != dev or key.dtype != dt or value.dtype != dt:
        return False
    cuda = query.is_cuda
    kind = "cuda" if cuda else "cpu" if query.is_cpu else dev.type
    if dt not in _FA_SERVED.get(kind, ()):
        return False
    b, hq, lq, d = query.shape
    ks = key.shape
    if ks != value.shape or ks[0] != b or ks[3] != d:
        return False  # batch broadcasting or a value head dim that differs: PyTorch's
    hk = ks[1]
    if hk == 0 or (hq != hk and not (enable_gqa and hq % hk == 0)):
        return False
    if query.numel() == 0 or key.numel() == 0:
        return False
    if cuda:
        limit = _CUDA_MAX_HEAD_DIM if dt == torch.float32 else _CUDA_MAX_HEAD_DIM_16BIT
        if d % 8 != 0 or d > limit:
            return False
    return True


def _vmapped(t: Tensor) -> bool:
    """Whether t has a dim torch.vmap maps over (a BatchedTensor under any of torch.func's
    wrappers): a mask that differs per vmapped sample has no single prefix to test."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _key_lengths(mask: Tensor, query: Tensor, lk: int) -> Tensor | None:
    """Keys used per batch entry (int32, (B,)) when mask is a boolean key-padding mask that keeps
    a prefix of the keys in every batch entry; None otherwise (then PyTorch runs)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.device != query.device:
        return None
    if not 1 <= mask.dim() <= 4:
        return None
    b = query.shape[0]
    # PyTorch broadcasts the mask against (B, H, Lq, Lk) from the right: a key-padding mask has
    # size 1 in the head and query dims (so a 2-D mask is (Lq, Lk), as in PyTorch)
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[3] != lk or shape[0] not in (1, b):
        return None
    if torch.compiler.is_compiling() or _vmapped(mask):
        # the prefix test needs the mask's values, one mask for the whole call
        return None
    m = mask.reshape(shape[0], lk)
    n = m.sum(dim=-1)
    prefix = torch.arange(lk, device=m.device).unsqueeze(0) < n.unsqueeze(1)
    if not bool(torch.equal(m, prefix)):
        return None
    return n.to(torch.int32).expand(b).contiguous()


def sdpa_route(
    query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, scale=None
) -> tuple[bool, Tensor | None]:
    """The drop-in's choice for these arguments: (whether genext's kernel runs, the key lengths it
    gets from a key-padding mask); :func:`sdpa_with_route` then runs the call."""
    # without a mask, the shapes where PyTorch's own CPU kernel is the faster one go first: that
    # test turns them away with the fewest steps (causal or not changes the answer for calls
    # that need gradients)
    if attn_mask is None and cpu_forward_prefers_torch(query, key, value, scale, is_causal):
        return False, None
    return _genext_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)


def _genext_route(
    query, key, value, attn_mask, dropout_p, is_causal, enable_gqa
) -> tuple[bool, Tensor | None]:
    """:func:`sdpa_route` for a call the routing rule leaves to genext's kernel."""
    if not _genext_can_run(
        query, key, value, dropout_p, is_causal, enable_gqa, attn_mask is not None
    ):
        return False, None
    if attn_mask is None:
        return True, None
    lengths = _key_lengths(attn_mask, query, key.shape[2])
    return lengths is not None, lengths


def sdpa_backend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
    scale: float | None = None,
) -> str:
    """Which implementation :func:`scaled_dot_product_attention` runs for these arguments:
    ``"genext"`` (genext's flash-attention kernel) or ``"torch"`` (PyTorch's SDPA). Models and
    tests use it to know which attention op a profile must show. Pass the arguments the call
    gets (``is_causal`` and ``scale`` too: both take part in the CPU choice)."""
    runs, _ = sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, scale)
    return "genext" if runs else "torch"


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` (same signature and
    results) that runs genext's flash-attention kernel when it can, and PyTorch's otherwise.

    genext runs for 4-D ``(B, H, L, D)`` query/key/value of one dtype and device that genext
    serves (CUDA: float16/bfloat16 on tensor cores, float32 on a slow exact kernel, D a multiple
    of 8 up to 256; CPU: float32, float64, float16, bfloat16), ``dropout_p == 0``, equal head
    counts or ``enable_gqa`` with Hk dividing Hq, and either no ``attn_mask`` or a boolean
    key-padding mask (True = attend) broadcastable as ``(B, 1, 1, Lk)`` that keeps a prefix of the
    keys in each batch entry (checked on the mask's values, one device sync; under torch.compile,
    and under torch.vmap for a mask that differs per vmapped sample, masks go to PyTorch).
    ``is_causal`` is PyTorch's top-left aligned mask. Without a mask, CPU float32 calls (bfloat16
    and float16 on CPUs with AMX) at shapes where PyTorch's kernel is the faster one go to PyTorch (the
    shapes depend on the machine: ``genext.ops.flash_attention.cpu_forward_prefers_torch``, given
    ``is_causal`` and ``scale``).
    Everything else (float or arbitrary boolean masks, dropout, other ranks, broadcast batch
    dims) goes to PyTorch with no error; the choice is made from shapes, dtypes and flags before
    autograd records anything.

    A batch entry whose mask hides every key gets a zero output and zero gradients (as PyTorch's
    SDPA gives on torch 2.14, CPU). NaN: a NaN or inf in query or key, or a non-finite scale,
    gives NaN rows wherever a query sees the affected key, as PyTorch's math backend does; two
    differences: a NaN at a key hidden by the mask or by ``is_causal`` reaches no row (PyTorch's
    math backend gives NaN rows there), and a row whose only visible score is NaN is NaN (PyTorch's
    default CPU kernel gives zeros there).
    """
    if attn_mask is None and cpu_forward_prefers_torch(query, key, value, scale, is_causal):
        return _torch_sdpa(
            query,
            key,
            value,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    runs, lengths = _genext_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    return sdpa_with_route(
        runs, lengths, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )


def sdpa_with_route(
    runs: bool,
    lengths: Tensor | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """:func:`scaled_dot_product_attention` with the choice made by the caller, so that a call
    decides once: ``runs`` (genext's kernel, else PyTorch's SDPA with these arguments) and
    ``lengths``, the int32 ``(B,)`` keys used per batch entry for genext's kernel (None: all), as
    :func:`sdpa_route` returns them or from a mask the caller read itself (then ``attn_mask`` is
    not passed)."""
    if runs:
        args = (
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            None,
            None,
            lengths,
            0,
            0,
            softmax_scale(query, scale),
            bool(is_causal),
            False,
        )
        # the op under torch.compile; eager calls skip its registered (Python) autograd, which
        # torch.func transforms do not accept either
        out, _ = differentiable_forward(*args)
        return out.transpose(1, 2)
    return _torch_sdpa(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


@contextlib.contextmanager
def sdpa() -> Iterator[None]:
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is genext's drop-in
    :func:`scaled_dot_product_attention`, so code that looks the name up at call time (diffusers'
    and transformers' attention processors, ``F.scaled_dot_product_attention(...)`` in user code)
    runs genext's kernel where it can and PyTorch's SDPA everywhere else; on exit (also on an
    exception) the previous function is put back. Blocks may nest.

    The swap is process-wide, not per thread, and reaches only lookups made inside the block: a
    module that imported the function by name (``from torch.nn.functional import
    scaled_dot_product_attention``) keeps PyTorch's. Assigning the drop-in to the attribute
    yourself, for the whole program, is equally safe: calls it hands back to PyTorch go to
    PyTorch's own function, not to the attribute.
    """
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
