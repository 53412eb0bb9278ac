"""Held-out denoising loss of checkpoints: how well each model's final prediction D(x; sigma) recovers images it
was not trained on.

Usage: python -m lego.heldout --ckpt A.safetensors [B.safetensors ...] --data test.npz [--n 1000] [--seed 0]

The loss is the training loss of the final prediction (EDM's weighting lambda(sigma) |D - x0|^2, sigma drawn from
the checkpoint's training distribution), with the noise and sigmas fixed by --seed, so every checkpoint is scored on
exactly the same noisy images; EMA weights, labels kept (no dropout).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lego.checkpoint import load_model
from lego.errors import LegoError, run_cli
from lego.loader import open_dataset, prepare


@torch.no_grad()
def heldout_loss(model, images, labels=None, seed: int = 0, batch: int = 250) -> float:
    """Mean of lambda(sigma) |D(x0 + sigma n; sigma, y) - x0|^2 over images [N, C, H, W] (fixed draws per seed)."""
    g = torch.Generator().manual_seed(seed)
    sigma = model.precond.sample_sigma(images.shape[0], g, "cpu")  # (N,)
    noise = torch.randn(images.shape, generator=g)  # (N, C, H, W)
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, images.shape[0], batch):
        x0, sg = images[s : s + batch].to(device), sigma[s : s + batch].to(device)
        y = None if labels is None or not model.num_classes else labels[s : s + batch].to(device)
        d = model(x0 + sg.view(-1, 1, 1, 1) * noise[s : s + batch].to(device), sg, y)  # (b, C, H, W)
        err = model.precond.loss_weight(sg).view(-1, 1, 1, 1) * (d - x0) ** 2
        total += err.mean(dim=(1, 2, 3)).sum().item()
    return total / images.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lego.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to score")
    p.add_argument("--data", required=True, help="held-out images: default | a folder | an .npz | an .npy (see lego.train)")
    p.add_argument("--n", type=int, default=1000, help="images scored, the first n (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and sigmas (default 0)")

    def work():
        args = p.parse_args(argv)
        if args.n <= 0:
            raise LegoError(f"--n must be positive, got {args.n}")
        for path in args.ckpt:
            model = load_model(path)
            res = model.config.resolution
            data = open_dataset(args.data, res)  # what lego.train reads: a memory-mapped .npy included
            images, labels = data[torch.arange(min(args.n, len(data)))]
            loss = heldout_loss(model, prepare(images, res, None), labels, args.seed)
            print(f"{path}: held-out loss {loss:.4f} ({min(args.n, len(data))} images of {data.name}, seed {args.seed})")

    return run_cli("lego.heldout", work)


if __name__ == "__main__":
    sys.exit(main())
