"""The error type for bad user input, and how the command-line tools report it: one line, exit code 2."""

from __future__ import annotations

import os
import sys


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split("DefaultCPUAllocator: ")[-1][:200]


class LegoError(ValueError):
    """A problem with what the user gave (a dataset, a checkpoint, an option), with what to do about it."""


class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM after saving its work; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def run_cli(prog: str, work) -> int:
    """Call ``work()``; a LegoError, ValueError or OSError (a full disk, a folder without write permission) becomes
    one ``prog: error: ...`` line on stderr and exit code 2 (``LEGO_DEBUG=1`` re-raises it with its traceback), and so
    does an allocation that failed for want of memory (CPU or GPU), with what to lower. A run
    stopped by a signal says so in one line and exits with 128 + the signal's number, as shells do."""
    try:
        work()
    except (ValueError, OSError) as e:  # LegoError included
        if os.environ.get("LEGO_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if os.environ.get("LEGO_DEBUG") or not _out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({_first_line(e)}); lower --batch (or --max-batch), the canvas "
              "(--height, --width) or --n", file=sys.stderr)  # fmt: skip
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
