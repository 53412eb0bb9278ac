"""The error type for bad user input, and how the command-line tools report it: one line, exit code 2."""

from __future__ import annotations

import os
import sys


class LegoError(ValueError):
    """A problem with what the user gave (a dataset, a checkpoint, an option), with what to do about it."""


class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM after saving its work; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def run_cli(prog: str, work) -> int:
    """Call ``work()``; a LegoError, ValueError or OSError (a full disk, a folder without write permission) becomes
    one ``prog: error: ...`` line on stderr and exit code 2 (``LEGO_DEBUG=1`` re-raises it with its traceback). A run
    stopped by a signal says so in one line and exits with 128 + the signal's number, as shells do."""
    try:
        work()
    except (ValueError, OSError) as e:  # LegoError included
        if os.environ.get("LEGO_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if os.environ.get("LEGO_DEBUG"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
