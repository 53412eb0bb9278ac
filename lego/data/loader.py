"""Feeding training from a dataset (lego.data.datasets): each rank's share of every step, augmentation, and turning
a batch into the model's input on its device.

Which images a step trains on is fixed by (seed, step) alone (``batch_indices``); the step's global batch is cut
into contiguous chunks, chunk ``k * world + rank`` going to rank ``rank`` in accumulation step ``k``, and every
random draw is made for the global batch and sliced (lego.diffusion.loss), so the split does not change the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from lego.data.datasets import Dataset
from lego.errors import LegoError


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Images of a step: epoch-wise shuffles seeded by (seed, epoch), so any step's batch is known without state."""
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < batch:  # a tiny dataset: repeat it to fill the batch
        perm = perm.repeat(batch // n + 1)
    return perm[i * batch : (i + 1) * batch]


class StepSampler(Sampler):
    """Yields this rank's chunk of indices for every micro-step of steps start..steps-1."""

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int, rank: int, world: int, accum: int):
        self.n, self.batch, self.seed, self.start, self.steps = n, batch, seed, start, steps
        self.rank, self.world, self.accum = rank, world, accum
        self.chunk = batch // (world * accum)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            idx = batch_indices(step, self.n, self.batch, self.seed)
            for k in range(self.accum):
                c = (k * self.world + self.rank) * self.chunk
                yield idx[c : c + self.chunk]


def batches(
    data: Dataset,
    batch: int,
    seed: int,
    start: int,
    steps: int,
    rank: int,
    world: int,
    accum: int,
    workers: int,
    device: torch.device,
):
    """Batches for this rank, one per micro-step, as they come off the DataLoader (on the CPU)."""
    if batch % (world * accum):
        raise LegoError(
            f"--batch {batch} does not split evenly over {world} rank(s) x --grad-accum {accum}; "
            f"use a multiple of {world * accum}"
        )
    sampler = StepSampler(len(data), batch, seed, start, steps, rank, world, accum)
    loader = DataLoader(
        data,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def prepare(x: torch.Tensor, resolution: int, flips: torch.Tensor | None) -> torch.Tensor:
    """A batch already on its device -> float32 [b, C, R, R]: uint8 to [-1, 1], images resized to the resolution
    (open_dataset has made sure that latents need none), mirrored where ``flips`` [b] is True."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1  # the conversion of datasets held in memory, so both paths give the same floats
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x.contiguous(), size=(resolution, resolution), mode="bilinear", antialias=True)
        x = x.clamp(-1, 1)
    x = x.contiguous()
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def flip_draws(step: int, seed: int, batch: int) -> torch.Tensor:
    """Which images of a step's global batch are mirrored ([batch] bool): a generator of its own, so runs without
    --flip draw exactly what they drew before the option existed."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + (1 << 40))  # clear of the loss's seeds
    return torch.rand(batch, generator=g) < 0.5
