"""Whole generative models assembled from genext's layers: one file per family.

What goes where: a model file holds a family's config handling, blocks and model classes
(``vae.py``, ``vqvae.py``, ``gan.py``, ``unet.py``, ``dit.py``, ``clip.py``, ``llama.py``,
``gpt2.py``); blocks that several families share (ResNet block on ``GroupNormSiLU``, down/upsample,
attention and transformer blocks, timestep embedding) live in ``_blocks.py``; composites (latent
diffusion: VAE + U-Net + text encoder + scheduler; a LLaVA-style VLM) import the components, never
the reverse. Models take their peer's config (diffusers, transformers, open_clip) and load the
peer's ``state_dict`` without renaming.

Imports point down only: a model may use :mod:`genext.nn`, :mod:`genext.losses`,
:mod:`genext.samplers` and :mod:`genext.ops`, none of which may import a model;
:mod:`genext.reference` and :mod:`genext.bench` are never imported by library code.
"""

from ._generation import GenerationMixin, TextStreamer
from .clip import (
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from .dit import DiT, DiTTransformer2DModel, VideoDiT
from .flamingo import FlamingoForCausalLM
from .gan import (
    ConditionalGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ProjectionDiscriminator,
    weights_init,
)
from .gpt2 import GPT2LMHeadModel, GPT2Model
from .ldm import LatentDiffusionPipeline, LatentDiffusionPipelineOutput
from .llama import (
    CausalLMOutput,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
)
from .llava import LlavaForConditionalGeneration
from .stylegan import StyleGAN2Discriminator, StyleGAN2Generator
from .unet import UNet2DConditionModel, UNet2DModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution
from .vqvae import VQModel

__all__ = [
    "AutoencoderKL",
    "CLIPModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CausalLMOutput",
    "ConditionalGenerator",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DiT",
    "DiTTransformer2DModel",
    "DiagonalGaussianDistribution",
    "FlamingoForCausalLM",
    "GPT2LMHeadModel",
    "GPT2Model",
    "GenerationMixin",
    "LatentDiffusionPipeline",
    "LatentDiffusionPipelineOutput",
    "LlamaForCausalLM",
    "LlavaForConditionalGeneration",
    "MistralForCausalLM",
    "ProjectionDiscriminator",
    "Qwen2ForCausalLM",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "TextStreamer",
    "UNet2DConditionModel",
    "UNet2DModel",
    "VQModel",
    "VideoDiT",
    "weights_init",
]
