"""GAN training losses: the non-saturating and hinge adversarial losses, the R1 gradient penalty
(also lazily, every ``interval`` steps, as StyleGAN2 does) and an exponential moving average of the
generator's weights.

All adversarial losses take logits (the discriminator's raw outputs, any shape, usually ``(B,)``)
and return a scalar mean over the batch. Only torch is needed here (losses sit below models)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EMA",
    "LazyR1",
    "hinge_d_loss",
    "hinge_g_loss",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "r1_penalty",
]


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss of the original GAN on logits:
    ``mean(softplus(-D(x))) + mean(softplus(D(G(z))))``, i.e. ``-log sigmoid(D(x))`` on reals
    plus ``-log(1 - sigmoid(D(G(z))))`` on fakes, without forming the sigmoid.

    Args:
        real_logits: D's logits on real images, any shape (usually ``(B,)``).
        fake_logits: D's logits on generated images, any shape.
    Returns:
        A scalar.
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss on logits: ``mean(softplus(-D(G(z))))`` (= ``-log
    sigmoid(D(G(z)))``), whose gradient stays large while D confidently rejects the fakes.

    Args:
        fake_logits: D's logits on generated images, any shape (usually ``(B,)``).
    """
    return F.softplus(-fake_logits).mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss (SAGAN, BigGAN): ``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``.

    Args:
        real_logits, fake_logits: D's outputs on real and generated images, any shape.
    """
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss: ``-mean(D(G(z)))``.

    Args:
        fake_logits: D's outputs on generated images, any shape.
    """
    return -fake_logits.mean()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1 gradient penalty (Mescheder et al. 2018): ``mean_b ||d D(x_b) / d x_b||^2`` over the
    batch, on real images.

    ``real_images`` must have ``requires_grad=True`` before D runs on it; ``real_logits`` are D's
    outputs on it, one per sample (``(B,)`` or ``(B, 1)``). The gradient is taken with
    ``create_graph=True`` so the penalty can be backpropagated into D's parameters (D must be
    twice differentiable: genext's flash attention and GroupNormSiLU have no double backward).

    Args:
        real_logits: ``(B,)`` or ``(B, 1)``, D's outputs on ``real_images``.
        real_images: ``(B, C, H, W)`` (any ``(B, *)``) leaf or intermediate that requires grad.
    Returns:
        A scalar, the unscaled penalty (multiply by ``gamma / 2`` for StyleGAN2's weighting).
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must require grad before D runs on it")
    if real_logits.shape[0] != real_images.shape[0] or real_logits.numel() != real_images.shape[0]:
        raise ValueError(
            "r1_penalty: real_logits must hold one logit per sample of real_images, got shapes "
            f"{list(real_logits.shape)} and {list(real_images.shape)}"
        )
    # sum over the batch: each sample's logit depends on its own image only (D has no batch
    # coupling other than a minibatch-stddev layer, whose cross terms R1 includes as well)
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


class LazyR1:
    """Lazy R1 regularisation (StyleGAN2): the penalty is computed on one step in ``interval`` and
    multiplied by ``interval``, so that on average it weighs as much as an every-step penalty.

    ``lazy(step, discriminator, real_images, *args, **kwargs)`` returns ``None`` on steps where
    ``step % interval != 0`` (nothing is computed), else the scalar
    ``gamma / 2 * interval * r1_penalty`` from one discriminator forward on a detached copy of
    ``real_images`` that requires grad and one ``torch.autograd.grad`` call. Extra arguments (e.g.
    class labels) are passed to the discriminator.

    Args:
        gamma: R1 weight (StyleGAN2: 10 at 1024x1024, lower for small images).
        interval: k, regularise every k-th step (StyleGAN2: 16). 1 gives a plain R1 every step.
    """

    def __init__(self, gamma: float = 10.0, interval: int = 16) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"LazyR1: interval must be a positive int, got {interval!r}")
        if not gamma >= 0:
            raise ValueError(f"LazyR1: gamma must be non-negative, got {gamma}")
        self.gamma = float(gamma)
        self.interval = interval

    def should_regularize(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0) is a regularisation step."""
        return step % self.interval == 0

    def __call__(
        self,
        step: int,
        discriminator: Callable[..., Tensor],
        real_images: Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor | None:
        if not self.should_regularize(step):
            return None
        x = real_images.detach().requires_grad_(True)
        logits = discriminator(x, *args, **kwargs)
        return r1_penalty(logits.reshape(x.shape[0]), x) * (self.gamma / 2 * self.interval)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Exponential moving average of a model's weights (the generator used for evaluation).

    ``EMA(model, decay)`` holds ``ema.module``, a frozen deep copy of ``model`` (unwrapped from
    DDP's ``.module`` or torch.compile's ``._orig_mod``) in eval mode. Each ``update()`` sets every
    floating-point parameter to ``decay * ema + (1 - decay) * param`` and copies the buffers
    (BatchNorm statistics, StyleGAN's ``w_avg``) and any non-float parameters. Call it after each
    optimiser step. ``ema(x)`` runs the averaged copy; ``state_dict()`` has the model's own keys, so
    it loads straight into a model of the same class.

    Args:
        model: the trained module (possibly DDP-wrapped); its parameters and buffers must keep their
            order and shapes.
        decay: in [0, 1]; 0.999 is a common choice for a few thousand steps or more.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.source = _unwrap(model)
        self.module = copy.deepcopy(self.source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: ``ema = decay * ema + (1 - decay) * param``."""
        src = dict(self.source.named_parameters())
        for name, p_ema in self.module.named_parameters():
            p = src[name].detach()
            if p_ema.is_floating_point():
                # lerp: ema + (1 - decay) * (p - ema), the same average in one fused op
                p_ema.lerp_(p.to(p_ema.dtype), 1.0 - self.decay)
            else:
                p_ema.copy_(p)
        src_buffers = dict(self.source.named_buffers())
        for name, b_ema in self.module.named_buffers():
            b_ema.copy_(src_buffers[name])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged model's ``state_dict`` (the model's keys)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> Any:
        """Load averaged weights (e.g. from a checkpoint) into the average."""
        return self.module.load_state_dict(state_dict, strict=strict)
