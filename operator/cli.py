"""`edgefleet-operator`: the operator's command line."""

from __future__ import annotations

import argparse
import sys

from edgefleet_operator import __version__, crdgen


def cmd_crds(args: argparse.Namespace) -> int:
    """Print the CustomResourceDefinitions (pipe into `kubectl apply -f -`)."""
    print("---\n".join(crdgen.render(c) for c in crdgen.all_crds().values()), end="")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(__version__)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-operator",
        description="The edgefleet operator: places InferenceService models on edge nodes, runs "
        "node agents, and rolls new versions out in SLA-gated canary waves.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("crds", help="print the CRDs as YAML").set_defaults(func=cmd_crds)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
