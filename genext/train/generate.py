"""``genext generate``: sample text from a language model trained by ``genext train lm``.

Loads ``<run>/checkpoint.safetensors`` (the model's config and weights), encodes the prompt with
the run's character vocabulary and prints the continuation as it is generated (genext's
``generate``: the prompt prefilled through the varlen attention kernel, then one KV-cache decode
step per character; past the context the model was trained on, in chunks that re-prefill the
last half context, :func:`genext.train.tasks.lm.generate_windowed`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import load_checkpoint
from .loop import CHECKPOINT
from .tasks import get_task
from .tasks.lm import generate_windowed
from .text import CharVocab, shakespeare_vocab

__all__ = ["build_parser", "load_run", "main"]


class _PrintStreamer:
    """transformers' streamer protocol (``put`` the prompt, then each new token; ``end``),
    printing the new characters as they come."""

    def __init__(self, vocab: CharVocab, out=None) -> None:
        self.vocab = vocab
        self.out = out or sys.stdout
        self.prompt_seen = False

    def put(self, ids: Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt, printed by the caller
            self.prompt_seen = True
            return
        self.out.write(self.vocab.decode(ids.reshape(-1)))
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def load_run(run: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, CharVocab, int]:
    """The trained model (eval mode, on ``device``), vocabulary and training context length of a
    ``genext train lm`` run."""
    path = Path(run) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `genext train lm`")
    ckpt = load_checkpoint(path)
    task_name = ckpt.meta["config"]["task"]
    if task_name != "lm":
        raise ValueError(f"{path} is a checkpoint of `genext train {task_name}`, not of `lm`")
    model = get_task(task_name).build(ckpt.meta["model_config"])
    model.load_state_dict(ckpt.model)
    return model.to(device).eval(), shakespeare_vocab(), int(ckpt.meta["config"]["size"])


def build_parser(prog: str = "genext generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/lm-shakespeare", help="the run folder of genext train lm")
    p.add_argument("--prompt", default="MACBETH\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="0: no top-k")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p


def main(argv: list[str] | None = None, prog: str = "genext generate") -> int:
    args = build_parser(prog).parse_args(argv)
    model, vocab, context = load_run(args.run, args.device)
    ids = vocab.encode(args.prompt).unsqueeze(0).to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    generate_windowed(
        model,
        ids,
        args.max_new_tokens,
        context,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        generator=generator,
        streamer=_PrintStreamer(vocab),
    )
    return 0
