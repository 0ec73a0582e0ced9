"""The ``graphsched`` command line: ``graphsched demo`` and ``graphsched inspect``."""

from __future__ import annotations

import argparse
import sys

from graphsched import demo


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="file",
                        help="plan.json (as graphsched demo writes it), a Plan or ModelPlan JSON, "
                             "a timeline.json or a trace.json written by graphsched; pass the plans "
                             "and a measured timeline together to compare them (predicted vs "
                             "measured per graph and task class)")
    parser.add_argument("--png", help="write a Gantt chart of the timeline to this PNG file")
    parser.add_argument("--trace", help="write a Chrome/Perfetto trace-event JSON to this file")
    parser.add_argument("--json", help="write the timeline JSON (readable by graphsched inspect) to this file")


def inspect(args: argparse.Namespace) -> int:
    """Print the summary of a plan's or a recorded step's timeline (with both, predicted vs
    measured per graph and task class); write the files asked for."""
    from graphsched.errors import GraphschedError
    from graphsched.timelines import load_timelines

    try:
        timelines = load_timelines(*args.files)
        text = timelines.summary()
    except GraphschedError as exc:
        print(f"graphsched inspect: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.trace:
        print(f"wrote {timelines.write_trace(args.trace)} (open in https://ui.perfetto.dev or chrome://tracing)")
    if args.png:
        print(f"wrote {timelines.write_png(args.png)}")
    if args.json:
        print(f"wrote {timelines.save(args.json)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphsched", description="MoE communication/computation overlap")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser("demo", help="train the reference MoE model eagerly and wrapped; compare")
    demo.add_arguments(demo_parser)
    inspect_parser = sub.add_parser(
        "inspect", help="summarise plans or a recorded timeline, compare predicted with measured; "
                        "write a trace and a Gantt chart"
    )
    add_inspect_arguments(inspect_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "inspect":
        return inspect(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
