"""Flash attention: ``softmax(scale * q @ k^T + mask) @ v`` without an ``(Lq, Lk)`` tensor.

Fast paths: CUDA float16/bfloat16 (tensor-core kernels, compute capability 8.0 or newer, head dim
a multiple of 8 up to 256). CUDA float32 is served by a plain fp32 kernel: exact fp32 arithmetic,
correct but far slower than the 16-bit kernels. The CPU kernel (tiled online softmax, parallel over
batch x heads x query tiles) serves float32, float16/bfloat16 (computed in float32) and float64,
the last so that ``torch.autograd.gradcheck`` can run.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._C._functorch import TransformType

from .. import _C
from ._common import (
    acc_dtype,
    below_autograd,
    check_heads,
    check_same_device,
    check_type,
    check_value,
    declare_kernels,
    forbid_double_backward,
    softmax_scale,
)

__all__ = [
    "flash_attention",
    "flash_attention_varlen",
    "cpu_forward_prefers_torch",
    "differentiable_forward",
    "func_transform_active",
]

# CUDA float16/bfloat16 run on tensor cores; CUDA float32 is a plain exact kernel (slow)
declare_kernels(
    ["flash_attention_forward", "flash_attention_backward"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)


@dataclass(frozen=True)
class CpuRouting:
    """The machine facts :func:`cpu_forward_prefers_torch` reads (once, at import; tests replace
    ``CPU_ROUTING``): ``avx512``, genext's CPU kernels run their AVX-512 (x86-64-v4) versions;
    ``amx``, the CPU has AMX tiles (Intel Xeon from Sapphire Rapids on), where PyTorch's bfloat16
    SDPA runs its matrix products on them (oneDNN) while genext computes bfloat16 in float32; it
    also stands for the AVX512-FP16 that those CPUs have, for the float16 rule."""

    avx512: bool
    amx: bool


def _cpu_routing() -> CpuRouting:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return CpuRouting(
        avx512=str(getattr(_C, "cpu_isa", "")).startswith("x86-64-v4"),
        amx=bool(amx()) if amx is not None else False,
    )


CPU_ROUTING = _cpu_routing()

# the routing rule in C++ (csrc/flash_attention/cpu_routing.cpp): it runs before every CPU
# attention call, and its tests cost microseconds each in Python with the caches cold
_route = _C._cpu_attention_route
_is_compiling = torch.compiler.is_compiling
# PyTorch's SDPA itself, not the torch.nn.functional attribute, which genext's drop-in may hold
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


def cpu_forward_prefers_torch(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, causal: bool | None = None
) -> bool:
    """Whether, for ``(B, H, L, D)`` q and k, v (``"bhld"``), PyTorch's SDPA computes this
    attention faster than genext's CPU kernel, so that :func:`flash_attention` and
    ``genext.nn.functional.scaled_dot_product_attention`` hand it over.

    Only for CPU float32 inputs, and bfloat16 and float16 on CPUs with AMX (``CPU_ROUTING``; the
    float16 rule measured on the Intel Xeon, which also has AVX512-FP16), not while
    tracing; with gradients only for a call whose causality is told (``causal=False``, or for
    float32 where genext runs AVX-512 kernels on a CPU with AMX ``causal=True`` over few keys;
    ``None``, the default, means unknown there: PyTorch's causal backward measured slower than
    genext's from 128 keys). Without gradients ``None`` counts as not causal. The bfloat16 and
    float16 rules below hold on every CPU with AMX, whatever level genext's kernels run at. The
    shapes, from measurements (benchmarks/RESULTS.md):

    - float32 elsewhere (measured where genext runs its AVX2 kernels, the 2-core AMD EPYC; also
      the rule for AVX-512 CPUs without AMX and for the baseline build): without gradients at head
      dims of at least 64, or at least 32 with 256 or more keys (PyTorch's blocked GEMMs
      measured 1.05-1.3x faster on one core); with gradients at head dims of 160 or more, of 128
      or more with at least 512 keys, or of 64 or more with at least 2048 keys (measured at D160
      L64 and D128 L512: genext 0.84-1.09x quiet, on par in one-thread CPU time, 1.15-3.2x with a
      core busy: the rule gives up that busy-core advantage; D80 was on par and D40 1.04-1.8x).
    - float32 where genext runs its AVX-512 kernels on a CPU with AMX (measured on a 2-core Intel
      Xeon): every head dim and length when not causal (one core: genext's kernel measured
      0.89-1.18x forward and 0.85-1.01x forward+backward, 0.91-1.26x and 0.91-1.17x with 2
      threads, at D40 L1024, D40 with 77 keys (in that run; see the exception below), D80 L256,
      D160 L64, D64 L2048 and D128 L512: mostly below; at D2-D24 over 64-1024 keys, 2 threads,
      0.63-0.84x forward and 0.78-1.0x forward+backward), except at head dims up to 128 over a
      ragged key count (its remainder modulo 16 at least a sixteenth of it; more than 16 keys,
      from 8 at head dims up to 64, more than 32 with gradients; a text encoder's 77 tokens,
      say), whose tail PyTorch's kernel takes one value at a time: there genext's kernel
      measured 1.06-2.5x forward and 1.0-1.48x forward+backward with 2 threads, 1.0-2.5x and
      1.0-1.17x on one core (B2 H8, 64-4096 queries over 20-154 keys, 44-154 with gradients,
      D8-D128; the ragged counts of 18-19, 35-43 with gradients, and 155-239 keys follow the
      same rule unmeasured), and forwards over 8-15 keys 1.05-3.25x at D8-D64 with 2 threads
      (64-1024 queries; 7 keys 1.00-1.57x and 5-6 keys 0.88-1.83x, which stay with PyTorch's);
      causal attention
      only over fewer than 128 keys (2 threads: genext's kernel 0.42-0.81x forward and
      0.70-0.95x forward+backward at D2-D128 over 32 and 64 keys; over 128-1024 keys 0.89-1.57x
      and 0.97-1.46x, the lowest at D8 and D32 over 128 and 192 keys; D64 L512 1.63x and
      1.49x). AVX-512 CPUs without AMX (AMD Zen 4) keep the AVX2 rule: not measured there.
    - bfloat16 with AMX: forwards without gradients at every head dim (genext's forward 0.29-0.83x
      at D40-D160, 0.52-0.90x at D2-D24 causal or not); with gradients, not causal, head dims
      of 32 or more over 512 keys or more (forward+backward 0.59-0.68x there, 0.84-1.72x over
      fewer keys in two runs, 1.11-3.78x at D2-D24, where SDPA's bfloat16 backward is slow).
    - float16 with AMX: forwards without gradients that are not causal, or causal over fewer than
      128 keys (genext's forward 0.53-0.91x not causal at D8-D160 over 64-1024 keys, 0.62-0.82x
      causal over 64; causal from 256 keys 1.07-1.23x; the 128-key boundary is float32's, float16
      was not measured between 64 and 256 keys nor below D8). With gradients genext's kernel
      stays (forward+backward 0.96-3.34x at D8-D160, PyTorch's float16 backward is slow).

    Never for a scale that is not positive and finite (PyTorch's CPU flash kernel gives NaN rows
    for a negative scale with a causal mask) nor while the user has switched PyTorch's flash
    backend off (``sdpa_kernel``)."""
    # the same rule in C++, from the tensors' metadata; never while tracing, where its answer
    # would add guards on shapes and flags (genext's op, which torch.compile traces, serves then)
    if _is_compiling():
        return False
    machine = CPU_ROUTING
    return _route(q, k, v, scale, causal, True, False, machine.avx512, machine.amx) != 0


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    layout: str = "bhld",
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention with a fused, tiled kernel (no ``(Lq, Lk)`` tensor is stored).

    Args:
        q: ``(B, Hq, Lq, D)`` (``layout="bhld"``, SDPA's layout) or ``(B, Lq, Hq, D)``
            (``layout="blhd"``).
        k, v: ``(B, Hk, Lk, D)`` or ``(B, Lk, Hk, D)``. Hk must divide Hq (grouped-query and
            multi-query attention: query head h uses K/V head ``h // (Hq // Hk)``, without K/V
            being repeated in memory).
        causal: query i sees key j iff ``j <= i + Lk - Lq`` (aligned to the bottom-right corner, as
            flash-attn >= 2.1 and generation with a KV cache do; for ``Lq == Lk`` this is the usual
            lower triangle). A query that sees no key (``Lq > Lk``, first rows) gets a zero output.
            ``genext.nn.functional.scaled_dot_product_attention`` gives PyTorch's top-left
            ``is_causal`` instead.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        return_lse: also return the log-sum-exp of the scaled scores per query, ``(B, Hq, Lq)``
            float32 (float64 for float64 inputs); ``-inf`` for a query that sees no key.
        layout: ``"bhld"`` or ``"blhd"``, for inputs and output alike. Inputs whose last dim is
            contiguous are read in place (any other strides, e.g. q, k, v sliced from one packed
            qkv tensor), so both layouts cost no copy.
        deterministic: accepted for compatibility with flash-attn's signature and ignored: the
            backward is always deterministic, bit-identical gradients run to run (no atomics: the
            CUDA backward recomputes the scores for dQ in its own kernel).

    Returns:
        out in q's dtype and layout (for ``"bhld"`` a transposed view of a contiguous
        ``(B, Lq, Hq, D)`` tensor, as PyTorch's flash backend returns), and lse when
        ``return_lse``. Differentiable in q, k and v (and through lse); no double backward.

    Devices and dtypes: CUDA float16/bfloat16 run on tensor cores (compute capability 8.0+, D a
    multiple of 8 and at most 256; on an H200 about half the speed of PyTorch's flash backend at
    D128, on par at D40, see benchmarks/RESULTS.md); CUDA float32 runs a plain fp32 kernel, exact
    but slow; the
    CPU serves float32, float64 (for gradcheck), float16 and bfloat16 (computed in float32). A CPU
    float32 call (bfloat16 and float16 on CPUs with AMX) that returns no lse and is not causal with
    ``Lq != Lk`` runs PyTorch's SDPA instead where that is the faster one
    (:func:`cpu_forward_prefers_torch`, which lists the shapes per machine), outside autocast
    (the output dtype is the inputs', as from genext's kernel).
    """
    if layout == "bhld":
        bhld = True
    elif layout == "blhd":
        bhld = False
    else:
        raise ValueError(f"flash_attention: layout must be 'bhld' or 'blhd', got {layout!r}")
    if not return_lse and not _is_compiling():
        # cpu_forward_prefers_torch's rule; causal only where genext's bottom-right mask is
        # SDPA's top-left one (Lq == Lk)
        machine = CPU_ROUTING
        route = _route(q, k, v, scale, causal, bhld, True, machine.avx512, machine.amx)
        if route:
            # the rule routes only positive, finite scales; None is SDPA's own 1/sqrt(D)
            sc = None if scale is None else float(scale)
            if not bhld:
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if route == 2:  # CPU autocast is on; genext's kernel keeps the inputs' dtype
                with torch.autocast("cpu", enabled=False):
                    out = _torch_sdpa(q, k, v, is_causal=bool(causal), scale=sc, enable_gqa=True)
            else:
                out = _torch_sdpa(q, k, v, is_causal=bool(causal), scale=sc, enable_gqa=True)
            return out if bhld else out.transpose(1, 2)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"flash_attention: {name} must be 4-D ({'B, H, L, D' if bhld else 'B, L, H, D'}), "
                    f"got shape {tuple(t.shape)}"
                )
    if (
        not return_lse
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None  # no torch.func transform
    ):
        sc = softmax_scale(q, scale, "flash_attention")
        out = _EagerDense.apply(q, k, v, sc, bool(causal), bhld)
        # the bhld view is taken outside: a view made inside an autograd.Function cannot be
        # changed in place afterwards, a view of its output can
        return out.transpose(1, 2) if bhld else out
    if bhld:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = _forward(
        q,
        k,
        v,
        None,
        None,
        None,
        0,
        0,
        softmax_scale(q, scale, "flash_attention"),
        bool(causal),
        True,
    )
    if bhld:
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _check_cu_format(name: str, cu: Tensor, q: Tensor) -> None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        got = (
            f"{cu.dtype} tensor of shape {tuple(cu.shape)}"
            if isinstance(cu, Tensor)
            else type(cu).__name__
        )
        raise ValueError(
            f"flash_attention_varlen: {name} must be a 1-D int32 tensor (num_sequences + 1,), got {got}"
        )
    if cu.device != q.device:
        raise RuntimeError(
            f"flash_attention_varlen: {name} is on {cu.device} but q is on {q.device}"
        )


_INT32_MAX = 2**31 - 1


def _check_max_seqlen(name: str, n) -> None:
    """A bound on int32 sequence lengths: an int in [0, 2**31 - 1] (a SymInt passes while
    tracing; the kernels check it again)."""
    if isinstance(n, torch.SymInt):
        return
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)  # ints, numpy integers, 0-dim integer tensors
    except TypeError:
        raise TypeError(
            f"flash_attention_varlen: {name} must be an int, got {type(n).__name__}"
        ) from None
    if not 0 <= n <= _INT32_MAX:
        raise ValueError(
            f"flash_attention_varlen: {name} must be in [0, 2**31 - 1] (lengths are int32), got {n}"
        )


def _check_cu_values(name: str, cu: Tensor, rows: int, max_seqlen: int, max_name: str) -> None:
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"flash_attention_varlen: {name} must start at 0, got {c[0]}")
    for s in range(len(c) - 1):
        if c[s + 1] < c[s]:
            raise ValueError(
                f"flash_attention_varlen: {name} must be non-decreasing, got {name}[{s + 1}] = "
                f"{c[s + 1]} < {name}[{s}] = {c[s]}"
            )
        if c[s + 1] - c[s] > max_seqlen:
            raise ValueError(
                f"flash_attention_varlen: sequence {s} has {c[s + 1] - c[s]} rows in {name}, more "
                f"than {max_name} = {max_seqlen}"
            )
    if c[-1] > rows:
        raise ValueError(
            f"flash_attention_varlen: the last entry of {name} ({c[-1]}) exceeds the number of "
            f"packed rows ({rows})"
        )


def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a batch of sequences of different lengths, packed without padding.

    Args:
        q: ``(total_q, Hq, D)``; sequence s owns rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]``.
        k, v: ``(total_k, Hk, D)``, Hk dividing Hq; sequence s owns rows
            ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(num_sequences + 1,)`` on q's device, starting at 0,
            non-decreasing, ending at most at the number of rows (rows past the end get a zero
            output and gradient). Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: bounds on the sequence lengths (the CUDA launch grid is sized
            by them, so they must hold).
        causal, scale, deterministic: as in :func:`flash_attention`; causal aligns bottom-right
            within each sequence.
        return_lse: also return the log-sum-exp, ``(Hq, total_q)``.

    Returns:
        out ``(total_q, Hq, D)`` in q's dtype, and lse when ``return_lse``. Differentiable in q,
        k, v. Devices and dtypes as :func:`flash_attention`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(
                f"flash_attention_varlen: {name} must be 3-D (total, H, D), got shape {tuple(t.shape)}"
            )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        _check_max_seqlen(name, n)
    check_same_device("flash_attention_varlen", "q", {"q": q, "k": k, "v": v})
    _check_cu_format("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_format("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"flash_attention_varlen: cu_seqlens_q and cu_seqlens_k must have the same length "
            f"(num_sequences + 1), got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    # data-dependent (no values while tracing or on meta); the kernels check again
    if not torch.compiler.is_compiling() and q.device.type != "meta":
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    out, lse = _forward(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        cu_seqlens_q,
        cu_seqlens_k,
        None,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale(q, scale, "flash_attention_varlen"),
        bool(causal),
        True,
    )
    out = out.squeeze(0)
    return (out, lse.squeeze(0)) if return_lse else out


# ---- eager calls: an autograd.Function below the registered op's autograd (see _common) ----------


class _EagerFlashAttention(torch.autograd.Function):
    """genext::flash_attention_forward with the registered op's backward (_backward), for eager
    calls that need gradients."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.genext.flash_attention_forward.default(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse)


class _EagerDense(torch.autograd.Function):
    """flash_attention's eager calls that need gradients and no lse: the inputs' layout
    transposes and the kernel's fixed arguments stay inside, so autograd records the call as one
    node plus, for ``"bhld"``, the output's transpose (each transpose outside is a node of its own,
    and apply's cost grows with its argument count: at small shapes these per-call costs, not the
    kernels, decide the time). Returns the kernel's ``(B, Lq, Hq, D)`` output."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, bhld):
        qt, kt, vt = (
            (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if bhld else (q, k, v)
        )
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = torch.ops.genext.flash_attention_forward.default(
                qt, kt, vt, None, None, None, 0, 0, scale, causal, True
            )
        # the kernel's own (B, L, H, D) views are saved: the backward takes them as they are
        ctx.save_for_backward(qt, kt, vt, out, lse)
        ctx.scale, ctx.causal, ctx.bhld = scale, causal, bhld
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        rest = (None, None, None, 0, 0, ctx.scale, ctx.causal, True)
        with below_autograd():  # create_graph: through the op, whose backward raises
            grads = torch.ops.genext.flash_attention_backward.default(
                grad_out, *ctx.saved_tensors, *rest
            )
        if ctx.bhld:
            grads = tuple(t.transpose(1, 2) for t in grads)
        return (*grads, None, None, None)


class _FunctorchFlashAttention(torch.autograd.Function):
    """genext::flash_attention_forward with the registered op's backward, in the form torch.func
    transforms (grad, vjp, jacrev, vmap) accept: a separate setup_context, and vmap rules
    generated from the ops' own batching rules (registered below)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return torch.ops.genext.flash_attention_forward.default(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:
            return (None,) * 11
        # a function of its own, so that differentiating the gradients (grad of grad, jacrev of
        # jacrev, create_graph through vmap) reaches its backward, which raises
        grads = _FunctorchFlashAttentionBackward.apply(
            grad_out, grad_lse, *ctx.saved_tensors, *ctx.args
        )
        return (*grads, *(None,) * 8)


class _FunctorchFlashAttentionBackward(torch.autograd.Function):
    """The backward of :class:`_FunctorchFlashAttention` (dq, dk, dv from grad_out, grad_lse and
    the forward's saved tensors and arguments), whose own backward raises: genext has no double
    backward, and a gradient of it must not come out as a silent zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, grad_lse, q, k, v, out, lse, *rest):
        return _backward_kernels(grad_out, grad_lse, q, k, v, out, lse, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "genext.ops.flash_attention: double backward (gradients of gradients) is not "
            "implemented"
        )


# the torch.func transforms that take :class:`_FunctorchFlashAttention` (grad, vjp and jacrev are
# Grad; jvp and jacfwd Jvp, which then raise for the missing jvp rule)
_FUNC_TRANSFORMS = frozenset({TransformType.Grad, TransformType.Jvp, TransformType.Vmap})


def func_transform_active() -> bool:
    """Whether this call runs under a torch.func transform (grad, vjp, jacrev, vmap; jvp and
    jacfwd, which raise) that needs :func:`differentiable_forward` rather than the registered op
    ``genext::flash_attention_forward``, whose autograd those transforms do not accept. Not under
    functionalize, alone or with others: it has no rule for autograd.Function, and the registered
    op serves it (as it serves torch.compile)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    keys = {i.key() for i in torch._C._functorch.get_interpreter_stack()}
    return TransformType.Functionalize not in keys and not keys.isdisjoint(_FUNC_TRANSFORMS)


def differentiable_forward(*inputs) -> tuple[Tensor, Tensor]:
    """``(out, lse) = genext::flash_attention_forward(*inputs)`` (the op's arguments: q, k, v as
    ``(B, L, H, D)`` views, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
    scale, causal, causal_bottom_right), differentiable in q, k and v in eager mode, under
    torch.compile and under torch.func transforms (the registered op's autograd alone does not
    support the latter)."""
    return _forward(*inputs)


def _forward(*inputs) -> tuple[Tensor, Tensor]:
    """(out, lse) = genext::flash_attention_forward(*inputs), differentiable in q, k, v."""
    if torch.compiler.is_compiling():
        return torch.ops.genext.flash_attention_forward.default(*inputs)
    if func_transform_active():
        return _FunctorchFlashAttention.apply(*inputs)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # functionalize: no autograd.Function there, the registered op serves it
        return torch.ops.genext.flash_attention_forward.default(*inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:3]):
        return _EagerFlashAttention.apply(*inputs)
    with below_autograd():
        return torch.ops.genext.flash_attention_forward.default(*inputs)


# ---- torch.library registrations ------------------------------------------------------------------


def _check_index(op: str, name: str, t: Tensor, q: Tensor, n) -> None:
    check_type(t.dtype == torch.int32, lambda: f"{op}: {name} must be int32, got {t.dtype}")
    check_same_device(op, "q", {"q": q, name: t})
    check_value(
        t.dim() == 1 and t.shape[0] == n,
        lambda: f"{op}: {name} must have shape ({n},), got {list(t.shape)}",
    )


def _check_problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k):
    """The checks of csrc/flash_attention/flash_attention_checks.h (check_problem) and of the CUDA
    binding, with the same exception types and messages, for the fake kernels: they run for meta
    and fake tensors, and for a meta tensor beside real ones (which must raise, as the real kernel
    would, not return an uninitialised result). Returns the number of sequences."""
    dev = q.device.type
    on_cuda = dev == "cuda"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + (() if on_cuda else (torch.float64,))
    check_type(
        q.dtype in dtypes,
        lambda: (
            f"{op}: q must be float16, bfloat16, float32{'' if on_cuda else ' or float64'} "
            f"on {dev}, got {q.dtype}"
        ),
    )
    check_type(
        k.dtype == q.dtype and v.dtype == q.dtype,
        lambda: f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    check_same_device(op, "q", {"q": q, "k": k, "v": v})
    check_value(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        lambda: (
            f"{op}: q, k, v must be (B, L, H, D) views, got ranks {q.dim()}, {k.dim()}, {v.dim()}"
        ),
    )
    d, hq, hk = q.shape[3], q.shape[2], k.shape[2]
    check_value(
        k.shape[3] == d and v.shape[3] == d,
        lambda: f"{op}: q, k and v must share the head dim, got {d}, {k.shape[3]}, {v.shape[3]}",
    )
    check_value(
        v.shape[:3] == k.shape[:3],
        lambda: f"{op}: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}",
    )
    check_value(
        k.shape[0] == q.shape[0],
        lambda: f"{op}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}",
    )
    check_heads(op, hq, hk, d, on_cuda)
    varlen = cu_q is not None or cu_k is not None
    if varlen:
        check_value(
            cu_q is not None and cu_k is not None,
            lambda: f"{op}: cu_seqlens_q and cu_seqlens_k come together",
        )
        check_value(
            q.shape[0] == 1, lambda: f"{op}: with cu_seqlens, q, k, v are packed (1, total, H, D)"
        )
        n = cu_q.numel()
        check_value(
            cu_q.dim() == 1 and n >= 1,
            lambda: (
                f"{op}: cu_seqlens_q must have shape (num_sequences + 1,), got {list(cu_q.shape)}"
            ),
        )
        _check_index(op, "cu_seqlens_q", cu_q, q, n)
        _check_index(op, "cu_seqlens_k", cu_k, q, n)
        check_value(
            0 <= max_q <= _INT32_MAX and 0 <= max_k <= _INT32_MAX,
            lambda: (
                f"{op}: max_seqlen_q and max_seqlen_k must be in [0, 2^31 - 1], got {max_q} and "
                f"{max_k}"
            ),
        )
        batch, lq, lk = n - 1, max_q, max_k
    else:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if seqused_k is not None:
        _check_index(op, "seqused_k", seqused_k, q, batch)
    if on_cuda:
        check_value(
            lq < 2**31 and lk < 2**31 and batch < 65536 and hq < 65536,
            lambda: f"{op}: sizes out of range (lengths < 2^31, batch and heads < 65536)",
        )
    return batch


@torch.library.register_fake("genext::flash_attention_forward")
def _fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    causal_bottom_right,
):
    _check_problem(
        "flash_attention_forward",
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_k,
        max_seqlen_q,
        max_seqlen_k,
    )
    b, lq, hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((b, hq, lq), dtype=acc_dtype(q))
    return out, lse


@torch.library.register_fake("genext::flash_attention_backward")
def _fake_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    causal_bottom_right,
):
    op = "flash_attention_backward"
    _check_problem(op, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_value(
            t.shape == q.shape,
            lambda name=name, t=t: (
                f"{op}: {name} must have q's shape {list(q.shape)}, got {list(t.shape)}"
            ),
        )
        check_type(
            t.dtype == q.dtype,
            lambda name=name, t=t: f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}",
        )
        check_same_device(op, "q", {"q": q, name: t})
    b, lq, hq = q.shape[0], q.shape[1], q.shape[2]
    check_value(
        lse.dim() == 3 and lse.shape == (b, hq, lq),
        lambda: f"{op}: lse must have shape (B, Hq, Lq) = ({b}, {hq}, {lq}), got {list(lse.shape)}",
    )
    if q.device.type == "cuda":  # the CUDA binding checks lse's dtype with its shape
        check_value(
            lse.dtype == torch.float32,
            lambda: (
                f"{op}: lse must be float32 (B, Hq, Lq) as the forward returns it, got {lse.dtype}"
            ),
        )
    else:
        check_type(
            lse.dtype in (torch.float32, torch.float64),
            lambda: f"{op}: lse must be float32 or float64, got {lse.dtype}",
        )
    check_same_device(op, "q", {"q": q, "lse": lse})
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale, causal, bottom_right) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seqused_k)
    ctx.args = (max_q, max_k, scale, causal, bottom_right)
    # an unused output (usually lse) then gets None instead of a tensor of zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    nones = (None,) * 8
    if grad_out is None and grad_lse is None:
        return (None, None, None) + nones
    return _backward_kernels(grad_out, grad_lse, *ctx.saved_tensors, *ctx.args) + nones


def _backward_kernels(
    grad_out, grad_lse, q, k, v, out, lse, *rest
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of genext::flash_attention_forward for grad_out and grad_lse (either None)."""
    # rest: the forward's arguments after q, k, v (cu_seqlens_q, cu_seqlens_k, seqused_k,
    # max_seqlen_q, max_seqlen_k, scale, causal, causal_bottom_right), shared by every kernel call
    scale = rest[5]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    with below_autograd():  # create_graph: through the op, whose backward raises
        dq, dk, dv = torch.ops.genext.flash_attention_backward.default(
            grad_out, q, k, v, out, lse, *rest
        )
    if grad_lse is not None:
        # lse_i = log sum_j exp(scale q_i.k_j): d lse_i / d q_i = scale sum_j P_ij k_j, the output
        # of attention with v := k, and d lse_i / d k_j = scale P_ij q_i, which is the dv of the
        # backward op for grad_out_i = grad_lse_i q_i. Both reuse the kernels (no (L, L) tensor).
        g = grad_lse.to(acc_dtype(q))
        g = g.transpose(1, 2).unsqueeze(-1)  # (B, Lq, Hq, 1)
        g = torch.where(torch.isinf(lse).transpose(1, 2).unsqueeze(-1), torch.zeros_like(g), g)
        pk, _ = torch.ops.genext.flash_attention_forward.default(q, k, k, *rest)
        gq = (g * q).to(q.dtype)
        _, _, pq = torch.ops.genext.flash_attention_backward.default(gq, q, k, k, pk, lse, *rest)
        dq = (dq + scale * g * pk).to(q.dtype)
        dk = (dk + scale * pq).to(k.dtype)
    return dq, dk, dv


torch.library.register_autograd(
    "genext::flash_attention_forward", _backward, setup_context=_setup_context
)


forbid_double_backward("flash_attention_backward", "genext.ops.flash_attention")


# ---- torch.vmap rules: the vmapped dim joins the batch dim (dense calls) -------------------------


def _fold(t: Tensor, dim: int | None, n: int) -> Tensor:
    """``t`` with its vmapped dim ``dim`` (None: not vmapped, so repeated n times) merged into its
    first (batch) dim, the vmapped index outermost; the last dim stays contiguous."""
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    t = t.flatten(0, 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _vmap_loop(op, n: int, in_dims, args):
    """``op`` once per vmapped index, results stacked along dim 0 (varlen calls, whose packed
    rows and cu_seqlens cannot take a batch dim)."""
    results = []
    for i in range(n):
        sliced = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    stacked = tuple(torch.stack(r) for r in zip(*results))
    return stacked, (0,) * len(stacked)


@torch.library.register_vmap("genext::flash_attention_forward")
def _vmap_forward(info, in_dims, q, k, v, cu_q, cu_k, seqused_k, *rest):
    op = torch.ops.genext.flash_attention_forward
    args = (q, k, v, cu_q, cu_k, seqused_k, *rest)
    if cu_q is not None or cu_k is not None:
        return _vmap_loop(op, info.batch_size, in_dims, args)
    n = info.batch_size
    q, k, v = (_fold(t, d, n) for t, d in zip((q, k, v), in_dims))
    if seqused_k is not None:
        seqused_k = _fold(seqused_k, in_dims[5], n)
    out, lse = op(q, k, v, None, None, seqused_k, *rest)
    return (out.unflatten(0, (n, -1)), lse.unflatten(0, (n, -1))), (0, 0)


@torch.library.register_vmap("genext::flash_attention_backward")
def _vmap_backward(info, in_dims, grad_out, q, k, v, out, lse, cu_q, cu_k, seqused_k, *rest):
    op = torch.ops.genext.flash_attention_backward
    args = (grad_out, q, k, v, out, lse, cu_q, cu_k, seqused_k, *rest)
    if cu_q is not None or cu_k is not None:
        return _vmap_loop(op, info.batch_size, in_dims, args)
    n = info.batch_size
    folded = [_fold(t, d, n) for t, d in zip(args[:6], in_dims)]
    if seqused_k is not None:
        seqused_k = _fold(seqused_k, in_dims[8], n)
    grads = op(*folded, None, None, seqused_k, *rest)
    return tuple(g.unflatten(0, (n, -1)) for g in grads), (0, 0, 0)
