"""Training losses on genext's ops, with their peers' interfaces: the contrastive losses of CLIP and
SigLIP (open_clip's ``ClipLoss`` and ``SigLipLoss``), GAN losses (non-saturating and hinge, R1
and lazy R1, an EMA of the generator's weights), and diffusion training (the denoising objective
for epsilon / v / x0 prediction with min-SNR-gamma weighting, flow matching, condition dropout
for classifier-free guidance)."""

from .contrastive import ClipLoss, SigLipLoss
from .diffusion import (
    DiffusionLoss,
    FlowMatchingLoss,
    compute_snr,
    diffusion_target,
    drop_conditions,
    min_snr_weights,
    noisy_sample,
)
from .gan import (
    EMA,
    LazyR1,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
)

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "DiffusionLoss",
    "FlowMatchingLoss",
    "compute_snr",
    "diffusion_target",
    "drop_conditions",
    "min_snr_weights",
    "noisy_sample",
    "EMA",
    "LazyR1",
    "hinge_d_loss",
    "hinge_g_loss",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "r1_penalty",
]
