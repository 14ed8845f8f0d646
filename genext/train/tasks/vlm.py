"""``genext train vlm``: a LLaVA-style vision-language model (:class:`genext.models.
LlavaForConditionalGeneration`) made of two trained runs, the CLIP of ``genext train clip``
(its vision tower) and the character-level Llama of ``genext train lm``, joined by a projector
trained here to make the language model answer "what digit is this?" with the digit's name.

Only the projector (two linear layers, 64 -> 192 -> 192 at the default sizes) is trained; the
vision tower and the language model stay frozen. An example is 16 image tokens (the tower's
second-to-last layer, patches only, through the projector) followed by the characters of
``"what digit is this?\\n"`` and of the answer, e.g. ``"seven\\n"``; the loss is the language
model's cross-entropy on the answer's characters only.

Evaluation: greedy generation on every held-out digit (up to the first newline), exact-match
accuracy of the answer against the digit's name; chance is 10%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...models import LlavaForConditionalGeneration
from ..checkpoint import load_checkpoint
from ..data import Split
from ..text import shakespeare_vocab
from .base import Task, TaskDefaults, register
from .clip import DIGIT_WORDS

__all__ = ["QUESTION", "VLMObjective", "VLMTask", "answer_accuracy", "vlm_batch"]

QUESTION = "what digit is this?\n"
ANSWER_END = "\n"
IGNORE = -100
CHECKPOINT = "checkpoint.safetensors"


def _run_checkpoint(run: str, task: str):
    path = Path(run) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"genext train vlm needs a finished `genext train {task}` run: no checkpoint at {path} "
            f"(train it first, or point --model-config '{{\"{task}_run\": DIR}}' at one)"
        )
    ckpt = load_checkpoint(path)
    if ckpt.meta["config"]["task"] != task:
        raise ValueError(
            f"{path} is a `genext train {ckpt.meta['config']['task']}` run, not {task}"
        )
    return ckpt


def vlm_batch(labels: Tensor, image_tokens: int, image_token_id: int) -> tuple[Tensor, ...]:
    """``(input_ids, attention_mask, labels)`` ``(B, L)``: the image tokens, the question and the
    answer of each digit in ``labels``, right-padded; labels hold the answer's ids only."""
    vocab = shakespeare_vocab()
    prompt = [image_token_id] * image_tokens + vocab.encode(QUESTION).tolist()
    rows = [prompt + vocab.encode(DIGIT_WORDS[d] + ANSWER_END).tolist() for d in labels.tolist()]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        targets[i, len(prompt) : len(r)] = ids[i, len(prompt) : len(r)]
    return ids, mask, targets


class VLMObjective(nn.Module):
    """``forward(x, y, generator)``: the answer's cross-entropy for images ``x`` of digits ``y``."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.model.config
        ids, mask, labels = (
            t.to(x.device) for t in vlm_batch(y, cfg.image_seq_length, cfg.image_token_index)
        )
        loss = self.model(input_ids=ids, pixel_values=x, attention_mask=mask, labels=labels).loss
        return loss, {}


@torch.no_grad()
def answer_accuracy(
    model: LlavaForConditionalGeneration, images: Tensor, labels: Tensor, batch_size: int = 128
) -> tuple[float, list[str]]:
    """Exact-match accuracy of the greedy answers (up to the first newline) to the digits'
    names, and the answers."""
    vocab = shakespeare_vocab()
    cfg = model.config
    device = next(model.parameters()).device
    prompt = [cfg.image_token_index] * cfg.image_seq_length + vocab.encode(QUESTION).tolist()
    newline = int(vocab.encode(ANSWER_END)[0])
    answers: list[str] = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        ids = torch.tensor([prompt] * len(x), device=device)
        out = model.generate(
            ids, pixel_values=x, max_new_tokens=8, eos_token_id=newline, pad_token_id=newline
        )
        for row in out[:, len(prompt) :].tolist():
            answers.append(vocab.decode(row).split(ANSWER_END)[0])
    right = [a == DIGIT_WORDS[d] for a, d in zip(answers, labels.tolist())]
    return sum(right) / max(len(right), 1), answers


@register
class VLMTask(Task):
    name = "vlm"
    datasets = ("digits",)
    defaults = {"digits": TaskDefaults(steps=2000, batch_size=32, lr=3e-3, size=16)}

    def model_config(self, data: Split) -> dict[str, Any]:
        return {"clip_run": "runs/clip-digits", "lm_run": "runs/lm-shakespeare"}

    def build(self, config: dict[str, Any]) -> nn.Module:
        clip = _run_checkpoint(config["clip_run"], "clip")
        lm = _run_checkpoint(config["lm_run"], "lm")
        vision = clip.meta["model_config"]["vision_config"]
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        model = LlavaForConditionalGeneration(
            vision_config={**vision, "model_type": "clip_vision_model"},
            text_config={**lm.meta["model_config"], "model_type": "llama"},
            image_token_index=shakespeare_vocab().unknown_id,  # an id no text produces
            image_seq_length=patches,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        state = {}
        for k, v in clip.model.items():
            if k.startswith("vision_model."):
                state["model.vision_tower." + k[len("vision_model.") :]] = v
        for k, v in lm.model.items():
            state[
                ("model.language_model." + k[len("model.") :]) if k.startswith("model.") else k
            ] = v
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("multi_modal_projector" not in k for k in missing):
            raise RuntimeError(
                f"vlm: the runs' weights do not fit: missing {missing}, unexpected {unexpected}"
            )
        for name, p in model.named_parameters():
            p.requires_grad_("multi_modal_projector" in name)
        return model

    def objective(self, model: nn.Module) -> nn.Module:
        return VLMObjective(model)

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return {"model": torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)}

    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        accuracy, _ = answer_accuracy(model, data.x_test, data.y_test)
        return {"answer_accuracy": accuracy, "chance": 0.1}

    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        return [data.x_test[:12]]

    def row_titles(self) -> list[str]:
        return ["held-out digits (answers in samples.txt)"]

    def text_samples(self, model: nn.Module, data: Split, generator: torch.Generator) -> str:
        _, answers = answer_accuracy(model, data.x_test[:12], data.y_test[:12])
        lines = [
            f"{i}: {DIGIT_WORDS[d]!r} -> {a!r}"
            for i, (d, a) in enumerate(zip(data.y_test[:12].tolist(), answers))
        ]
        return QUESTION.strip() + "\n" + "\n".join(lines) + "\n"
