"""``genext train lm``: a character-level Llama (:class:`genext.models.LlamaForCausalLM`) on
Shakespeare's plays, one play held out (:mod:`genext.train.text`).

Training: next-character cross-entropy on windows of ``size`` + 1 characters (``--size`` is the
context length), AdamW with weight decay on the matrices only, a linear warm-up then a cosine decay
to a tenth of the peak rate at the last step. The loss is logged in nats and as bits per character.

Evaluation: bits per character on the whole held-out play, every character after the first
predicted once, from at least half a context of the text before it (sliding windows moving half a
context at a time), against an interpolated Kneser-Ney 4-gram model fitted on the same training
plays, the classic count-based baseline. ``samples.txt`` holds text sampled from the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Split
from ..factory import causal_lm
from ..text import HELD_OUT_PLAY, kneser_ney_bpc, shakespeare_split, shakespeare_vocab
from .base import WARMUP_STEPS, Task, TaskDefaults, register

__all__ = ["LMObjective", "LMTask", "generate_windowed", "heldout_bpc", "init_weights"]

LN2 = math.log(2.0)
MIN_LR_FACTOR = 0.1
SAMPLE_PROMPTS = ("MACBETH\n", "First Witch\n")
SAMPLE_CHARS = 400
SAMPLE_TEMPERATURE = 0.8


class LMObjective(nn.Module):
    """``forward(x, y, generator)``: the mean next-character cross-entropy of windows ``x``
    ``(B, L + 1)`` (``y`` and ``generator`` unused)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.model(input_ids=x, labels=x).loss
        return loss, {"bits_per_char": loss.detach() / LN2}


INIT_STD = 0.02


