"""The ``graphsched`` command line: ``graphsched demo`` and ``graphsched inspect``."""

from __future__ import annotations

import argparse
import sys

from graphsched import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphsched", description="MoE communication/computation overlap")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser("demo", help="train the reference MoE model eagerly and wrapped; compare")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
