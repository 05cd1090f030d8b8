"""The ``memfit`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func``, a callable taking the parsed ``argparse.Namespace`` and
returning an exit code. ``_COMMANDS`` lists them in help order. Only commands that
work are registered; ``estimate``, ``profile`` and ``plan`` get their own
``_add_*`` function here when they exist.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__


# --------------------------------------------------------------------------- demo


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small GPT with fp32, memfit 8/4/2-bit and checkpointing; compare memory, speed, loss",
        description=(
            "Train a small randomly initialised GPT-2 (byte vocabulary) on the .py sources of "
            "Python's standard library, once per way of keeping activations: plain fp32, "
            "memfit at each --bits width, and torch activation checkpointing. Same init, same "
            "data order, same optimizer. Prints one table and writes a PNG with the loss "
            "curves and the measured memory. Nothing is downloaded."
        ),
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; 12 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for the init, the batch order and the rounding noise")
    p.add_argument("--bits", default="8,4,2", help="memfit bit widths to run, comma-separated (default 8,4,2)")
    p.add_argument(
        "--bits-everywhere",
        action="store_true",
        help="quantize the loss head at --bits too (default: final norm, output layer and loss at 8 bits)",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="skip the activation-checkpointing run")
    p.add_argument("--out", default="memfit-demo.png", help="where to write the PNG (default memfit-demo.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every measurement as JSON")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; for smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import rich  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(
            f"memfit demo needs {exc.name}: pip install 'memfit[hf,plot,cli]'",
            file=sys.stderr,
        )
        return 2
    from . import demo

    try:
        bits = demo.parse_bits(args.bits)
    except ValueError as exc:
        print(f"memfit demo: --bits: {exc}", file=sys.stderr)
        return 2
    overrides = dict(seed=args.seed, bits=bits, checkpointing=not args.no_checkpointing)
    if args.bits_everywhere:
        overrides["bits_everywhere"] = True
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        config = demo.DemoConfig.quick(**overrides) if args.quick else demo.DemoConfig(**overrides)
    except ValueError as exc:
        print(f"memfit demo: {exc}", file=sys.stderr)
        return 2
    demo.main(
        config,
        out=None if args.no_plot else args.out,
        json_path=args.json,
        progress=not args.no_progress,
    )
    return 0


# --------------------------------------------------------------------------- entry point

_COMMANDS: Sequence[Callable] = (_add_demo,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memfit",
        description="Train bigger PyTorch models in the memory you have.",
    )
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memfit`` command line with ``argv`` (default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
