"""Feeding training: memory-mapped datasets larger than memory, each rank's share of every step, augmentation.

A ``.npy`` dataset is memory-mapped (``np.load(mmap_mode="r")``) and read batch by batch by a DataLoader's workers:
ImageNet-256 latents (1.28M x 4 x 32 x 32 float32, 21 GB) train without being loaded into RAM. Beside ``X.npy``:
``X.labels.npy`` (optional, [N] integers) and ``X.json`` (optional; ``lego.encode`` writes the autoencoder and its
scaling factor there). ``X.npy`` holds uint8 images ([N, H, W], [N, H, W, C] or [N, C, H, W]), which stay uint8 until
the batch is on the device, or float latents [N, C, H, W]. Other datasets (``lego.data``) are held in memory.

Which images a step trains on is fixed by (seed, step) alone (``batch_indices``); the step's global batch is cut
into contiguous chunks, chunk ``k * world + rank`` going to rank ``rank`` in accumulation step ``k``, and every
random draw is made for the global batch and sliced (``lego.loss``), so the split does not change the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from lego.data import load_dataset
from lego.errors import LegoError


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Images of a step: epoch-wise shuffles seeded by (seed, epoch), so any step's batch is known without state."""
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < batch:  # a tiny dataset: repeat it to fill the batch
        perm = perm.repeat(batch // n + 1)
    return perm[i * batch : (i + 1) * batch]


@dataclass
class TrainData:
    """What training needs to know of a dataset, and ``data[indices] -> (images [b, C, H, W], labels [b] or None)``
    (uint8 or float32, on the CPU) for the DataLoader."""

    name: str
    channels: int
    size: tuple[int, int]  # (H, W) as stored
    num_classes: int
    latent: bool
    count: int
    meta: dict = field(default_factory=dict)  # from X.json: the autoencoder that made the latents, its scaling

    def __len__(self) -> int:
        return self.count


class MemoryData(TrainData):
    def __init__(self, data):
        super().__init__(data.name, data.images.shape[1], tuple(data.images.shape[-2:]), data.num_classes,
                         data.latent, len(data))
        self.images, self.labels = data.images, data.labels

    def __getitem__(self, idx: torch.Tensor):
        return self.images[idx], None if self.labels is None else self.labels[idx]


class MappedData(TrainData):
    """A memory-mapped ``.npy``. The map is opened lazily in each process that reads it: a DataLoader worker gets
    the path, never a pickled copy of the array."""

    def __init__(self, path: Path):
        self.path = path
        array = self._open()
        if array.ndim == 3:
            self.layout = "NHW"
        elif array.ndim == 4 and array.dtype == np.uint8 and array.shape[-1] in (1, 3, 4) and array.shape[1] > 4:
            self.layout = "NHWC"
        elif array.ndim == 4:
            self.layout = "NCHW"
        else:
            raise LegoError(f"{path}: expected [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {array.shape}")
        latent = array.dtype != np.uint8
        if latent and (array.dtype.kind != "f" or self.layout != "NCHW"):
            raise LegoError(f"{path}: a .npy holds uint8 images or float latents [N, C, H, W], "
                            f"got {array.dtype} of shape {array.shape}")
        shape = dict(zip(self.layout, array.shape))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        labels_path = path.with_suffix(".labels.npy")
        self.labels, num_classes = None, 0
        if labels_path.is_file():
            labels = np.load(labels_path)
            if labels.shape != (shape["N"],) or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
                raise LegoError(f"{labels_path}: expected {shape['N']} non-negative integer labels, "
                                f"got {labels.dtype} of shape {labels.shape}")
            self.labels = torch.from_numpy(labels.astype(np.int64))
            num_classes = int(labels.max()) + 1 if labels.size else 0
        super().__init__(path.name, shape.get("C", 1), (shape["H"], shape["W"]), num_classes, latent, shape["N"], meta)
        self._array = None  # opened again where it is read

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise LegoError(f"could not read {self.path} as a .npy file ({e}); is it corrupt?") from None

    def __getitem__(self, idx: torch.Tensor):
        if self._array is None:
            self._array = self._open()
        idx = idx.numpy()
        order = np.argsort(idx, kind="stable")  # read the file front to back, then put the rows back in batch order
        rows = np.empty((len(idx), *self._array.shape[1:]), dtype=self._array.dtype)
        rows[order] = self._array[idx[order]]
        x = torch.from_numpy(rows)
        if self.layout == "NHW":
            x = x.unsqueeze(1)
        elif self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)  # a view; made contiguous on the device
        if self.latent:
            x = x.float()
        return x, None if self.labels is None else self.labels[idx]

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def open_dataset(spec: str, resolution: int) -> TrainData:
    """``spec`` as ``lego.data.load_dataset`` takes it, or a memory-mapped ``.npy``."""
    if str(spec).endswith(".npy"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LegoError(f"dataset {spec!r} not found")
        data = MappedData(path)
        if len(data) == 0:
            raise LegoError(f"dataset {data.name} is empty")
        if data.latent and data.size != (resolution, resolution):
            raise LegoError(f"{data.name}: latents are {data.size} but the resolution is {resolution}; "
                            "latents are not resized: pass --resolution to match them")
        return data
    return MemoryData(load_dataset(spec, resolution))


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


def batches(data: TrainData, batch: int, seed: int, start: int, steps: int, rank: int, world: int, accum: int,
            workers: int, device: torch.device):
    """Batches for this rank, one per micro-step, as they come off the DataLoader (on the CPU)."""
    if batch % (world * accum):
        raise LegoError(f"--batch {batch} does not split evenly over {world} rank(s) x --grad-accum {accum}; "
                        f"use a multiple of {world * accum}")
    sampler = StepSampler(len(data), batch, seed, start, steps, rank, world, accum)
    loader = DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    return iter(loader)


def prepare(x: torch.Tensor, resolution: int, flips: torch.Tensor | None) -> torch.Tensor:
    """A batch already on its device -> float32 [b, C, R, R]: uint8 to [-1, 1], resized to the resolution (images
    only), mirrored where ``flips`` [b] is True."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1  # lego.data's conversion, so both paths give the same floats
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
