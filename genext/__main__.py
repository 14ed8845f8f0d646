"""Command line: `genext info` (or `python -m genext info`), `genext bench`, `genext train` and
`genext generate`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # its own parser, in genext.train (optional dependencies, imported only here)
        from .train.cli import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .train.generate import main as generate_main

        return generate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="genext", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "info", help="print build facts (versions, CUDA architectures, op kernels) as JSON"
    )
    sub.add_parser(
        "train",
        help=(
            "train a model (autoencoders, GANs, diffusion, CLIP, a character LM, a VLM) on bundled "
            "data; `genext train --help` for options"
        ),
        add_help=False,
    )
    sub.add_parser(
        "generate",
        help="sample text from a `genext train lm` run; `genext generate --help` for options",
        add_help=False,
    )
    b = sub.add_parser("bench", help="time genext against eager PyTorch and torch.compile")
    b.add_argument("--list", action="store_true", help="list the registered benches and exit")
    b.add_argument(
        "--op",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these benches (names as --list shows them; default: all)",
    )
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument(
        "--dtype",
        default=None,
        help="float32, float16 or bfloat16 (default: each bench's own for the device)",
    )
    b.add_argument("--quick", action="store_true", help="fewer repeats and shapes (smoke run)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    b.add_argument("--json", default=None, help="write the results to this JSON file")
    b.add_argument(
        "--busy",
        action="store_true",
        help="time while another process keeps one core busy (ops beside other work)",
    )
    args = parser.parse_args(argv)

    import genext

    if args.cmd == "info":
        print(json.dumps(genext.build_info(), indent=2))
        return 0
    from . import bench

    if args.list:
        bench.list_benches()
        return 0
    try:
        bench.select(args.op)
    except ValueError as e:
        b.error(str(e))  # exits with status 2, as argparse does for a bad argument
    return bench.run(
        args.op, args.device, args.dtype, args.quick, not args.no_compile, args.json, args.busy
    )


if __name__ == "__main__":
    sys.exit(main())
