"""What every command-line entry point shares: usage errors as one line, without the usage dump."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def command(self, argv: list[str] | None) -> str:
        """The command line as run (``prog`` and its arguments), for the records a command writes."""
        return " ".join([self.prog, *(sys.argv[1:] if argv is None else argv)])

    def fail(self, error: Exception) -> int:
        """Report a user error caught after parsing (a bad value, a missing file) the same way:
        one line on stderr; returns the exit status 2 for ``main`` to return."""
        print(f"{self.prog}: error: {error}", file=sys.stderr)
        return 2
