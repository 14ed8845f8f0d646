"""Text-to-image sampling as a whole: a DPM-Solver++ loop with classifier-free guidance, then the
VAE decode, for genext's LatentDiffusionPipeline (genext's U-Net and VAE, guidance fused into the
scheduler step; eager and with the denoising loop compiled), diffusers' StableDiffusionPipeline
with the same weights and latents (PyTorch's SDPA; eager and with its U-Net compiled) and
diffusers' pipeline patched by genext.patch.

CPU: diffusers' tiny pipeline test components, 10 steps. CUDA: Stable Diffusion 1.5's U-Net and
VAE, one 512x512 image in 30 steps at guidance 7.5 with 77 text tokens, with peak memory. The
prompt embeddings are random (the text encoder is not part of the loop being timed). Without
diffusers (and transformers, which its pipeline needs) only genext's rows run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..integrations import patch
from ..models import LatentDiffusionPipeline
from .peer_models import CPU_MODEL_REPS, perturbed_, quiet_cast
from .registry import DTYPE, IMPL, MS, PEAK_MIB, Bench, Case, Column, Config, Timing, device_cases
from .unet import SD15_UNET
from .vae import SD_VAE

# diffusers' tiny StableDiffusionPipeline test components (its pipeline unit tests' models)
TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32,
)
TINY_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
)
DPM_SOLVER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    algorithm_type="dpmsolver++",
    solver_order=2,
    steps_offset=1,
)


@dataclass(frozen=True)
class LDMCase:
    label: str
    unet: dict = field(hash=False)
    vae: dict = field(hash=False)
    size: int  # image side
    tokens: int
    steps: int
    guidance: float = 7.5

    @property
    def name(self) -> str:
        return f"{self.label} {self.size}x{self.size} {self.steps} steps cfg {self.guidance}"


CPU_CASES = [LDMCase("diffusers-tiny", TINY_UNET, TINY_VAE, 64, 77, 10)]
CUDA_CASES = [LDMCase("sd15", SD15_UNET, SD_VAE, 512, 77, 30)]


def _stable_diffusion(unet, vae):
    """diffusers' StableDiffusionPipeline of these components with a DPM-Solver++ scheduler and
    no text encoder; None without diffusers or transformers (which the pipeline needs)."""
    try:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=diffusers.DPMSolverMultistepScheduler(**DPM_SOLVER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except ImportError:
        return None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ldm_inputs(case: LDMCase, dtype: torch.dtype, device: str) -> dict:
    """diffusers' pipeline with perturbed random weights, genext's converted from it (the same
    weights), diffusers' again on patched copies of its U-Net and VAE, the starting latents and
    the prompt embeddings (random, never zeros)."""
    inputs: dict = {"diffusers": None, "genext": None, "patched": None}
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None:
        torch.manual_seed(0)
        unet = perturbed_(diffusers.UNet2DConditionModel(**case.unet), seed=1)
        vae = perturbed_(diffusers.AutoencoderKL(**case.vae), seed=2)
        unet = quiet_cast(unet, device=device, dtype=dtype).eval()
        vae = quiet_cast(vae, device=device, dtype=dtype).eval()
        peer = _stable_diffusion(unet, vae)
        if peer is not None:
            inputs["diffusers"] = peer
            inputs["genext"] = LatentDiffusionPipeline.from_diffusers(peer)
            inputs["patched"] = _stable_diffusion(
                patch(copy.deepcopy(unet)), patch(copy.deepcopy(vae))
            )
    g = torch.Generator().manual_seed(3)
    lat = case.size // 2 ** (len(case.vae["block_out_channels"]) - 1)
    text = case.unet["cross_attention_dim"]
    for name, shape in (
        ("latents", (1, 4, lat, lat)),
        ("cond", (1, case.tokens, text)),
        ("uncond", (1, case.tokens, text)),
    ):
        inputs[name] = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return inputs


def _sample(pipe, case: LDMCase, inputs: dict):
    return pipe(
        prompt_embeds=inputs["cond"],
        negative_prompt_embeds=inputs["uncond"],
        latents=inputs["latents"].clone(),
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        height=case.size,
        width=case.size,
        output_type="pt",
    ).images


def ldm_check(case: LDMCase, dtype: torch.dtype, inputs: dict) -> tuple[bool | None, str]:
    """genext's images against diffusers' from the same latents: max abs difference on [0, 1]
    images below 1e-4 in float32 (the pipeline test's bound); in 16-bit no more than twice
    diffusers' own difference from its float32 run."""
    peer = inputs["diffusers"]
    if peer is None:
        return None, "diffusers' pipeline not available"
    with torch.no_grad():
        ours = _sample(inputs["genext"], case, inputs).float()
        theirs = _sample(peer, case, inputs).float()
    if not torch.isfinite(ours).all():
        return False, "non-finite images"
    diff = (ours - theirs).abs().max().item()
    if dtype == torch.float32:
        return diff < 1e-4, f"max abs {diff:.1e} vs diffusers"
    ref_pipe = _stable_diffusion(
        quiet_cast(copy.deepcopy(peer.unet), dtype=torch.float32),
        quiet_cast(copy.deepcopy(peer.vae), dtype=torch.float32),
    )
    r32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = _sample(ref_pipe, case, r32).float()
    ours_err = (ours - ref).abs().max().item()
    peer_err = (theirs - ref).abs().max().item()
    ok = ours_err <= 2 * peer_err + 1e-3
    return ok, f"max abs vs fp32 {ours_err:.1e} (diffusers {peer_err:.1e})"


def _setup(key: str, case: LDMCase, compiled: bool, cuda: bool):
    def setup(inputs: dict):
        pipe = inputs[key]
        if pipe is None:
            return None
        if compiled and key == "genext":
            pipe = LatentDiffusionPipeline.from_diffusers(inputs["diffusers"])
            pipe.compile_loop("reduce-overhead" if cuda else None)
        elif compiled:
            pipe = _stable_diffusion(torch.compile(pipe.unet, dynamic=False), pipe.vae)

        def run(i):
            with torch.no_grad():
                return _sample(pipe, case, inputs)

        return run

    return setup


def make_case(case: LDMCase, config: Config) -> Case:
    cuda = config.device == "cuda"
    dtype = config.dtype_or(torch.float16 if cuda else torch.float32)
    warmup, reps = (1, 3) if cuda else (1, CPU_MODEL_REPS)
    if config.quick:
        warmup, reps = 1, 1
    rows = [("genext", "genext", False), ("diffusers+patch", "patched", False)]
    rows += [("diffusers", "diffusers", False)]
    if config.compile_models:
        rows += [("genext+compile", "genext", True), ("diffusers+compile", "diffusers", True)]
    timings = tuple(
        Timing(
            label,
            "sample",
            _setup(key, case, compiled, cuda),
            warmup,
            reps,
            peak_memory=cuda,
            shows_check=label == "genext",
            on_error="failed" if compiled else None,
        )
        for label, key, compiled in rows
    )
    return Case(
        case.name,
        dtype,
        timings,
        lambda inputs: ldm_check(case, dtype, inputs),
        inputs=lambda: ldm_inputs(case, dtype, config.device),
    )


def cases(config: Config) -> list[Case]:
    chosen = device_cases(config, CUDA_CASES, CPU_CASES, quick=lambda c: c[:1])
    return [make_case(c, config) for c in chosen]


BENCH = Bench(
    "ldm",
    "text-to-image sampling (DPM-Solver++, guidance, VAE decode): genext's pipeline vs diffusers' "
    "(same weights and latents) vs diffusers patched by genext.patch, eager and compiled",
    cases,
    (Column("ldm case", "case"), DTYPE, IMPL, MS, PEAK_MIB),
)
