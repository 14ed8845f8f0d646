"""Training objectives of diffusion models, with the conventions of diffusers' training scripts.

- `DiffusionLoss`: the denoising objective of a discrete-time (alphas_cumprod) model. The noisy
  input x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise, the target by prediction type (epsilon: the
  noise; v_prediction: v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0; sample: x0), and the MSE taken
  per sample, optionally weighted by min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) as
  diffusers' ``train_text_to_image.py`` weights it, then averaged over the batch.
- `FlowMatchingLoss`: rectified-flow training as diffusers' SD3 scripts do it: a timestep index
  drawn from a uniform, logit-normal or mode density, x_t = (1 - sigma) x0 + sigma noise with the
  sigma of genext's ``FlowMatchEulerDiscreteScheduler`` training schedule, target noise - x0.
- `drop_conditions`: condition dropout for classifier-free guidance training.

The exponential moving average of the weights is `genext.losses.EMA` (gan.py). This module takes
a scheduler duck-typed (anything with ``alphas_cumprod`` and ``config``) or the tensors themselves:
genext.losses does not import genext.samplers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiffusionLoss",
    "FlowMatchingLoss",
    "compute_snr",
    "diffusion_target",
    "drop_conditions",
    "min_snr_weights",
    "noisy_sample",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _check_prediction_type(prediction_type: str, where: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"{where}: prediction_type must be one of {list(PREDICTION_TYPES)}, "
            f"got {prediction_type!r}"
        )


def _alphas_cumprod(source: Any, where: str) -> Tensor:
    acp = getattr(source, "alphas_cumprod", source)
    if not isinstance(acp, Tensor) or acp.dim() != 1 or not acp.is_floating_point():
        raise TypeError(
            f"{where}: alphas_cumprod must be a 1-d floating tensor (or a scheduler that has one), "
            f"got {type(source).__name__}"
        )
    return acp


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values shaped (B, 1, ...) to broadcast against ``like`` (B, ...)."""
    return values.flatten().view((-1,) + (1,) * (like.dim() - 1))


def _sqrt_alphas(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    # as diffusers' add_noise: alphas_cumprod in the sample's dtype, indexed, then square roots
    acp = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
    return _per_row(acp**0.5, like), _per_row((1 - acp) ** 0.5, like)


def noisy_sample(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The forward process q(x_t | x0): sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise.

    x0, noise: (B, ...); timesteps: (B,) int64 indices into alphas_cumprod (T,). Same values as
    diffusers' ``DDPMScheduler.add_noise``."""
    a, s = _sqrt_alphas(alphas_cumprod, timesteps, x0)
    return a * x0 + s * noise


def diffusion_target(
    x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str
) -> Tensor:
    """What the model learns to predict from x_t: the noise ("epsilon"), the velocity
    sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0 ("v_prediction") or x0 ("sample").
    x0, noise: (B, ...); timesteps: (B,) int64. Returns (B, ...)."""
    _check_prediction_type(prediction_type, "diffusion_target")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a, s = _sqrt_alphas(alphas_cumprod, timesteps, x0)
    return a * noise - s * x0


def compute_snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio acp[t] / (1 - acp[t]) of each timestep, in float32 on the timesteps'
    device, computed as diffusers' ``training_utils.compute_snr`` does ((sqrt(acp) /
    sqrt(1 - acp))^2). alphas_cumprod: (T,) or a scheduler; timesteps: (B,) int64 -> (B,)."""
    return _snr(_alphas_cumprod(alphas_cumprod, "compute_snr"), timesteps, torch.float32)


def _snr(acp: Tensor, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
    # diffusers takes the square roots of its float32 schedule: the same values with `dtype`
    # float32, and no float32 rounding in them for float64
    acp = acp.to(device=timesteps.device, dtype=dtype)
    alpha = (acp**0.5)[timesteps]
    sigma = ((1.0 - acp) ** 0.5)[timesteps]
    return (alpha / sigma) ** 2


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weights of min-SNR-gamma (arXiv 2303.09556) for a model trained on
    ``prediction_type``, as diffusers' ``train_text_to_image.py`` computes them: min(snr, gamma)
    divided by snr for epsilon, by snr + 1 for v_prediction, undivided for sample. snr: (B,)."""
    _check_prediction_type(prediction_type, "min_snr_weights")
    if gamma <= 0:
        raise ValueError(f"min_snr_weights: gamma must be positive, got {gamma}")
    weights = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights


def _per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) mean squared error of each sample, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    err = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none")
    return err.mean(dim=list(range(1, err.dim()))) if err.dim() > 1 else err


def _draw_generator_device(generator: torch.Generator | None, device: Any) -> torch.device:
    # draw where the generator lives (a CPU generator for a CUDA batch draws on the CPU)
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


