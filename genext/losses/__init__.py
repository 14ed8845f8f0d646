"""Training losses on genext's ops, with their peers' interfaces: the contrastive losses of CLIP and
SigLIP (open_clip's ``ClipLoss`` and ``SigLipLoss``)."""

from .contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
