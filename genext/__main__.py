"""Command line: `genext info` (or `python -m genext info`), `genext bench`, `genext train` and
`genext generate`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def version_text(info: dict[str, Any] | None = None) -> str:
    """`genext --version`: "genext 0.1.0", with the build's commit when it has one."""
    info = info or _build_info()
    return f"genext {info['version']}" + (f" (commit {info['commit']})" if info["commit"] else "")


def summary(info: dict[str, Any] | None = None) -> str:
    """A few lines for a person: version, torch, CUDA on/off and architectures, the CPU ISA when
    known, then one line per op with its devices and dtypes."""
    info = info or _build_info()
    if info["cuda"]:
        cuda = f"CUDA kernels: on, architectures {' '.join(info['cuda_archs']) or '?'}"
        if info["cuda_compiler"]:
            cuda += f" (nvcc {info['cuda_compiler']})"
        cuda += f"; GPU: {info['gpu']}" if info["gpu"] else "; no GPU visible"
    else:
        cuda = "CUDA kernels: off (a CPU-only build)"
    lines = [
        version_text(info),
        f"torch {info['torch_running']} (genext built against {info['torch_built']})",
        cuda,
    ]
    if info.get("cpu_isa"):
        lines.append(f"CPU kernels: {info['cpu_isa']} selected at load")
    width = max(map(len, info["ops"]), default=0)
    lines.append("ops (device: dtypes):")
    for op, devices in info["ops"].items():
        served = "; ".join(f"{dev}: {', '.join(dts)}" for dev, dts in devices.items())
        lines.append(f"  {op:<{width}}  {served or 'no kernel'}")
    lines.append("(`genext info --json` prints the full record)")
    return "\n".join(lines)


def _build_info() -> dict[str, Any]:
    import genext

    return genext.build_info()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # its own parser, in genext.train (optional dependencies, imported only here)
        from .train.cli import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .train.generate import main as generate_main

        return generate_main(argv[1:])
    from .bench import runner as bench_runner  # the choices of --device and --dtype

    parser = argparse.ArgumentParser(prog="genext", description=__doc__)
    parser.add_argument(
        "--version", action="store_true", help="print genext's version (and commit) and exit"
    )
    sub = parser.add_subparsers(dest="cmd")
    info = sub.add_parser(
        "info",
        help="print build facts (versions, CUDA architectures, each op's devices and dtypes)",
    )
    info.add_argument("--json", action="store_true", help="the full record as JSON")
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
    b.add_argument(
        "--list",
        action="store_true",
        help="list the registered benches and their cases (on --device) and exit",
    )
    b.add_argument(
        "--op",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these benches (names as --list shows them; default: all)",
    )
    b.add_argument(
        "--device",
        default=None,
        choices=bench_runner.DEVICES,
        help="cpu or cuda (default: cuda when available)",
    )
    b.add_argument(
        "--dtype",
        default=None,
        choices=bench_runner.DTYPES,
        help="the benches' dtype (default: each bench's own for the device; the sampler's steps "
        "are always float32)",
    )
    b.add_argument("--quick", action="store_true", help="fewer repeats and shapes (smoke run)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    b.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write the results to this file as strict JSON (null for missing figures)",
    )
    b.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw genext's speed-up over the best baseline per case (needs genext[plot])",
    )
    b.add_argument(
        "--busy",
        action="store_true",
        help="time while another process keeps one core busy (ops beside other work)",
    )
    args = parser.parse_args(argv)

    import genext

    if args.version:
        print(version_text())
        return 0
    if args.cmd is None:
        parser.error("a command is required: info, bench, train or generate")
    if args.cmd == "info":
        print(json.dumps(genext.build_info(), indent=2) if args.json else summary())
        return 0
    from . import bench

    if args.list:  # listing builds no tensors: the CUDA cases list without a GPU too
        bench.list_benches(args.device)
        return 0
    # argument errors exit with status 2 and a message, as argparse does for a bad argument
    problem = bench_runner.check_args(args.device, args.dtype)
    if problem:
        b.error(problem)
    try:
        bench.select(args.op)
    except ValueError as e:
        b.error(str(e))
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of timing, used at the end)
        except ImportError:
            b.error("--plot needs matplotlib: pip install 'genext[plot]' (or matplotlib)")
    return bench.run(
        args.op,
        args.device,
        args.dtype,
        args.quick,
        not args.no_compile,
        args.json,
        args.busy,
        args.plot,
    )


if __name__ == "__main__":
    sys.exit(main())