class DiffusionLoss(nn.Module):
    """The denoising objective of a discrete-time diffusion model (DDPM / Stable Diffusion
    training), with diffusers' conventions.

    Args:
        scheduler: anything with ``alphas_cumprod`` (T,) (and ``config.prediction_type`` when
            ``prediction_type`` is not given): a genext or diffusers scheduler; or the
            alphas_cumprod tensor itself.
        prediction_type: "epsilon", "v_prediction" or "sample" (default: the scheduler's).
        snr_gamma: min-SNR-gamma weighting when given (5.0 is the paper's choice).

    Use::

        t = loss_fn.sample_timesteps(B, generator=g, device=x0.device)
        noise = torch.randn(x0.shape, generator=g)
        pred = model(loss_fn.noisy_sample(x0, noise, t), t, cond)
        loss = loss_fn(pred, x0, noise, t)
    """

    def __init__(
        self,
        scheduler: Any,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
    ):
        super().__init__()
        acp = _alphas_cumprod(scheduler, "DiffusionLoss")
        if prediction_type is None:
            config = getattr(scheduler, "config", None)
            prediction_type = getattr(config, "prediction_type", None) or (
                config.get("prediction_type") if isinstance(config, dict) else None
            )
            if prediction_type is None:
                raise ValueError(
                    "DiffusionLoss: prediction_type is required when the scheduler has no "
                    "config.prediction_type"
                )
        _check_prediction_type(prediction_type, "DiffusionLoss")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"DiffusionLoss: snr_gamma must be positive, got {snr_gamma}")
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.register_buffer("alphas_cumprod", acp.detach().clone(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> Tensor:
        """(batch_size,) int64 timesteps uniform in [0, T), drawn from ``generator`` on its device
        and moved to ``device``."""
        draw = _draw_generator_device(generator, device)
        t = torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw
        )
        return t.to(device if device is not None else draw)

    def noisy_sample(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t (B, ...) for x0, noise (B, ...) and timesteps (B,)."""
        return noisy_sample(x0, noise, timesteps, self.alphas_cumprod)

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The prediction target (B, ...) of this loss's prediction_type."""
        return diffusion_target(x0, noise, timesteps, self.alphas_cumprod, self.prediction_type)

    def weights(self, timesteps: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """(B,) min-SNR-gamma weights in ``dtype`` (float32: diffusers' values), or None without
        snr_gamma."""
        if self.snr_gamma is None:
            return None
        snr = _snr(self.alphas_cumprod, timesteps, dtype)
        return min_snr_weights(snr, self.snr_gamma, self.prediction_type)

    def forward(self, model_pred: Tensor, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The scalar loss: the MSE between model_pred (B, ...) and the target, averaged over each
        sample, weighted per sample by min-SNR-gamma when set, averaged over the batch."""
        if model_pred.shape != x0.shape:
            raise ValueError(
                f"DiffusionLoss: model_pred must have x0's shape {tuple(x0.shape)}, "
                f"got {tuple(model_pred.shape)}"
            )
        loss = _per_sample_mse(model_pred, self.target(x0, noise, timesteps))
        w = self.weights(timesteps, loss.dtype)
        if w is not None:
            loss = loss * w.to(device=loss.device, dtype=loss.dtype)
        return loss.mean()


def drop_conditions(
    cond: Tensor,
    p: float,
    null: Tensor | int | float,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Condition dropout for classifier-free guidance training: each row of the batch has its
    condition replaced by the null condition with probability ``p``.

    cond: (B,) class ids (replaced by the int ``null`` id) or (B, ...) embeddings (replaced by
    ``null``, a tensor that broadcasts against one row, e.g. the empty prompt's (L, D)
    embedding). The rows are chosen by ``torch.rand(B, generator=generator) < p``, drawn on the
    generator's device, so a seeded generator picks the same rows every time. Returns the new
    conditions (and the (B,) bool mask of dropped rows with return_mask=True); ``cond`` is not
    modified."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_conditions: p must be in [0, 1], got {p}")
    if not isinstance(cond, Tensor) or cond.dim() == 0:
        raise ValueError("drop_conditions: cond must be a tensor with a batch dim")
    B = cond.shape[0]
    draw = _draw_generator_device(generator, cond.device)
    mask = (torch.rand(B, generator=generator, device=draw) < p).to(cond.device)
    if cond.is_floating_point():
        if not isinstance(null, Tensor):
            raise TypeError(
                "drop_conditions: null must be a tensor (the null embedding) for embeddings"
            )
        null_row = null.to(device=cond.device, dtype=cond.dtype)
        if null_row.dim() == cond.dim():
            if null_row.shape[0] != 1:
                raise ValueError(
                    "drop_conditions: null must broadcast against one row of cond "
                    f"{tuple(cond.shape[1:])}, got {tuple(null.shape)}"
                )
            null_row = null_row[0]
        out = torch.where(_per_row(mask, cond), null_row.expand(cond.shape[1:]), cond)
    else:
        if isinstance(null, Tensor):
            if null.numel() != 1:
                raise ValueError("drop_conditions: null must be one id for class ids")
            null = int(null.item())
        if isinstance(null, float) and not null.is_integer():
            raise TypeError(
                f"drop_conditions: null must be an integer id for class ids, got {null}"
            )
        out = torch.where(_per_row(mask, cond), torch.full_like(cond, int(null)), cond)
    return (out, mask) if return_mask else out


class FlowMatchingLoss(nn.Module):
    """Rectified-flow (flow-matching) training, as diffusers' SD3 training scripts do it.

    A batch draws u in (0, 1) from ``density`` ("uniform"; "logit_normal": sigmoid of
    N(logit_mean, logit_std); "mode": SD3's mode-heavy density with ``mode_scale``), takes the
    training-schedule index int(u * T) and its timestep and sigma from the schedule of genext's
    ``FlowMatchEulerDiscreteScheduler`` (sigmas t / T for t = T .. 1, shifted by
    shift * s / (1 + (shift - 1) * s); timestep = sigma * T), and trains on
    x_t = (1 - sigma) x0 + sigma noise with target noise - x0, the MSE per sample (optionally
    weighted by ``weighting``: "sigma_sqrt" sigma^-2 or "cosmap"), averaged over the batch.

    Args:
        num_train_timesteps, shift: the scheduler's config fields of the same names.
        density, logit_mean, logit_std, mode_scale: the timestep density (diffusers' names).
        weighting: "none", "sigma_sqrt" or "cosmap" (diffusers' compute_loss_weighting_for_sd3).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        weighting: str = "none",
    ):
        super().__init__()
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(
                f"FlowMatchingLoss: density must be one of {list(TIMESTEP_DENSITIES)}, got {density!r}"
            )
        if weighting not in FLOW_WEIGHTINGS:
            raise ValueError(
                f"FlowMatchingLoss: weighting must be one of {list(FLOW_WEIGHTINGS)}, got {weighting!r}"
            )
        if num_train_timesteps < 1:
            raise ValueError(
                f"FlowMatchingLoss: num_train_timesteps must be positive, got {num_train_timesteps}"
            )
        self.density, self.weighting = density, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        import numpy as np  # here: `import genext` does not need numpy

        # the scheduler's float32 training schedule, in its operation order
        n = num_train_timesteps
        t = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        sigmas = t / n
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("timesteps", sigmas * n, persistent=False)

    @classmethod
    def from_scheduler(cls, scheduler: Any, **kwargs: Any) -> FlowMatchingLoss:
        """The loss for a flow-matching scheduler's training schedule (its config's
        num_train_timesteps and shift; dynamic shifting is an inference-time option)."""
        config = scheduler.config
        return cls(config["num_train_timesteps"], config["shift"], **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def sample_u(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> Tensor:
        """(batch_size,) float32 u in (0, 1) from the density, drawn on the generator's device
        (as diffusers' ``compute_density_for_timestep_sampling``)."""
        draw = _draw_generator_device(generator, device)
        if self.density == "logit_normal":
            u = torch.normal(
                mean=self.logit_mean,
                std=self.logit_std,
                size=(batch_size,),
                generator=generator,
                device=draw,
            )
            return torch.sigmoid(u)
        u = torch.rand((batch_size,), generator=generator, device=draw)
        if self.density == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(timesteps (B,) float32 for the model, sigmas (B,) float32) of a batch, on ``device``."""
        u = self.sample_u(batch_size, generator, device)
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        index = index.to(self.sigmas.device)
        out = device if device is not None else u.device
        return self.timesteps[index].to(out), self.sigmas[index].to(out)

    @staticmethod
    def noisy_sample(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise; x0, noise (B, ...), sigmas (B,)."""
        s = _per_row(sigmas, x0).to(x0.dtype)
        return (1.0 - s) * x0 + s * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity noise - x0 the model predicts."""
        return noise - x0

    def weights(self, sigmas: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """(B,) per-sample loss weights in ``dtype``, or None for weighting "none"."""
        sigmas = sigmas.to(dtype)
        if self.weighting == "sigma_sqrt":
            return sigmas**-2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return None

    def forward(self, model_pred: Tensor, x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
        """The scalar loss for model_pred (B, ...) at the batch's sigmas (B,)."""
        if model_pred.shape != x0.shape:
            raise ValueError(
                f"FlowMatchingLoss: model_pred must have x0's shape {tuple(x0.shape)}, "
                f"got {tuple(model_pred.shape)}"
            )
        loss = _per_sample_mse(model_pred, self.target(x0, noise))
        w = self.weights(sigmas, loss.dtype)
        if w is not None:
            loss = loss * w.to(device=loss.device, dtype=loss.dtype)
        return loss.mean()
