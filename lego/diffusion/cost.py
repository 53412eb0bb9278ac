"""What sampling costs: network calls, network evaluations per sample and FLOPs, counted as the samplers run."""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class CostMeter:
    """Counts the calls of a denoiser, and of its guide model if any (forward pre-hooks, while in its ``with``
    block), and the images per network and set of skipped bricks, then the FLOPs those calls spent (each distinct
    call measured once on one image with FlopCounterMode; cost is linear in batch)."""

    def __init__(self, net: nn.Module, guide: nn.Module | None = None):
        self.nets = {"model": net} if guide is None else {"model": net, "guide": guide}
        self.calls = 0
        self.images: Counter = Counter()  # (network, skipped bricks) -> images run through it with them skipped
        self._hooks = []
        self._flops: dict[tuple, int] = {}  # (height, width, skip, network) -> FLOPs of one image, measured once

    def __enter__(self) -> CostMeter:
        self._hooks = [
            net.register_forward_pre_hook(functools.partial(self._count, name), with_kwargs=True)
            for name, net in self.nets.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def _count(self, name, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["x"]
        skip = kwargs.get("skip", args[3] if len(args) > 3 else ())
        self.calls += 1
        self.images[name, tuple(sorted(skip))] += x.shape[0]

    @property
    def evaluations(self) -> int:
        """Images run through a network (a guided step's two passes count twice, the guide's included)."""
        return sum(self.images.values())

    def flops_per_image(self, height: int, width: int, skip=(), network: str = "model") -> int:
        key = (height, width, tuple(skip), network)
        if key not in self._flops:  # (flops() and flops_unskipped() ask for the same calls)
            self._flops[key] = self._measure(height, width, skip, self.nets[network])
        return self._flops[key]

    @staticmethod
    @torch.no_grad()
    def _measure(height: int, width: int, skip, net: nn.Module) -> int:
        device = next(net.parameters()).device
        x = torch.randn(1, net.in_channels, height, width, device=device)
        labels = torch.zeros(1, dtype=torch.long, device=device) if net.num_classes else None
        with FlopCounterMode(display=False) as counter:
            net(x, torch.tensor([1.0], device=device), labels, skip=skip)
        return counter.get_total_flops()

    def flops(self, height: int, width: int) -> int:
        """FLOPs of the calls counted, skipped bricks costing nothing."""
        return sum(n * self.flops_per_image(height, width, skip, net) for (net, skip), n in self.images.items())

    def flops_unskipped(self, height: int, width: int) -> int:
        """FLOPs of the same calls with nothing skipped."""
        return sum(n * self.flops_per_image(height, width, (), net) for (net, _), n in self.images.items())
