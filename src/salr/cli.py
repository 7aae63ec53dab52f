"""The `salr` command line: one sub-command per module under `salr.commands`.

Each command module exposes `register(subparsers)` (adds its parser and sets `func`) and keeps its
work in library functions, so everything the CLI does is also callable from Python.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from salr.errors import SALRError

# Sub-command name -> module under salr.commands. Imported lazily so `salr --help` stays fast.
COMMANDS = ["compress", "eval", "demo", "theory", "bench", "train", "merge", "export"]

logger = logging.getLogger("salr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"salr.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except SALRError as err:
        # Expected user errors: one clear line, no traceback.
        print(f"salr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
