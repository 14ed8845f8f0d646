"""genext.models.LatentDiffusionPipeline against diffusers' StableDiffusionPipeline built from the
same tiny components with perturbed random weights: the images after the whole loop (DDIM and
DPM-Solver++, with and without classifier-free guidance, every output type, several images per
prompt, generator-drawn latents, a text encoder), that guidance ran the U-Net once per step and
went into the fused step, and that the compiled loop gives the eager loop's images."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

from genext.models import AutoencoderKL, LatentDiffusionPipeline
from genext.samplers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from peer_parity import perturb_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# diffusers' own tiny Stable Diffusion test components (tests/pipelines/stable_diffusion/
# test_stable_diffusion.py, get_dummy_components), at a smaller sample size
UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=2,
)
VAE = dict(
    block_out_channels=[4, 8],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=2,
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
)
SIZE = 16  # pixels: latents of 8 x 8 (the VAE halves once)
STEPS = 10
L, D = 7, 32  # prompt length (odd on purpose), cross-attention width
TOL = 1e-4  # max abs difference of images in [0, 1] after the whole loop (the brief's bound)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tensors are tiny: one thread runs the loops several times faster than two threads
    # contending on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scheduler(kind: str):
    ddim = diffusers.DDIMScheduler(**SCHEDULER)
    if kind == "ddim":
        return ddim
    if kind == "dpm":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            ddim.config, algorithm_type="dpmsolver++"
        )
    if kind == "ddpm":
        return diffusers.DDPMScheduler.from_config(ddim.config)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def _peer(kind: str = "ddim", text_encoder=None, tokenizer=None):
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**UNET), seed=1).eval()
    vae = perturb_(diffusers.AutoencoderKL(**VAE), seed=2).eval()
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(kind),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _embeds(batch: int = 1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, L, D, generator=g), torch.randn(batch, L, D, generator=g)


def _latents(batch: int, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=g)


def _max_abs(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    return (a.double() - b.double()).abs().max().item()


def _run(pipe, **kwargs):
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pt")
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize(
    "kind, guidance",
    [("ddim", 1.0), ("ddim", 7.5), ("dpm", 1.0), ("dpm", 7.5), ("ddpm", 7.5)],
)
def test_images_match_diffusers(kind, guidance):
    peer = _peer(kind)
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    want_kind = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[
        kind
    ]
    assert type(ours.scheduler) is want_kind and isinstance(ours.vae, AutoencoderKL)
    pos, neg = _embeds()

    def args(**kwargs):
        # a fresh generator per run: DDPM draws its step noise from it
        base = dict(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            guidance_scale=guidance,
            latents=_latents(1),
            generator=torch.Generator().manual_seed(11),
        )
        return dict(base, **kwargs)

    want = _run(peer, **args())
    got = _run(ours, **args())
    assert got.shape == want.shape == (1, 3, SIZE, SIZE)
    assert _max_abs(got, want) < TOL
    if guidance > 1:
        # the comparison can fail: guidance moves the images far more than the tolerance
        assert _max_abs(got, _run(ours, **args(guidance_scale=1.0))) > 100 * TOL


def test_custom_timesteps_match_diffusers():
    peer = _peer("dpm")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = _embeds()
    args = dict(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        timesteps=[999, 850, 601, 400, 233, 90, 11],
        latents=_latents(1),
    )
    want, got = _run(peer, **args), _run(ours, **args)
    assert len(ours.scheduler.timesteps) == 7
    assert _max_abs(got, want) < TOL
    ddim = LatentDiffusionPipeline.from_diffusers(_peer("ddim"))
    with pytest.raises(ValueError, match="timesteps"):
        _run(ddim, **args)


@torch.no_grad()
def test_flow_scheduler_matches_a_diffusers_loop():
    """diffusers' StableDiffusionPipeline cannot run its flow-matching scheduler (which has no
    init_noise_sigma), so the reference is the loop written out with diffusers' components."""
    peer = _peer("flow")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    assert type(ours.scheduler) is FlowMatchEulerDiscreteScheduler
    pos, neg = _embeds()
    got = _run(ours, prompt_embeds=pos, negative_prompt_embeds=neg, latents=_latents(1))

    sched, x, embeds = peer.scheduler, _latents(1), torch.cat([neg, pos])
    sched.set_timesteps(STEPS)
    for t in sched.timesteps:
        uncond, cond = peer.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
        x = sched.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
    image = peer.vae.decode(x / peer.vae.config.scaling_factor).sample
    want = (image / 2 + 0.5).clamp(0, 1)
    assert _max_abs(got, want) < TOL


