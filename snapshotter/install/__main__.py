"""`python -m snapshotter.install install|uninstall ...`: the same commands as
`sociable-snapshotter install|uninstall`, runnable with only the standard library and tomlkit
on the path (a bundle's `install.sh` runs it from the wheels, before any venv exists)."""

from __future__ import annotations

import argparse
import sys
from typing import Final, NoReturn

from index.exitpoint import debug_requested, report

from ..errors import ConfigError, SnapshotterError, UsageError
from .command import add_parsers, run

PROG = "sociable-snapshotter"
EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (UsageError, 2),
    (ConfigError, 2),
    (SnapshotterError, 1),
    (OSError, 6),
    (KeyboardInterrupt, 130),
)
"""The rows of `snapshotter.cli.EXIT_CODES` these commands can raise (a test keeps them
equal)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog=PROG)
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    try:
        code = run(parser.parse_args(argv), sys.stdout, sys.stderr)
    except (Exception, KeyboardInterrupt) as e:
        code = report(PROG, e, EXIT_CODES, debug=debug_requested(argv))
    sys.exit(code)


if __name__ == "__main__":
    main()
