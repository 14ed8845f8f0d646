"""Evaluation on held-out data: reusable by every demo (autoencoders now, GANs later).

- :class:`DigitClassifier`: an RBF support-vector classifier fitted on the real training digits;
  its accuracy on generated or reconstructed digits says whether they still read as the digit,
  and its one-vs-one decision values (45 per image) are the feature space of the Frechet distance.
- :func:`frechet_distance`: the Frechet distance between two Gaussians,
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (FID's formula), with the matrix square root
  from ``scipy.linalg.sqrtm``. :func:`digit_fid` applies it to classifier features; Inception
  weights would need a download, and an Inception network knows nothing of 8x8 digits anyway.
  Report it beside :func:`digit_fid_floor`, the distance between the real training and held-out
  digits: no model can be expected to get below that sampling noise.
- :func:`pca_mse`: the linear baseline for an autoencoder with k latent dimensions.
- :func:`codebook_stats`: a VQ codebook's perplexity and usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ._deps import require
from .data import digits_split, to_digit_scale

__all__ = [
    "DigitClassifier",
    "codebook_stats",
    "digit_classifier",
    "digit_fid",
    "digit_fid_floor",
    "frechet_distance",
    "gaussian_stats",
    "mse",
    "pca_mse",
    "pca_reconstruct",
]

# RBF width for pixels in [-1, 1]: the usual gamma=0.001 for the 0..16 scale, times 8^2
SVC_GAMMA = 0.064
SVC_C = 10.0


@dataclass
class DigitClassifier:
    """An SVC fitted on 8x8 digits in [-1, 1]; accepts any ``(N, 1, H, W)`` tensor (larger images
    are area-averaged back to 8x8)."""

    svc: object

    def predict(self, images: Tensor) -> np.ndarray:
        """Predicted labels ``(N,)``."""
        return self.svc.predict(to_digit_scale(images))

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` classified as their ``labels``."""
        return float(np.mean(self.predict(images) == labels.cpu().numpy()))

    def features(self, images: Tensor) -> np.ndarray:
        """One-vs-one decision values ``(N, 45)``: the feature space of :func:`digit_fid`."""
        return self.svc.decision_function(to_digit_scale(images))


@lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The classifier fitted on the real training split (cached: it is the same every call)."""
    svm = require("sklearn.svm")
    split = digits_split()
    svc = svm.SVC(C=SVC_C, gamma=SVC_GAMMA, decision_function_shape="ovo")
    svc.fit(to_digit_scale(split.x_train), split.y_train.numpy())
    return DigitClassifier(svc)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, rows are samples) of ``(N, D)``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. When the product
    is singular enough that ``sqrtm`` returns non-finite values, ``eps`` is added to both
    diagonals (the fix FID implementations use); a tiny imaginary part from rounding is dropped.
    """
    linalg = require("scipy.linalg")
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"frechet_distance: shapes differ: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}"
        )
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def digit_fid(
    images: Tensor | np.ndarray, reference: Tensor | np.ndarray, clf: DigitClassifier | None = None
) -> float:
    """Frechet distance between two sets of digit images (or their precomputed ``(N, 45)``
    features) in the digit classifier's feature space."""
    clf = clf or digit_classifier()
    fa, fb = (clf.features(a) if isinstance(a, Tensor) else a for a in (images, reference))
    return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))


def digit_fid_floor(clf: DigitClassifier | None = None) -> float:
    """:func:`digit_fid` of the real training split against the real held-out split."""
    split = digits_split()
    return digit_fid(split.x_train, split.x_test, clf)


def mse(a: Tensor, b: Tensor) -> float:
    """Mean squared error over all elements (float64)."""
    return float(torch.mean((a.double() - b.double()) ** 2))


def pca_reconstruct(x_train: Tensor, x_test: Tensor, k: int) -> Tensor:
    """``x_test`` through a ``k``-component PCA fitted on ``x_train``: the centred test rows
    projected on the top-k principal directions and back; same shape as ``x_test``, float64."""
    decomposition = require("sklearn.decomposition")
    a = x_train.reshape(len(x_train), -1).double().cpu().numpy()
    b = x_test.reshape(len(x_test), -1).double().cpu().numpy()
    if not 0 < k <= min(a.shape):
        raise ValueError(f"pca: k must be in 1..{min(a.shape)}, got {k}")
    pca = decomposition.PCA(n_components=k, svd_solver="full").fit(a)
    return torch.from_numpy(pca.inverse_transform(pca.transform(b))).reshape(x_test.shape)


def pca_mse(x_train: Tensor, x_test: Tensor, k: int) -> float:
    """Held-out MSE (mean over all elements) of :func:`pca_reconstruct`: the linear baseline of
    an autoencoder with ``k`` latent dimensions."""
    return mse(pca_reconstruct(x_train, x_test, k), x_test)


def codebook_stats(indices: Tensor, num_codes: int) -> dict[str, float]:
    """Perplexity ``exp(-sum p log p)`` of the code frequencies (``num_codes`` when all codes are
    used equally, 1 when one code takes everything) and usage (fraction of codes used at all)."""
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=num_codes).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        "perplexity": float(np.exp(entropy)),
        "usage": float((counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
    }