def test_output_types_images_per_prompt_and_generator():
    """Two prompts, two images each, latents drawn from a seeded generator, DDIM with eta > 0
    (noise drawn from the same generator), every output type."""
    peer = _peer("ddim")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = _embeds(batch=2)

    def args(output_type):
        return dict(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            num_images_per_prompt=2,
            eta=0.5,
            generator=torch.Generator().manual_seed(5),
            output_type=output_type,
        )

    for output_type in ("latent", "np", "pt"):
        want, got = _run(peer, **args(output_type)), _run(ours, **args(output_type))
        assert type(got) is type(want) and got.shape == want.shape
        assert got.shape[0] == 4
        assert _max_abs(got, want) < TOL, output_type
    want, got = _run(peer, **args("pil")), _run(ours, **args("pil"))
    assert len(got) == len(want) == 4 and got[0].size == want[0].size == (SIZE, SIZE)
    # 8-bit rounding of values within TOL: at most one level apart
    assert (
        max(_max_abs(np.asarray(a, np.int16), np.asarray(b, np.int16)) for a, b in zip(got, want))
        <= 1
    )
    out = ours(**args("pt"), height=SIZE, width=SIZE, num_inference_steps=2, return_dict=False)
    assert isinstance(out, tuple) and out[1] is None


def test_guidance_rescale_and_default_size_match_diffusers():
    peer = _peer("dpm")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = _embeds()
    # no height/width: the U-Net's sample_size times the VAE factor, as diffusers
    args = dict(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        guidance_rescale=0.7,
        num_inference_steps=STEPS,
        output_type="pt",
        latents=_latents(1),
    )
    want, got = peer(**args).images, ours(**args).images
    assert got.shape == (1, 3, SIZE, SIZE)
    assert _max_abs(got, want) < TOL


def test_guidance_runs_the_unet_once_per_step_in_the_fused_step():
    peer = _peer("ddim")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    batches: list[int] = []
    hook = ours.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    scales: list = []
    step = ours.scheduler.step

    @functools.wraps(step)  # keeps step's signature, which the pipeline inspects
    def recording_step(*args, **kwargs):
        scales.append(kwargs.get("guidance_scale"))
        return step(*args, **kwargs)

    ours.scheduler.step = recording_step
    pos, neg = _embeds()
    try:
        _run(ours, prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=7.5)
    finally:
        hook.remove()
    assert batches == [2] * STEPS  # one call per step, on [uncond; cond]
    assert scales == [7.5] * STEPS


