"""Training losses on genext's ops, with their peers' interfaces: the contrastive losses of CLIP and
SigLIP (open_clip's ``ClipLoss`` and ``SigLipLoss``), and GAN losses (non-saturating and hinge, R1
and lazy R1, an EMA of the generator's weights)."""

from .contrastive import ClipLoss, SigLipLoss
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
    "EMA",
    "LazyR1",
    "hinge_d_loss",
    "hinge_g_loss",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "r1_penalty",
]
