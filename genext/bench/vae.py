"""The VAE as a whole model: genext.models.AutoencoderKL against diffusers' AutoencoderKL with the
same weights, eager and under torch.compile (both models), forward (encode + decode) and forward +
backward on the CPU; decoding SD latents to 512x512 and 1024x1024 on CUDA, with peak memory.

Without diffusers installed only genext's rows run. The check compares genext's output with
diffusers' (float32: 1e-5 relative; 16-bit: no worse than twice diffusers' own error against
the float64 model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import AutoencoderKL
from .peer_models import CPU_MODEL_REPS, check_against_peer, model_timings, perturbed_, quiet_cast
from .registry import (
    DIRECTION,
    DTYPE,
    IMPL,
    MS,
    PEAK_MIB,
    Bench,
    Case,
    Column,
    Config,
    device_cases,
)

# the Stable Diffusion 1.x/2.x VAE
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
# the digits training demo's autoencoder (genext train vae): 1x16x16 images, 4x4x4 latents
DEMO_VAE = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=[32, 64, 64],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=16,
)
# the SD VAE's shape at a quarter of its widths
SD_QUARTER = dict(SD_VAE, block_out_channels=[32, 64, 128, 128])


@dataclass(frozen=True)
class VAECase:
    label: str
    config: dict = field(hash=False)
    batch: int
    size: int  # image side; the latent side is size / 2^(blocks - 1)
    directions: tuple[str, ...]
    tiled: bool = False  # both models with enable_tiling()

    @property
    def name(self) -> str:
        return f"{self.label} {self.batch}x{self.size}x{self.size}"

    @property
    def latent_size(self) -> int:
        return self.size // 2 ** (len(self.config["block_out_channels"]) - 1)


CPU_CASES = [
    VAECase("demo", DEMO_VAE, 64, 16, ("fwd", "f+b")),
    VAECase("sd-quarter", SD_QUARTER, 1, 128, ("fwd", "f+b")),
]
CUDA_CASES = [
    VAECase("sd-decode", SD_VAE, 1, 512, ("decode",)),
    VAECase("sd-decode", SD_VAE, 1, 1024, ("decode",)),
    # a 2048x2048 image decoded in 512-pixel tiles: peak memory bounded by a tile's
    VAECase("sd-decode-tiled", SD_VAE, 1, 2048, ("decode",), tiled=True),
]


def _diffusers_vae(config: dict, device: str, dtype: torch.dtype):
    """diffusers' model on device in dtype; None without diffusers."""
    try:
        import diffusers
    except ImportError:
        return None
    return quiet_cast(diffusers.AutoencoderKL(**config), device=device, dtype=dtype)


def vae_inputs(case: VAECase, dtype: torch.dtype, device: str) -> dict:
    """Both models with the same random weights (perturbed off the 0/1 initial norms), an image
    batch and a latent batch, never zeros."""
    torch.manual_seed(0)
    ours = perturbed_(AutoencoderKL(**case.config)).to(device=device, dtype=dtype).eval()
    peer = _diffusers_vae(case.config, device, dtype)
    if peer is not None:
        peer.load_state_dict(ours.state_dict())
        peer.eval()
    if case.tiled:
        for model in (ours, peer):
            if model is not None:
                model.enable_tiling()
    c = case.config.get("in_channels", 3)
    x = torch.rand(case.batch, c, case.size, case.size, device=device, dtype=dtype) * 2 - 1
    lat = case.latent_size
    z = torch.randn(
        case.batch, case.config["latent_channels"], lat, lat, device=device, dtype=dtype
    )
    return {"genext": ours, "diffusers": peer, "x": x, "z": z}


def _call_for(case: VAECase):
    """The model call a case times: decoding latents, or the whole autoencoder on images."""
    if "decode" in case.directions:
        return lambda model, inputs: model.decode(inputs["z"]).sample
    return lambda model, inputs: model(inputs["x"]).sample


def vae_check(case: VAECase, dtype: torch.dtype, inputs: dict) -> tuple[bool | None, str]:
    # a batch of one for the check: the float64 model runs it too
    small = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return check_against_peer(dtype, inputs["genext"], inputs["diffusers"], _call_for(case), small)


def make_case(case: VAECase, config: Config) -> Case:
    cuda = config.device == "cuda"
    dtype = config.dtype_or(torch.float16 if cuda else torch.float32)
    warmup, reps = (3, 10) if cuda else (1, CPU_MODEL_REPS)
    if config.quick:
        warmup, reps = 1, 2
    timings = model_timings(
        [("genext", "genext"), ("diffusers", "diffusers")],
        case.directions,
        _call_for(case),
        warmup,
        reps,
        cuda,
        config.compile_models,
    )
    return Case(
        case.name,
        dtype,
        timings,
        lambda inputs: vae_check(case, dtype, inputs),
        inputs=lambda: vae_inputs(case, dtype, config.device),
    )


def cases(config: Config) -> list[Case]:
    chosen = device_cases(config, CUDA_CASES, CPU_CASES, quick=lambda c: c[:1])
    return [make_case(c, config) for c in chosen]


BENCH = Bench(
    "vae",
    "AutoencoderKL: genext vs diffusers (same weights), eager and compiled (ms, peak MiB on CUDA)",
    cases,
    (Column("vae case", "case"), DTYPE, DIRECTION, IMPL, MS, PEAK_MIB),
)
