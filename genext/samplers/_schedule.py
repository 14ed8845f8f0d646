"""Noise-schedule helpers shared by genext's schedulers, reproducing diffusers' numbers bit for bit.

diffusers builds its schedules as float32 tensors and derives every step coefficient from them
with 0-dim float32 tensor arithmetic. To get the same trajectories, genext's schedulers build the
same float32 tensors here (same torch calls, same operation order) and derive the coefficients with
the same 0-dim float32 torch ops on a CPU copy (no device sync), then hand them to the fused kernel.

Stable names (other scheduler modules import them):

  make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, owner=...,
             allowed=...)          -> float32 betas, shape (num_train_timesteps,)
  betas_for_alpha_bar(n, max_beta=0.999, alpha_transform_type="cosine") -> float32 betas
  rescale_zero_terminal_snr(betas) -> float32 betas whose last alphas_cumprod is 0
  make_alphas_cumprod(betas)       -> cumprod(1 - betas), float32
  spaced_timesteps(num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset)
                                   -> int64 numpy array, descending (DDIM/DDPM spacing rules)
  randn_like_diffusers(shape, generator, device, dtype) -> noise drawn as diffusers' randn_tensor
  threshold_scale(x0, ratio, max_value) -> (B,) per-sample dynamic-thresholding scale s
  PREDICTION_TYPES, TIMESTEP_SPACINGS, check_choice(name, value, choices, owner)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def check_choice(name: str, value: Any, choices: Sequence[Any], owner: str) -> None:
    """Raise a ValueError naming the argument when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"
) -> Tensor:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1]:
    beta_i = min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta), evaluated in Python
    doubles and stored as float32 (as diffusers does). "cosine" is the squaredcos_cap_v2 schedule
    (Nichol & Dhariwal); "exp" and "laplace" are the other transforms diffusers knows."""
    if alpha_transform_type == "cosine":

        def alpha_bar(t: float) -> float:
            # keep this evaluation order: it decides the last bit of the double before rounding
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "exp":

        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)
    elif alpha_transform_type == "laplace":

        def alpha_bar(t: float) -> float:
            half_dist = math.fabs(0.5 - t)
            lam = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * half_dist + 1e-6)
            snr = math.exp(lam)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ValueError(
            f"betas_for_alpha_bar: alpha_transform_type must be one of "
            f"['cosine', 'exp', 'laplace'], got {alpha_transform_type!r}"
        )
    n = num_diffusion_timesteps
    values = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(values, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
    *,
    owner: str = "scheduler",
    allowed: Sequence[str] = BETA_SCHEDULES,
) -> Tensor:
    """The float32 beta schedule from a diffusers config. `trained_betas` (any array-like) wins
    over the named schedule, as in diffusers. Schedules: linear (torch.linspace in float32),
    scaled_linear (linspace of the square roots, squared), squaredcos_cap_v2, and where `allowed`
    lists them sigmoid and laplace (diffusers' DDPM knows those too)."""
    if trained_betas is not None:
        if isinstance(trained_betas, Tensor):
            return trained_betas.detach().to("cpu", torch.float32).clone()
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule not in allowed:
        raise NotImplementedError(
            f"{owner}: beta_schedule {beta_schedule!r} is not implemented "
            f"(choose one of {list(allowed)} or pass trained_betas)"
        )
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(n, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"{owner}: beta_schedule {beta_schedule!r} is not implemented")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
    (arXiv 2305.08891): shift and scale sqrt(alphas_cumprod) so that its last value is 0 and its
    first is unchanged, then recover the betas. Float32, in diffusers' operation order."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = root[0].clone()
    last = root[-1].clone()
    root = root - last
    root = root * (first / (first - last))
    cumprod = root**2
    alphas = torch.cat([cumprod[0:1], cumprod[1:] / cumprod[:-1]])
    return 1 - alphas


def make_alphas_cumprod(betas: Tensor) -> Tensor:
    """cumprod(1 - betas) in float32 (diffusers' `alphas_cumprod`)."""
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    owner: str = "scheduler",
) -> np.ndarray:
    """The descending int64 inference timesteps of diffusers' DDIM and DDPM schedulers
    (DPM-Solver's rules differ: it spaces num_inference_steps + 1 points and drops one).

    leading:  k * (T // N) for k = N-1 .. 0, plus steps_offset;
    trailing: round(T, T - T/N, ...) - 1 (float step, steps_offset ignored, as in diffusers);
    linspace: round(linspace(0, T - 1, N)) reversed (steps_offset ignored, as in diffusers)."""
    T, N = num_train_timesteps, num_inference_steps
    if N > T:
        raise ValueError(
            f"{owner}: num_inference_steps ({N}) cannot be larger than num_train_timesteps ({T})"
        )
    if N < 1:
        raise ValueError(f"{owner}: num_inference_steps must be at least 1, got {N}")
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(N) * (T // N)).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -(T / N))).astype(np.int64) - 1
    else:
        raise ValueError(
            f"{owner}: timestep_spacing must be one of {list(TIMESTEP_SPACINGS)}, "
            f"got {timestep_spacing!r}"
        )
    return np.ascontiguousarray(ts)


def randn_like_diffusers(
    shape: Sequence[int],
    generator: None | torch.Generator | Sequence[torch.Generator],
    device: None | str | torch.device,
    dtype: torch.dtype | None,
) -> Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor`: with a CPU generator and a
    non-CPU target device, drawn on the CPU and moved; a list of generators draws one batch row
    per generator (a list of one is a single generator); a CUDA generator for a CPU tensor is an
    error."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_on = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type == "cpu":
                draw_on = torch.device("cpu")
            elif gen_type == "cuda":
                raise ValueError(f"cannot draw a {device} tensor from a {gen_type} generator")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        rows = [
            torch.randn((1,) + shape[1:], generator=g, device=draw_on, dtype=dtype)
            for g in generator[: shape[0]]
        ]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def threshold_scale(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Per-sample scale s of dynamic thresholding (Imagen, arXiv 2205.11487), as diffusers'
    `_threshold_sample` computes it: the `ratio` quantile of |x0| over all but the batch dim,
    clamped to [1, max_value]; (B,) float32 (float64 for float64 x0). The fused step then applies
    clamp(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1)
    return torch.clamp(s, min=1, max=max_value)
