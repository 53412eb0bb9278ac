"""Writing samples: a PNG grid and an .npz."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lego.files import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C'] with C' = 1 or 3 (other channel counts: the first three,
    each stretched to its own range, e.g. to look at latents)."""
    x = x.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :3]
        lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8) * 2 - 1
        if x.shape[1] == 2:
            x = torch.cat([x, x[:, :1]], dim=1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path, nrow: int | None = None, pad: int = 2) -> None:
    """Tile a batch [B, C, H, W] in [-1, 1] into one PNG, nrow images per row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def save_npz(images: torch.Tensor, path, labels: torch.Tensor | None = None, samples: bool = True) -> None:
    """Samples as float32 [B, C, H, W] ('samples'; not with ``samples`` False) and uint8 [B, H, W, C] ('images'),
    plus 'labels' if given; and the same uint8 images and labels as 'arr_0' and 'arr_1', the names ADM's evaluator
    (guided-diffusion's evaluations/evaluator.py) and DiT's sample_ddp.py use."""
    arrays = {"samples": images.detach().float().cpu().numpy()} if samples else {}
    arrays["images"] = arrays["arr_0"] = to_uint8(images)
    if labels is not None:
        arrays["labels"] = arrays["arr_1"] = labels.cpu().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(Path(path), write)
