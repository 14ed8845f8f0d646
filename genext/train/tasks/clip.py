"""``genext train clip``: a small CLIP (:class:`genext.models.CLIPModel`) on the digits and
generated captions ("a handwritten seven"), trained with :class:`genext.losses.ClipLoss`.

Captions: one of three templates per image (drawn from the run's generator) with the digit's
word, tokenized by open_clip's CLIP tokenizer (its BPE vocabulary ships in the package). Several
images of a batch share a digit, so some of the contrastive loss's negatives are true matches: the
loss cannot reach zero, which does not stop the towers from aligning.

Evaluation on the held-out digits:
- zero-shot accuracy: each class embedded from the three training templates (the mean of the
  normalised text embeddings, renormalised) and, apart, from a template never seen in training;
  an image is classified by its nearest class embedding. Chance is 10%.
- linear probe: a logistic regression on the normalised image embeddings of the training digits,
  and the same on the raw pixels, for scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...losses import ClipLoss
from ...models import CLIPModel
from ...models.clip import zero_shot_classifier
from .._deps import require
from ..data import Split, to_digit_scale
from .base import Task, TaskDefaults, register

__all__ = ["CLIPObjective", "CLIPTask", "clip_tokenizer", "digit_captions"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {}", "the digit {}", "a {} written by hand")
UNSEEN_TEMPLATE = "a picture of the number {}"
CONTEXT = 16  # tokens per caption: start, at most 14 words' tokens, end


def clip_tokenizer():
    """open_clip's CLIP tokenizer at this task's context length: texts -> ``(B, CONTEXT)`` int64
    (start token, BPE tokens, end token 49407 (the largest id), zeros)."""
    tokenizer = require("open_clip").get_tokenizer("ViT-B-32")

    def tokenize(texts: list[str]) -> Tensor:
        return tokenizer(texts, context_length=CONTEXT)

    tokenize.vocab_size = 49408
    return tokenize


def digit_captions(labels: Tensor, generator: torch.Generator | None = None) -> list[str]:
    """A caption per label: a template drawn by ``generator`` (the first when None)."""
    if generator is None:
        which = [0] * len(labels)
    else:
        which = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    return [TEMPLATES[k].format(DIGIT_WORDS[d]) for k, d in zip(which, labels.tolist())]


class CLIPObjective(nn.Module):
    """``forward(x, y, generator)``: ClipLoss between the images ``x`` and captions of labels
    ``y`` (templates drawn from ``generator``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = ClipLoss()
        self.tokenize = clip_tokenizer()

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ids = self.tokenize(digit_captions(y, generator)).to(x.device)
        image = F.normalize(self.model.get_image_features(x), dim=-1)
        text = F.normalize(self.model.get_text_features(ids), dim=-1)
        scale = self.model.logit_scale.exp()
        loss = self.loss(image, text, scale)
        return loss, {"logit_scale": scale.detach()}


@torch.no_grad()
def _image_embeddings(model: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    device = next(model.parameters()).device
    parts = [
        F.normalize(model.get_image_features(x[i : i + batch].to(device)), dim=-1)
        for i in range(0, len(x), batch)
    ]
    return torch.cat(parts).float().cpu()


def _probe_accuracy(train: np.ndarray, y_train: Tensor, test: np.ndarray, y_test: Tensor) -> float:
    linear_model = require("sklearn.linear_model")
    clf = linear_model.LogisticRegression(max_iter=2000)
    clf.fit(train, y_train.numpy())
    return float((clf.predict(test) == y_test.numpy()).mean())


@register
class CLIPTask(Task):
    name = "clip"
    datasets = ("digits",)
    defaults = {"digits": TaskDefaults(steps=1500, batch_size=64, lr=1e-3, size=16)}

    def model_config(self, data: Split) -> dict[str, Any]:
        c, h, _ = data.image_shape
        width = 64
        return {
            "projection_dim": 32,
            "logit_scale_init_value": 2.6592,
            "vision_config": {
                "image_size": h,
                "patch_size": 4,
                "num_channels": c,
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "hidden_act": "quick_gelu",
            },
            "text_config": {
                "vocab_size": 49408,
                "max_position_embeddings": CONTEXT,
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "hidden_act": "quick_gelu",
                "eos_token_id": 2,  # pool at the largest id: open_clip's end token
            },
        }

    def build(self, config: dict[str, Any]) -> nn.Module:
        return CLIPModel(config)

    def objective(self, model: nn.Module) -> nn.Module:
        return CLIPObjective(model)

    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        tokenize = clip_tokenizer()
        images = _image_embeddings(model, data.x_test)
        metrics: dict[str, float] = {"chance": 0.1}
        for name, templates in (("zero_shot", TEMPLATES), ("zero_shot_unseen", (UNSEEN_TEMPLATE,))):
            classes = zero_shot_classifier(model, tokenize, list(DIGIT_WORDS), list(templates))
            pred = (images @ classes.float().cpu().T).argmax(1)
            metrics[f"{name}_accuracy"] = float((pred == data.y_test).float().mean())
        train = _image_embeddings(model, data.x_train)
        metrics["linear_probe_accuracy"] = _probe_accuracy(
            train.numpy(), data.y_train, images.numpy(), data.y_test
        )
        metrics["pixel_probe_accuracy"] = _probe_accuracy(
            to_digit_scale(data.x_train), data.y_train, to_digit_scale(data.x_test), data.y_test
        )
        return metrics
