"""The README's sliding-window figures drawn with the exact denoiser of 200 real digits (20 per class), the model a
perfectly trained network would be, so that the pictures show the sampling mechanism and nothing of a training run.

Usage: python docs/figures.py   (writes docs/panorama_exact.png and docs/mixed_exact.png)
"""

from pathlib import Path

import torch

from lego import SlidingWindow
from lego.data.datasets import open_dataset
from lego.data.images import save_grid
from lego.diffusion.exact import ExactDenoiser
from lego.diffusion.samplers import edm_sampler
from lego.diffusion.window import region_map


def main():
    out = Path(__file__).parent
    data = open_dataset("default", 16)
    pick = torch.cat([torch.nonzero(data.labels == c)[:20, 0] for c in range(10)])
    net = SlidingWindow(ExactDenoiser(data.images[pick], data.labels[pick], 10), window=16, stride=4)
    g = torch.Generator().manual_seed(0)
    wide = edm_sampler(net, torch.randn(3, 1, 16, 128, generator=g), torch.full((3,), 3), num_steps=18)
    save_grid(wide, out / "panorama_exact.png", nrow=1)
    labels = region_map(16, 64, [(0, 16 * i, 16, 16 * i + 16, c) for i, c in enumerate((2, 0, 2, 6))])
    mixed = edm_sampler(net, torch.randn(3, 1, 16, 64, generator=g), labels.expand(3, -1, -1), num_steps=18)
    save_grid(mixed, out / "mixed_exact.png", nrow=1)


if __name__ == "__main__":
    main()
