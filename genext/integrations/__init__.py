"""genext inside other libraries' models: :func:`patch` routes a diffusers model's (or
pipeline's) GroupNorm + SiLU and attention to genext's kernels in place, :func:`unpatch` undoes
it, :func:`patch_report` says what was routed and what was not. diffusers is not imported."""

from . import transformers as transformers  # the attention backend; imports transformers lazily
from .diffusers_patch import GenextAttnProcessor, PatchReport, patch, patch_report, unpatch

__all__ = ["GenextAttnProcessor", "PatchReport", "patch", "patch_report", "unpatch"]
