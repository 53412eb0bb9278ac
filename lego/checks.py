"""Checks on the options a user gives, made before any work starts: number ranges and devices.

Each failure is a LegoError naming the option, the value and the fix, so the CLIs end in one ``error:`` line. The
checks of one tool's options sit with that tool's library function (lego.training, lego.diffusion.generate, ...).
"""

from __future__ import annotations

import math

import torch

from lego.errors import LegoError

MAX_SEED = 2**31 - 1  # seeds are combined with the step into generator seeds, which must stay below 2^63


def is_number(value) -> bool:
    """A real number: an int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(option: str, value, low: int, high: int | None = None, meaning: str = "") -> None:
    """``value`` is an integer in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"at least {low}" if high is None else f"in {low}..{high}"
        raise LegoError(f"{option} must be an integer {span}{meaning}, got {value!r}")


def real(option: str, value, low: float, high: float = math.inf, low_open=False, high_open=False, meaning="") -> None:
    """``value`` is a finite number in the interval from low to high (each end open or closed)."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in {left}{low:g}, {high:g}{right}"
        raise LegoError(f"{option} must be a finite number {span}{meaning}, got {value!r}")


def device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device ``name`` names (default: cuda when there is one), refusing ones this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise LegoError(f"{option} {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LegoError(f"{option} {name} asked for a GPU but torch sees none; drop {option} to use the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LegoError(f"{option} {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if not (backend and hasattr(backend, "is_available") and backend.is_available()):
            raise LegoError(f"{option} {name}: torch has no usable {dev.type} device here; use cpu or cuda")
    return dev
