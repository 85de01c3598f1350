"""The ``foldstream`` command line.

Each command lives in a module under :mod:`streamer.commands` that adds its own
sub-parser; this module only builds the parser, dispatches, and turns user errors
into one line on stderr with a non-zero exit (no traceback).
"""

from __future__ import annotations

import argparse
import sys

from factors.errors import FactorsError
from streamer.commands import demo, model, offline, stream

USER_ERRORS: tuple[type[BaseException], ...] = (FactorsError, FileNotFoundError, IsADirectoryError)
EXIT_USER_ERROR = 2

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [demo, offline, stream, model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldstream",
        description="Streaming exact implicit-ALS fold-in: train, evaluate, and serve user vectors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    try:
        from streamer.errors import StreamerError
    except ImportError:  # pragma: no cover - streamer.errors always ships
        return USER_ERRORS
    return USER_ERRORS + (StreamerError,)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except _user_errors() as exc:
        print(f"foldstream {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"foldstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
