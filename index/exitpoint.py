"""The exit point both command lines share: an error as one line on stderr and its status.

Each program declares its own table from exception class to exit status (`sociable` in
`index.cli`, `sociable-snapshotter` in `snapshotter.cli`; docs/cli.md); this module turns an
error into the line and the status by that table. An exception group (errors raised inside
trio nurseries) is reported as its first leaf. An error the table does not know is a bug:
one line saying so, and the traceback only with `--debug` or `SOCIABLE_DEBUG=1`.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import traceback
from collections.abc import Sequence

DEBUG_ENV = "SOCIABLE_DEBUG"
EXIT_ERROR = 1
"""The status of an error the table does not know (a bug)."""

ExitTable = Sequence[tuple[type[BaseException], int]]
"""Error class -> exit status; the first row the error is an instance of wins."""


def version() -> str:
    """The installed package's version, for `--version`."""
    try:
        return importlib.metadata.version("sociable")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether the command line or the environment asks for tracebacks of bugs."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def leaf_error(error: BaseException) -> tuple[BaseException, int]:
    """The first leaf of `error` (itself unless it is an exception group) and how many leaves
    it has: a group of one error is reported as that error."""
    if not isinstance(error, BaseExceptionGroup):
        return error, 1
    leaves: list[BaseException] = []
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    return leaves[0], len(leaves)


def exit_code(error: BaseException, table: ExitTable) -> int | None:
    """The exit status `table` gives `error`; None when it is not in the table (a bug)."""
    for cls, code in table:
        if isinstance(error, cls):
            return code
    return None


def report(prog: str, error: BaseException, table: ExitTable, *, debug: bool) -> int:
    """Print `error` as one line `PROG: error: …` on stderr (a bug: plus the traceback with
    `debug`); return its exit status."""
    leaf, count = leaf_error(error)
    more = f" (and {count - 1} more errors)" if count > 1 else ""
    code = exit_code(leaf, table)
    if isinstance(leaf, KeyboardInterrupt):
        message = "interrupted"
    elif code is None:
        if debug:
            traceback.print_exception(error, file=sys.stderr)
        hint = "" if debug else f"; run with --debug or {DEBUG_ENV}=1 for the traceback"
        message = f"unexpected {type(leaf).__name__}: {leaf} (this is a bug{hint})"
    elif isinstance(leaf, OSError) and leaf.strerror:
        message = f"{leaf.filename}: {leaf.strerror}" if leaf.filename else leaf.strerror
    else:
        message = str(leaf)
    print(f"{prog}: error: {' '.join(message.split())}{more}", file=sys.stderr)
    return EXIT_ERROR if code is None else code
