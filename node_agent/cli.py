"""`edgefleet-agent`: the node agent's command line.

Subcommands live in `COMMANDS` (name -> (add_arguments, run)); adding one (e.g. `serve`)
is a pair of functions and one entry. `main` returns the process exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from node_agent import __version__
from node_agent.errors import AgentError

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def _make_examples_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR",
                        help="repository root to write into (created if missing)")


def _make_examples(args: argparse.Namespace) -> int:
    from node_agent.examples import make_examples
    from node_agent.repository import CONFIG_FILE

    root: Path = args.dir
    for config in make_examples(root):
        print(f"{config.name}/{config.version}: {config.format} {config.digest} "
              f"(estimate {config.memory_estimate_bytes} bytes) "
              f"-> {root / config.name / config.version / CONFIG_FILE}")
    return 0


COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "make-examples": (
        "write a model repository of small example models (fixed seeds, stable digests)",
        _make_examples_args,
        _make_examples,
    ),
}
"""Subcommand name -> (one-line help, add its arguments, run it)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="edgefleet node agent: the per-GPU model runtime and inference service.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except (AgentError, OSError) as e:
        print(f"edgefleet-agent {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
