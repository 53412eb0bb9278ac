"""The error type for bad user input, and how the command-line tools report it: one line, exit code 2."""

from __future__ import annotations

import os
import sys


class LegoError(ValueError):
    """A problem with what the user gave (a dataset, a checkpoint, an option), with what to do about it."""


def run_cli(prog: str, work) -> int:
    """Call ``work()``; a LegoError or ValueError becomes one ``prog: error: ...`` line on stderr and exit code 2
    (``LEGO_DEBUG=1`` re-raises it with its traceback)."""
    try:
        work()
    except ValueError as e:  # LegoError included
        if os.environ.get("LEGO_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
