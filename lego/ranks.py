"""Agreement between the processes torchrun started: a rank that stops alone leaves the others waiting forever in
their next collective, so what may fail on one rank is agreed over all of them (lego.training's runs, lego.sample
and lego.eval). In one process these are plain calls."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lego.errors import LegoError


def multi(world: int) -> bool:
    """Several ranks, with their process group initialised."""
    return world > 1 and dist.is_available() and dist.is_initialized()


def reduce(value: int, op) -> int:
    """``value`` reduced over the ranks with ``op`` (a collective)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def agree(fn, world: int):
    """``fn()`` on every rank, returning its value; when it raises on any rank it raises on all (the others with a
    LegoError that points at the failing rank's message)."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised below, on this rank and (as a flag) on the others
        error = e
    if multi(world) and reduce(int(error is not None), dist.ReduceOp.MAX) and error is None:
        raise LegoError("another rank failed (its error is above); stopping this one too")
    if error is not None:
        raise error
    return result
