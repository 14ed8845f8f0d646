"""Latent diffusion (Stable Diffusion's text-to-image loop) on genext's components.

`LatentDiffusionPipeline` = VAE (genext's `AutoencoderKL` or diffusers') + a conditional U-Net with
diffusers' call signature (``unet(sample, t, encoder_hidden_states=...)``) + an optional text
encoder and tokenizer + a genext scheduler. It gives the images of diffusers'
`StableDiffusionPipeline` for the same components, prompt embeddings and latents, with two
differences in how the loop runs:

- classifier-free guidance runs the U-Net once per step on the stacked batch [uncond; cond] and
  hands the 2B prediction to the scheduler's fused step (``step(..., guidance_scale=w)``), which
  combines u + w * (c - u) inside the same kernel as the update (no chunk and combine in Python);
- the scheduler is given the host copy of each timestep and the U-Net a device tensor prepared
  before the loop, so no step reads anything back from the device; `compile_loop` then runs the
  U-Net on the stacked batch under ``torch.compile`` (CUDA graphs with mode="reduce-overhead")
  with the latents kept in one static buffer that the fused step updates in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._config import ModelOutput
from .vae import AutoencoderKL

__all__ = ["LatentDiffusionPipeline", "LatentDiffusionPipelineOutput"]

_SCHEDULER_NAMES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_OWNER = "LatentDiffusionPipeline"

Generator = None | torch.Generator | Sequence[torch.Generator]


class LatentDiffusionPipelineOutput(ModelOutput):
    """What the pipeline returns, as diffusers' ``StableDiffusionPipelineOutput``: ``images`` (a
    list of PIL images, an (N, H, W, C) numpy array, an (N, C, H, W) tensor in [0, 1], or the
    (N, C_latent, h, w) latents) and ``nsfw_content_detected`` (always None: no safety
    checker)."""

    _fields = ("images", "nsfw_content_detected")


def _first_output(out: Any) -> Tensor:
    """The tensor of a module's output: itself, ``.sample`` / ``.last_hidden_state``, or
    ``out[0]`` (diffusers' and transformers' output records, tuples)."""
    if isinstance(out, Tensor):
        return out
    for name in ("sample", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    return out[0]


def _module_dtype(module: Any) -> torch.dtype | None:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.dtype
    return None


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return None


def _randn(
    shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it (so a seeded generator
    gives the same latents in both pipelines): one batch row per generator for a list, on the
    CPU and then moved for a CPU generator and another target device."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if gens is not None and len(gens) == 1:
        generator, gens = gens[0], None
    first = gens[0] if gens else generator
    draw_on = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(
                f"{_OWNER}: cannot draw {device} latents from a {first.device.type} generator"
            )
        draw_on = torch.device("cpu")
    if gens is not None:
        rows = [
            torch.randn((1,) + shape[1:], generator=g, device=draw_on, dtype=dtype)
            for g in gens[: shape[0]]
        ]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def rescale_noise_cfg(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, arXiv 2305.08891, section 3.4): scale the guided
    prediction to the per-sample standard deviation of the conditional one, and mix the two by
    ``guidance_rescale``. guided, cond: (B, ...)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class LatentDiffusionPipeline:
    """Text-to-image latent diffusion, a drop-in for diffusers' ``StableDiffusionPipeline`` (no
    safety checker, no IP-adapter, LoRA or callbacks).

    Args:
        vae: an ``AutoencoderKL`` (genext's or diffusers'); its config gives ``scaling_factor``
            and the latent-to-pixel factor 2 ** (len(block_out_channels) - 1).
        unet: a conditional U-Net called as ``unet(sample (N, C, h, w), timestep (0-dim),
            encoder_hidden_states=(N, L, D))`` whose output is a tensor, has ``.sample`` or
            ``[0]`` (genext's or diffusers' ``UNet2DConditionModel``); its config gives
            ``in_channels`` and ``sample_size``.
        scheduler: a genext scheduler (DDIM, DDPM, DPM-Solver multistep, flow-matching Euler);
            another scheduler with diffusers' API works too, with guidance combined in Python
            when its ``step`` takes no ``guidance_scale``.
        text_encoder: optional; maps token ids (B, L) to embeddings (B, L, D), or to an output
            whose ``last_hidden_state`` / ``[0]`` is that (transformers' ``CLIPTextModel``).
        tokenizer: optional; called like a transformers tokenizer (``tokenizer(texts,
            padding="max_length", max_length=..., truncation=True, return_tensors="pt")``) and
            returning ``input_ids`` (B, L) (attribute or key) or the ids tensor itself.
    """

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        scheduler: Any,
        text_encoder: nn.Module | Callable | None = None,
        tokenizer: Callable | None = None,
    ):
        for name, value in (("vae", vae), ("unet", unet), ("scheduler", scheduler)):
            if value is None:
                raise ValueError(f"{_OWNER}: {name} is required")
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._compiled_unet: Callable | None = None
        self._compile_options: dict[str, Any] | None = None

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, pipe: Any, convert: bool = True) -> LatentDiffusionPipeline:
        """A pipeline from a diffusers pipeline's components (``vae``, ``unet``, ``text_encoder``,
        ``tokenizer``, ``scheduler``), which are not modified.

        The scheduler becomes genext's of the same kind (``from_config`` of its config); DDIM,
        DDPM, DPMSolverMultistep and FlowMatchEulerDiscrete are supported. With ``convert``, the
        VAE becomes genext's ``AutoencoderKL`` and the U-Net genext's ``UNet2DConditionModel``
        (when genext has one), each built from the peer's config and loaded with its state_dict
        (strict), in the peer's dtype and device; otherwise they are used as they are. The text
        encoder and tokenizer are kept as they are."""
        components = getattr(pipe, "components", None)
        if not isinstance(components, dict):
            components = {
                k: getattr(pipe, k, None)
                for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
            }
        scheduler = components.get("scheduler")
        kind = type(scheduler).__name__
        if kind not in _SCHEDULER_NAMES:
            raise ValueError(
                f"{_OWNER}.from_diffusers: scheduler {kind} has no genext counterpart; "
                f"use one of {list(_SCHEDULER_NAMES)} (pipe.scheduler = X.from_config(...))"
            )
        # imported here: genext.samplers needs numpy, which `import genext` does not
        from .. import samplers

        genext_scheduler = getattr(samplers, kind).from_config(scheduler.config)
        vae, unet = components.get("vae"), components.get("unet")
        if convert:
            if not isinstance(vae, AutoencoderKL):
                vae = _convert(AutoencoderKL, vae)
            import genext.models as models  # the package, complete by the time this runs

            unet_cls = getattr(models, "UNet2DConditionModel", None)
            if unet_cls is not None and not isinstance(unet, unet_cls):
                unet = _convert(unet_cls, unet)
        return cls(
            vae=vae,
            unet=unet,
            scheduler=genext_scheduler,
            text_encoder=components.get("text_encoder"),
            tokenizer=components.get("tokenizer"),
        )

    @property
    def components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "unet": self.unet,
            "scheduler": self.scheduler,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
        }

    @property
    def device(self) -> torch.device:
        return _module_device(self.unet) or torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.unet) or torch.float32

    def to(self, *args: Any, **kwargs: Any) -> LatentDiffusionPipeline:
        """Move (and cast) the VAE, U-Net and text encoder, as ``nn.Module.to``."""
        for module in (self.vae, self.unet, self.text_encoder):
            if isinstance(module, nn.Module):
                module.to(*args, **kwargs)
        return self

    # ---- compiled loop ---------------------------------------------------------------------------

    def compile_loop(
        self,
        mode: str | None = None,
        *,
        backend: str | Callable = "inductor",
        fullgraph: bool = False,
        dynamic: bool = False,
    ) -> LatentDiffusionPipeline:
        """Run each denoising step's U-Net call (the stacked [uncond; cond] batch built from the
        static latents, the U-Net, its output) under ``torch.compile(mode=..., backend=...,
        fullgraph=..., dynamic=...)``; mode="reduce-overhead" captures it in a CUDA graph. The
        fused scheduler step stays one eager kernel that writes the new latents into the same
        static buffer: its coefficients are host floats that change every step, which a traced
        step would either bake in (one recompilation per step) or read back from the device.
        Nothing in the loop synchronises with the device. Returns the pipeline."""
        self._compile_options = dict(
            mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic
        )
        self._compiled_unet = torch.compile(self._unet_step, **self._compile_options)
        return self

    def eager_loop(self) -> LatentDiffusionPipeline:
        """Undo `compile_loop`."""
        self._compiled_unet = None
        self._compile_options = None
        return self

    def _unet_step(self, latents: Tensor, t: Tensor, embeds: Tensor, cfg: bool) -> Tensor:
        # the U-Net once on the batch [uncond; cond] (both halves see the same latents)
        model_input = torch.cat([latents, latents]) if cfg else latents
        return _first_output(self.unet(model_input, t, encoder_hidden_states=embeds))

    # ---- prompts ---------------------------------------------------------------------------------

    def _encode_texts(self, texts: list[str], max_length: int, device: torch.device) -> Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )
        if isinstance(tokens, Tensor):
            ids, mask = tokens, None
        else:
            ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens.input_ids
            mask = tokens.get("attention_mask") if hasattr(tokens, "get") else None
        config = getattr(self.text_encoder, "config", None)
        # as diffusers: the mask goes to the encoder only when its config asks for it
        if mask is not None and getattr(config, "use_attention_mask", False):
            out = self.text_encoder(ids.to(device), attention_mask=mask.to(device))
        else:
            out = self.text_encoder(ids.to(device))
        return _first_output(out)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, L, D), the
        second None without guidance. Prompts go through the tokenizer (padded to its
        ``model_max_length``, 77 if it has none) and the text encoder; the negative embeddings
        default to those of the empty prompt (diffusers), or to zeros when there is no text
        encoder and only ``prompt_embeds`` were given."""
        if prompt_embeds is None:
            if self.tokenizer is None or self.text_encoder is None:
                raise ValueError(
                    f"{_OWNER}: prompt needs a tokenizer and a text_encoder; "
                    "pass prompt_embeds instead"
                )
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            max_length = int(getattr(self.tokenizer, "model_max_length", 77) or 77)
            prompt_embeds = self._encode_texts(texts, max_length, device)
        batch = prompt_embeds.shape[0]
        if isinstance(prompt, (str, list)):
            batch = 1 if isinstance(prompt, str) else len(prompt)
        dtype = (
            _module_dtype(self.text_encoder) if self.text_encoder is not None else None
        ) or _module_dtype(self.unet)
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if self.tokenizer is not None and self.text_encoder is not None:
                if negative_prompt is None:
                    negative = [""] * batch
                elif isinstance(negative_prompt, str):
                    negative = [negative_prompt] * batch
                else:
                    negative = list(negative_prompt)
                    if len(negative) != batch:
                        raise ValueError(
                            f"{_OWNER}: negative_prompt has {len(negative)} entries, "
                            f"the prompt batch {batch}"
                        )
                negative_prompt_embeds = self._encode_texts(
                    negative, prompt_embeds.shape[1], device
                )
            elif negative_prompt is not None:
                raise ValueError(
                    f"{_OWNER}: negative_prompt needs a tokenizer and a text_encoder; "
                    "pass negative_prompt_embeds instead"
                )
            else:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)

        def repeat(e: Tensor) -> Tensor:
            return e.repeat_interleave(num_images_per_prompt, dim=0)

        prompt_embeds = repeat(prompt_embeds)
        if do_classifier_free_guidance:
            negative_prompt_embeds = repeat(negative_prompt_embeds.to(dtype=dtype, device=device))
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"{_OWNER}: negative_prompt_embeds must have the shape of prompt_embeds, "
                    f"got {tuple(negative_prompt_embeds.shape)} and {tuple(prompt_embeds.shape)}"
                )
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    # ---- the loop --------------------------------------------------------------------------------

    def prepare_latents(
        self,
        batch_size: int,
        num_channels: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator,
        latents: Tensor | None = None,
    ) -> Tensor:
        """Initial latents (batch, C, height / f, width / f) (f = vae_scale_factor): ``latents``
        or noise drawn from ``generator`` as diffusers draws it, times the scheduler's
        ``init_noise_sigma``."""
        shape = (
            batch_size,
            num_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(
                f"{_OWNER}: generator is a list of {len(generator)} generators for a batch of "
                f"{batch_size} images"
            )
        if latents is None:
            latents = _randn(shape, generator, device, dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"{_OWNER}: latents must have shape {shape}, got {tuple(latents.shape)}"
                )
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def denoise(
        self,
        latents: Tensor,
        prompt_embeds: Tensor,
        negative_prompt_embeds: Tensor | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        generator: Generator = None,
    ) -> Tensor:
        """The denoising loop over the scheduler's current ``timesteps`` (call its
        ``set_timesteps`` first): latents (B, C, h, w) -> denoised latents (B, C, h, w).
        prompt_embeds (B, L, D); negative_prompt_embeds (B, L, D), used when guidance_scale > 1.
        The timesteps are read to the host once, before the first step."""
        scheduler = self.scheduler
        cfg = negative_prompt_embeds is not None and guidance_scale > 1
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        params = inspect.signature(scheduler.step).parameters
        extra: dict[str, Any] = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        fused = cfg and guidance_rescale <= 0 and "guidance_scale" in params
        if fused:
            extra["guidance_scale"] = float(guidance_scale)

        timesteps = scheduler.timesteps
        on_device = timesteps.to(latents.device)
        host = timesteps.to("cpu")
        compiled = self._compiled_unet
        if compiled is not None:
            # one static buffer for the whole loop, updated in place by the fused step
            latents = latents.contiguous().clone()
        for i in range(len(host)):
            t, t_host = on_device[i], host[i]
            if compiled is not None:
                # each call is a new run of the captured graph (its previous outputs are used up)
                torch.compiler.cudagraph_mark_step_begin()
                noise_pred = compiled(scheduler.scale_model_input(latents, t_host), t, embeds, cfg)
            else:
                model_input = torch.cat([latents, latents]) if cfg else latents
                model_input = scheduler.scale_model_input(model_input, t_host)
                noise_pred = _first_output(self.unet(model_input, t, encoder_hidden_states=embeds))
            if cfg and not fused:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
                if guidance_rescale > 0:
                    noise_pred = rescale_noise_cfg(noise_pred, cond, guidance_rescale)
            if compiled is not None and "out" in params:
                scheduler.step(noise_pred, t_host, latents, out=latents, return_dict=False, **extra)
            else:
                latents = scheduler.step(noise_pred, t_host, latents, return_dict=False, **extra)[0]
        return latents

    def decode_latents(
        self, latents: Tensor, output_type: str = "pil", generator: Generator = None
    ) -> Any:
        """Latents (B, C, h, w) -> images: through the VAE (divided by its scaling_factor) and
        diffusers' postprocessing ((x / 2 + 0.5) clamped to [0, 1]; "pt" (B, 3, H, W) tensor,
        "np" (B, H, W, 3) float32 array, "pil" list of images); "latent" returns them as they
        are."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(
                f"{_OWNER}: output_type must be one of {list(_OUTPUT_TYPES)}, got {output_type!r}"
            )
        if output_type == "latent":
            return latents
        config = self.vae.config
        z = latents / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift:
            z = z + shift
        image = _first_output(self.vae.decode(z, return_dict=False, generator=generator))
        image = (image * 0.5 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        import numpy as np

        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return array
        from PIL import Image

        pixels = (array * 255).round().astype(np.uint8)
        if pixels.shape[-1] == 1:
            return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
        return [Image.fromarray(p) for p in pixels]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Generate images, with ``StableDiffusionPipeline.__call__``'s arguments and defaults.

        prompt (B texts, needs tokenizer and text_encoder) or prompt_embeds (B, L, D);
        negative_prompt / negative_prompt_embeds (B, L, D) for guidance (guidance_scale > 1);
        height, width: pixels, multiples of vae_scale_factor (default: the U-Net's sample_size
        times vae_scale_factor); latents: (B * num_images_per_prompt, C, height / f, width / f),
        else drawn from ``generator``; timesteps / sigmas: a custom schedule, for schedulers
        whose set_timesteps takes them; eta: DDIM's noise; guidance_rescale: arXiv 2305.08891
        (guidance is then combined in Python before the step). Returns
        ``LatentDiffusionPipelineOutput(images, None)`` or ``(images, None)``."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(
                f"{_OWNER}: output_type must be one of {list(_OUTPUT_TYPES)}, got {output_type!r}"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(f"{_OWNER}: pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(
                f"{_OWNER}: prompt must be a str or a list of str, got {type(prompt).__name__}"
            )
        if prompt_embeds is not None and prompt_embeds.dim() != 3:
            raise ValueError(
                f"{_OWNER}: prompt_embeds must be (B, L, D), got shape {tuple(prompt_embeds.shape)}"
            )
        if num_images_per_prompt < 1:
            raise ValueError(
                f"{_OWNER}: num_images_per_prompt must be at least 1, got {num_images_per_prompt}"
            )
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{_OWNER}: pass at most one of timesteps and sigmas")
        unet_config = self.unet.config
        if getattr(unet_config, "time_cond_proj_dim", None) is not None:
            raise NotImplementedError(
                f"{_OWNER}: U-Nets with time_cond_proj_dim (guidance-embedding models) are not supported"
            )
        f = self.vae_scale_factor
        if not height or not width:
            size = unet_config.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            height, width = height or h * f, width or w * f
        if height % f or width % f:
            raise ValueError(
                f"{_OWNER}: height and width must be multiples of {f}, got {height} and {width}"
            )

        device = self.device
        cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            cfg,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
        )

        set_timesteps = self.scheduler.set_timesteps
        params = inspect.signature(set_timesteps).parameters
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None and name not in params:
                raise ValueError(
                    f"{_OWNER}: {type(self.scheduler).__name__}.set_timesteps takes no custom {name}"
                )
        if timesteps is not None:
            set_timesteps(timesteps=timesteps, device=device)
        elif sigmas is not None:
            set_timesteps(sigmas=sigmas, device=device)
        else:
            set_timesteps(num_inference_steps, device=device)

        latents = self.prepare_latents(
            prompt_embeds.shape[0],
            unet_config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        latents = self.denoise(
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            generator=generator,
        )
        images = self.decode_latents(latents, output_type, generator)
        if not return_dict:
            return (images, None)
        return LatentDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def _convert(cls: Any, peer: nn.Module) -> nn.Module:
    """genext's ``cls`` built from the peer module's config and loaded with its weights (strict),
    in the peer's dtype and device and training mode."""
    ours = cls.from_config(peer.config)
    ours.load_state_dict(peer.state_dict(), strict=True)
    dtype, device = _module_dtype(peer), _module_device(peer)
    ours.to(device=device, dtype=dtype)
    ours.train(peer.training)
    return ours
