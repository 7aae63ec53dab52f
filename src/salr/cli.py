"""The `salr` command line: one sub-command per module under `salr.commands`.

Each command module exposes `register(subparsers)` (adds its parser and sets `func`) and keeps its
work in library functions, so everything the CLI does is also callable from Python.

Errors a user can cause end the command with exit code 2 and one line on stderr, `salr CMD: error: ...`:
`SALRError` from anywhere, bad flags (argparse), and, as a last resort, the operating system's refusals (disk full,
file too large, permission denied), undecodable input and input nested too deeply to parse. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from salr.errors import SALRError

# Sub-command name -> module under salr.commands. Imported lazily so `salr --help` stays fast.
COMMANDS = ["compress", "eval", "demo", "theory", "bench", "train", "merge", "export"]

logger = logging.getLogger("salr")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage of `salr train` is thirty)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="salr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        module = importlib.import_module(f"salr.commands.{name}")
        module.register(subparsers)
    return parser


def os_error_message(err: OSError) -> str:
    """'No space left on device: /path' — what failed and where, without a traceback."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    what = err.strerror or str(err)
    return f"{what}: {where}" if where else what


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
        message = str(err)
    except OSError as err:
        # Disk full, file too large, permission denied, ... on a path the user chose: not a bug in salr.
        logger.debug("operating system error", exc_info=True)
        message = os_error_message(err)
    except UnicodeDecodeError as err:
        message = f"an input file is not UTF-8 text ({err.reason} at byte {err.start})"
    except RecursionError:
        message = "an input file is nested too deeply to be read"
    except KeyboardInterrupt:
        # Ctrl-C: outputs are written atomically (complete or absent), so a line says so instead of a traceback.
        print(
            f"salr {args.command}: interrupted; outputs are complete or absent, never half-written "
            "(an interrupted salr train continues with --resume)",
            file=sys.stderr,
        )
        return 130
    print(f"salr {args.command}: error: {one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
