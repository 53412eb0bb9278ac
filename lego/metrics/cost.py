"""What sampling costs: network calls, network evaluations per sample and FLOPs, counted as the samplers run."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class CostMeter:
    """Counts the calls of a denoiser (a forward pre-hook, while in its ``with`` block) and the images per set of
    skipped bricks, then the FLOPs those calls spent (each distinct call measured once on one image with
    FlopCounterMode; cost is linear in batch)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.calls = 0
        self.images: Counter = Counter()  # skipped bricks -> images run through the network with them skipped
        self._hook = None

    def __enter__(self) -> CostMeter:
        self._hook = self.net.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()

    def _count(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["x"]
        skip = kwargs.get("skip", args[3] if len(args) > 3 else ())
        self.calls += 1
        self.images[tuple(sorted(skip))] += x.shape[0]

    @torch.no_grad()
    def flops_per_image(self, height: int, width: int, skip=()) -> int:
        device = next(self.net.parameters()).device
        x = torch.randn(1, self.net.in_channels, height, width, device=device)
        labels = torch.zeros(1, dtype=torch.long, device=device) if self.net.num_classes else None
        with FlopCounterMode(display=False) as counter:
            self.net(x, torch.tensor([1.0], device=device), labels, skip=skip)
        return counter.get_total_flops()

    def flops(self, height: int, width: int) -> int:
        return sum(n * self.flops_per_image(height, width, skip) for skip, n in self.images.items())
