"""The registry of trainable tasks: ``genext train <name>`` looks the name up here.

A task (:class:`~genext.train.tasks.base.Task`) builds its model for a dataset, wraps it in an
objective module (the forward that returns the loss, so DDP sees it), names its optimizers and its
training step, evaluates the trained model and draws its pictures. Adding one is a new module with
a ``@register``-ed subclass, imported below. Registered: ``vae``, ``vqvae`` (autoencoders on digits
or photos) and ``gan`` (DCGAN), ``cgan`` (conditional ResNet GAN), ``stylegan`` (StyleGAN2) on
digits, ``ddpm`` (class-conditional pixel diffusion) and ``ldm`` (caption-conditional latent
diffusion) and ``clip`` (contrastive image-caption pairs) on digits, ``lm`` (a character-level
Llama) on Shakespeare, and ``vlm`` (LLaVA-style: the trained CLIP tower and LM joined by a
projector that learns to name the digits).
"""

from __future__ import annotations

# importing a task module registers its tasks
from . import clip, diffusion, gan, lm, vae, vlm, vqvae  # noqa: E402, F401, I001
from .base import Task, TaskDefaults, get_task, register, task_names

__all__ = ["Task", "TaskDefaults", "get_task", "register", "task_names"]
