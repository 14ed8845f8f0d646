"""Helpers for comparing a genext model with its peer (diffusers, transformers, open_clip) built
with the same random weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def perturb_(model: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Adds noise to every parameter and floating buffer, in place, so that no weight is a trivial
    0 or 1 (GroupNorm weights start at 1 and biases at 0, which would hide a swapped pair)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)
    return model


def rel(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf if a holds a non-finite value b does not)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() and torch.isfinite(b).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def grads_after(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> dict[str, Tensor]:
    """The gradient of every parameter of `model` after one backward of `loss_fn(model)`."""
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(
    ours: dict[str, Tensor],
    peer: dict[str, Tensor],
    tol: float,
    ref: dict[str, Tensor] | None = None,
) -> None:
    """Every gradient of `ours` within `tol` of the peer's, relative to its own norm or to a
    hundredth of the whole gradient's norm, whichever is larger: a conv bias whose output only
    reaches GroupNorms with one channel per group has a zero gradient, formed by cancelling
    terms of the size of the other gradients, and its rounding noise relative to zero means
    nothing (its fp32 noise was about 2e-8 of the whole gradient's norm in both models).

    With `ref` (the peer's float64 gradients), a tensor outside that bound still passes when it
    is within the same bound of `ref`: the float64 gradient is the yardstick, the peer's float32
    one only an estimate of it (on an AVX-512 machine with one thread a U-Net's proj_in bias
    gradient, summed over every position, was 9.2e-6 from float64 here and 4.1e-6 in the peer,
    1.2e-5 apart); or when its error against `ref` is at most twice the peer's own: a gradient
    formed by cancellation is no more exact in the peer than here."""
    assert ours.keys() == peer.keys()
    total = torch.cat([g.double().flatten() for g in peer.values()]).norm().item()
    worst, where = 0.0, ""
    for k, g in peer.items():
        o, g = ours[k].double(), g.double()
        if not torch.isfinite(o).all():
            raise AssertionError(f"gradient of {k} is not finite")
        scale = max(g.norm().item(), 1e-2 * total)
        err = (o - g).norm().item() / scale
        if err >= tol and ref is not None:
            r = ref[k].double()
            ours_err = (o - r).norm().item()
            if ours_err < tol * scale or ours_err <= 2 * (g - r).norm().item():
                continue
        if err > worst:
            worst, where = err, k
    assert worst < tol, f"gradient of {where} differs: relative error {worst:.3g}"


def op_names(fn: Callable[[], object]) -> set[str]:
    """Names of the operators the profiler saw while `fn()` ran (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}