@torch.no_grad()
def init_weights(model: nn.Module, num_layers: int, std: float = INIT_STD) -> None:
    """GPT-2's initialisation for training from scratch: N(0, std) for every linear and
    embedding weight, zero biases, and the projections that write into the residual stream
    (attention ``o_proj``, MLP ``down_proj``) scaled by 1 / sqrt(2 * layers) so the stream's
    variance does not grow with depth. (PyTorch's defaults give the tied embedding N(0, 1), whose
    logits start out hugely confident.)"""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("o_proj", "down_proj"))
            module.weight.normal_(0.0, std / math.sqrt(2 * num_layers) if residual else std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


@torch.no_grad()
def heldout_bpc(model: nn.Module, ids: Tensor, context: int, batch_size: int = 32) -> float:
    """Bits per character of ``model`` on ``ids`` ``(T,)``: every position after the first is
    predicted once, inside windows of ``context`` characters that start every ``context // 2``
    characters, from at least ``context // 2`` characters before it (all before it in the first
    window)."""
    if context < 2:
        raise ValueError(
            f"heldout_bpc: context must be at least 2 (a window of one character "
            f"predicts nothing inside it), got {context}"
        )
    if len(ids) < 2:
        raise ValueError(f"heldout_bpc: ids must hold at least 2 characters, got {len(ids)}")
    device = next(model.parameters()).device
    t = len(ids)
    stride = max(1, context // 2)
    starts, first = [], []  # window start, first scored position in it
    pos = 1
    s = 0
    while pos < t:
        s = min(s, max(0, t - context))
        starts.append(s)
        first.append(pos)
        pos = min(t, s + context)
        s += stride
    nats = 0.0
    for i in range(0, len(starts), batch_size):
        group = list(range(i, min(i + batch_size, len(starts))))
        width = min(context, t)
        windows = torch.stack([ids[starts[j] : starts[j] + width] for j in group]).to(device)
        logp = torch.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
        for row, j in enumerate(group):
            lo, hi = (
                first[j] - starts[j],
                min(width, (first[j + 1] if j + 1 < len(first) else t) - starts[j]),
            )
            targets = windows[row, lo:hi]
            nats -= logp[row, lo - 1 : hi - 1].gather(1, targets[:, None]).sum().item()
    return nats / (t - 1) / LN2


class _ChunkStreamer:
    """Hands one streamer the new tokens of several ``generate`` calls (each call's first put,
    its prompt, is dropped: the caller puts the whole prompt once) and no ``end``."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.prompt_next = True

    def put(self, value: Tensor) -> None:
        if self.prompt_next:
            self.prompt_next = False
            return
        self.streamer.put(value)

    def end(self) -> None:
        self.prompt_next = True


def generate_windowed(
    model: nn.Module, ids: Tensor, max_new_tokens: int, context: int, streamer: Any = None, **kw
) -> Tensor:
    """``model.generate`` for text longer than the context the model was trained on (its
    positions past ``context`` were never seen): in chunks, each re-prefilling the last
    ``context // 2`` tokens and adding up to ``context - context // 2``, so every token is
    predicted from at least half a context (nanoGPT crops to the context at every token; this is
    the same idea at a chunk's granularity, with the KV cache inside a chunk). ``ids`` ``(1,
    L)``; ``kw`` are ``generate``'s sampling arguments. Returns ``(1, L + max_new_tokens)``."""
    keep = max(1, context // 2)
    chunks = None
    if streamer is not None:
        streamer.put(ids.cpu())
        chunks = _ChunkStreamer(streamer)
    out = ids
    left = max_new_tokens
    while left > 0:
        prompt = out if out.shape[1] < context else out[:, -keep:]
        n = min(left, context - prompt.shape[1])
        new = model.generate(prompt, max_new_tokens=n, streamer=chunks, **kw)[:, prompt.shape[1] :]
        out = torch.cat([out, new], dim=1)
        left -= new.shape[1]
        if new.shape[1] < n:  # stopped early (an EOS)
            break
    if streamer is not None:
        streamer.end()
    return out


@register
class LMTask(Task):
    name = "lm"
    datasets = ("shakespeare",)
    defaults = {"shakespeare": TaskDefaults(steps=1200, batch_size=32, lr=3e-3, size=64)}

    def model_config(self, data: Split) -> dict[str, Any]:
        context = data.x_train.shape[1] - 1
        return {
            "vocab_size": len(shakespeare_vocab()),
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "max_position_embeddings": max(context + 1, 2048),
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        }

    def build(self, config: dict[str, Any]) -> nn.Module:
        model = causal_lm(**config)
        init_weights(model, config["num_hidden_layers"])
        return model

    def objective(self, model: nn.Module) -> nn.Module:
        return LMObjective(model)

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        return {"model": torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))}

    def lr_factor(self, step: int, steps: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        # 0 at the warm-up's last step (factor 1), 1 at the run's last step (steps - 1)
        progress = min(1.0, (step - WARMUP_STEPS + 1) / max(1, steps - WARMUP_STEPS))
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))

    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        context = data.x_train.shape[1] - 1
        train, test = shakespeare_split(HELD_OUT_PLAY)
        return {
            "heldout_bits_per_char": heldout_bpc(model, data.x_test[0], context),
            "kneser_ney_4gram_bits_per_char": kneser_ney_bpc(train, test, 4),
            "heldout_play": HELD_OUT_PLAY,
            "heldout_chars": int(data.x_test.shape[1]),
        }

    def text_samples(self, model: nn.Module, data: Split, generator: torch.Generator) -> str:
        vocab = shakespeare_vocab()
        device = next(model.parameters()).device
        # the loop's generator is on the CPU; generate samples (multinomial) on the model's device
        if generator.device != device:
            seed = int(torch.randint(2**62, (), generator=generator))
            generator = torch.Generator(device).manual_seed(seed)
        parts = []
        for prompt in SAMPLE_PROMPTS:
            ids = vocab.encode(prompt).unsqueeze(0).to(device)
            out = generate_windowed(
                model,
                ids,
                SAMPLE_CHARS,
                data.x_train.shape[1] - 1,
                do_sample=True,
                temperature=SAMPLE_TEMPERATURE,
                generator=generator,
            )
            parts.append(vocab.decode(out[0]))
        return "\n----\n".join(parts) + "\n"