class WordTokenizer:
    """A deterministic word-level tokenizer with transformers' calling convention (what diffusers'
    pipeline calls): words -> ids 3 .. vocab-1 by their bytes, wrapped in bos 0 / eos 2, padded
    with 1 to max_length or the longest text."""

    model_max_length = L
    added_tokens_encoder: dict = {}

    def __init__(self, vocab_size: int = 50):
        self.vocab_size = vocab_size

    def tokenize(self, text: str) -> list[str]:
        return text.split()

    def _ids(self, text: str) -> list[int]:
        words = [3 + sum(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return [0] + words + [2]

    def __call__(
        self, texts, padding="longest", max_length=None, truncation=False, return_tensors="pt"
    ):
        rows = [self._ids(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if truncation and max_length is not None:
            rows = [r[: max_length - 1] + [2] if len(r) > max_length else r for r in rows]
        n = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.tensor([r + [1] * (n - len(r)) for r in rows])
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": (ids != 1).long()})

    def batch_decode(self, ids):
        return [" ".join(map(str, row)) for row in ids.tolist()]


def test_text_encoder_path_matches_diffusers():
    torch.manual_seed(6)
    config = transformers.CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=D,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=50,
    )
    encoder = perturb_(transformers.CLIPTextModel(config), seed=7).eval()
    peer = _peer("ddim", text_encoder=encoder, tokenizer=WordTokenizer())
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    assert ours.text_encoder is encoder
    prompts = ["a red cat", "two dogs on grass"]
    for negative in (None, ["blurry", "dark photo"]):
        args = dict(prompt=prompts, negative_prompt=negative, latents=_latents(2))
        want, got = _run(peer, **args), _run(ours, **args)
        assert _max_abs(got, want) < TOL
    # the prompt reaches the images: another prompt, other images
    other = _run(ours, prompt=["a blue cat", "two dogs on grass"], latents=_latents(2))
    assert _max_abs(other[0], got[0]) > 100 * TOL


@pytest.mark.slow  # the quick profile compiles the patched U-Net (tests/integrations/test_patch.py)
def test_compiled_loop_matches_eager(avx2_routing):
    # the AVX2 machines' attention rule: eager keeps these narrow heads on genext's kernel, as
    # the compiled graph does (an AMX machine's eager calls run PyTorch's SDPA)
    peer = _peer("dpm")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = _embeds()
    args = dict(
        prompt_embeds=pos, negative_prompt_embeds=neg, latents=_latents(1), num_inference_steps=4
    )
    eager = _run(ours, **args)
    # aot_eager traces what inductor would compile, at a fraction of the compile time on CPU
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    ours.compile_loop(backend="aot_eager")
    compiled = _run(ours, **args)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the U-Net did run compiled
    # other timesteps, other latents, more steps: the same graphs (the timestep is a tensor input)
    _run(ours, **dict(args, latents=_latents(1, seed=8), num_inference_steps=6))
    assert counters["stats"]["unique_graphs"] == graphs
    ours.eager_loop()
    assert _max_abs(compiled, eager) < 1e-6


@pytest.mark.cuda
def test_cuda_graph_loop_matches_eager_without_host_sync_per_step():
    peer = _peer("dpm")
    peer.to("cuda")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = (e.cuda() for e in _embeds())
    args = dict(prompt_embeds=pos, negative_prompt_embeds=neg, latents=_latents(1).cuda())
    want = _run(peer, **args)
    eager = _run(ours, **args)
    assert _max_abs(eager, want) < TOL
    torch._dynamo.reset()
    ours.compile_loop(mode="reduce-overhead")
    _run(ours, **args)  # warm-up and capture
    got = _run(ours, **args)
    assert _max_abs(got, eager) < TOL

    def syncs(steps: int) -> int:
        ours.scheduler.set_timesteps(steps, device="cuda")
        latents = ours.prepare_latents(
            1, 4, SIZE, SIZE, torch.float32, pos.device, None, args["latents"]
        )
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ours.denoise(latents, pos, neg, guidance_scale=7.5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    # the schedule's one read to the host before the loop, whatever the number of steps
    assert syncs(4) == syncs(12) <= 1


def test_errors_name_the_argument():
    peer = _peer("ddim")
    ours = LatentDiffusionPipeline.from_diffusers(peer)
    pos, neg = _embeds()
    with pytest.raises(ValueError, match="output_type"):
        ours(prompt_embeds=pos, output_type="jpeg")
    with pytest.raises(ValueError, match="tokenizer"):
        ours(prompt="a cat")
    with pytest.raises(ValueError, match="height"):
        ours(prompt_embeds=pos, height=15, width=16)
    peer.scheduler = diffusers.EulerDiscreteScheduler.from_config(peer.scheduler.config)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        LatentDiffusionPipeline.from_diffusers(peer)


def test_from_diffusers_convert_false_keeps_the_modules():
    peer = _peer("ddim")
    ours = LatentDiffusionPipeline.from_diffusers(peer, convert=False)
    assert ours.vae is peer.vae and ours.unet is peer.unet
    assert isinstance(ours.scheduler, DDIMScheduler)
    # without guidance and without text encoder the negative embeddings are not needed
    pos, _ = _embeds()
    args = dict(prompt_embeds=pos, guidance_scale=1.0, latents=_latents(1))
    assert _max_abs(_run(ours, **args), _run(peer, **args)) < TOL
    # with guidance and no text encoder the negative embeddings must be given (diffusers would
    # need a tokenizer to encode the empty prompt)
    args = dict(prompt_embeds=pos, guidance_scale=5.0, latents=_latents(1))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ours(**args)
    # and a negative prompt together with negative embeddings is an error, as in diffusers
    with pytest.raises(ValueError, match="not both"):
        ours(**args, negative_prompt="blurry", negative_prompt_embeds=pos)
