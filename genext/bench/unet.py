"""The conditional U-Net as a whole model: one denoising step (the U-Net on a classifier-free
guidance batch of latents with text embeddings) and a training step (forward + backward), for
genext.models.UNet2DConditionModel, diffusers' UNet2DConditionModel with the same weights, and
diffusers' model with genext's layers patched in (genext.patch); eager and under torch.compile.

CPU: diffusers' own tiny test configuration and Stable Diffusion 1.5's layout at an eighth of its
widths (heads of dim 40/80/160, as SD 1.5's). CUDA: SD 1.5's U-Net (320/640/1280/1280, 8 heads,
768-dim text) on 2x4x64x64 latents (a 512x512 image with guidance) and 77 text tokens, with peak
memory. Without diffusers only genext's rows run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..integrations import patch
from ..models import UNet2DConditionModel
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

# Stable Diffusion 1.5's U-Net (diffusers' config of runwayml/stable-diffusion-v1-5, unet/)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    attention_head_dim=8,  # diffusers' legacy name: the number of heads (so dims 40/80/160)
    cross_attention_dim=768,
    norm_num_groups=32,
)
# SD 1.5's layout at an eighth of its widths, one head per attention: head dims 40/80/160
SD15_EIGHTH = dict(
    SD15_UNET, block_out_channels=[40, 80, 160, 160], attention_head_dim=1, norm_num_groups=8
)
# diffusers' tiny test configuration of UNet2DConditionModel (its unit tests' model)
DIFFUSERS_TINY = dict(
    block_out_channels=[4, 8],
    norm_num_groups=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=8,
    attention_head_dim=2,
    out_channels=4,
    in_channels=4,
    layers_per_block=1,
    sample_size=16,
)


@dataclass(frozen=True)
class UNetCase:
    label: str
    config: dict = field(hash=False)
    batch: int  # latents per step: twice the images with classifier-free guidance
    size: int  # latent side
    tokens: int  # text tokens per prompt
    directions: tuple[str, ...] = ("step", "f+b")

    @property
    def name(self) -> str:
        return f"{self.label} {self.batch}x{self.size}x{self.size} {self.tokens} tok"


CPU_CASES = [
    UNetCase("diffusers-tiny", DIFFUSERS_TINY, 4, 16, 4),
    UNetCase("sd15-eighth", SD15_EIGHTH, 2, 32, 77),
]
CUDA_CASES = [UNetCase("sd15", SD15_UNET, 2, 64, 77)]


def _diffusers_unet(config: dict, device: str, dtype: torch.dtype):
    """diffusers' model on device in dtype; None without diffusers."""
    try:
        import diffusers
    except ImportError:
        return None
    return quiet_cast(diffusers.UNet2DConditionModel(**config), device=device, dtype=dtype)


def unet_inputs(case: UNetCase, dtype: torch.dtype, device: str) -> dict:
    """genext's model, diffusers' and a patched copy of diffusers' with the same random weights
    (perturbed off the 0/1 initial norms), noisy latents, a timestep per latent and text
    embeddings, never zeros."""
    torch.manual_seed(0)
    ours = perturbed_(UNet2DConditionModel(**case.config)).to(device=device, dtype=dtype).eval()
    peer = _diffusers_unet(case.config, device, dtype)
    patched = None
    if peer is not None:
        peer.load_state_dict(ours.state_dict())
        peer.eval()
        patched = patch(copy.deepcopy(peer))
    c, s = case.config.get("in_channels", 4), case.size
    return {
        "genext": ours,
        "diffusers": peer,
        "patched": patched,
        "x": torch.randn(case.batch, c, s, s, device=device, dtype=dtype),
        "t": torch.randint(1, 1000, (case.batch,), device=device),
        "text": torch.randn(
            case.batch, case.tokens, case.config["cross_attention_dim"], device=device, dtype=dtype
        ),
    }


def _call(model, inputs: dict):
    return model(inputs["x"], inputs["t"], encoder_hidden_states=inputs["text"]).sample


def unet_check(case: UNetCase, dtype: torch.dtype, inputs: dict) -> tuple[bool | None, str]:
    """genext's model and the patched diffusers model, each against diffusers' (two latents: the
    16-bit check runs diffusers' model in float64 too)."""
    small = {k: (v[:2] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    peer = inputs["diffusers"]
    ok, note = check_against_peer(dtype, inputs["genext"], peer, _call, small)
    if inputs["patched"] is None:
        return ok, note
    ok_p, note_p = check_against_peer(dtype, inputs["patched"], peer, _call, small)
    return bool(ok and ok_p), f"{note}; patched: {note_p}"


def make_case(case: UNetCase, config: Config) -> Case:
    cuda = config.device == "cuda"
    dtype = config.dtype_or(torch.float16 if cuda else torch.float32)
    warmup, reps = (3, 10) if cuda else (1, CPU_MODEL_REPS)
    if config.quick:
        warmup, reps = 1, 2
    timings = model_timings(
        [("genext", "genext"), ("diffusers+patch", "patched"), ("diffusers", "diffusers")],
        case.directions,
        _call,
        warmup,
        reps,
        cuda,
        config.compile_models,
    )
    return Case(
        case.name,
        dtype,
        timings,
        lambda inputs: unet_check(case, dtype, inputs),
        inputs=lambda: unet_inputs(case, dtype, config.device),
    )


def cases(config: Config) -> list[Case]:
    chosen = device_cases(config, CUDA_CASES, CPU_CASES, quick=lambda c: c[:1])
    return [make_case(c, config) for c in chosen]


BENCH = Bench(
    "unet",
    "UNet2DConditionModel: genext vs diffusers (same weights) vs diffusers patched by genext.patch, "
    "eager and compiled (ms, peak MiB on CUDA)",
    cases,
    (Column("unet case", "case"), DTYPE, DIRECTION, IMPL, MS, PEAK_MIB),
)
