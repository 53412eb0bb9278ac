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

from lego.errors import run_cli
from lego.metrics.evaluate import heldout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lego.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to score")
    p.add_argument(
        "--data", required=True, help="held-out images: default | a folder | an .npz | an .npy (see lego.train)"
    )
    p.add_argument("--n", type=int, default=1000, help="images scored, the first n (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and sigmas (default 0)")

    def work():
        args = p.parse_args(argv)
        for path, loss, count, name in heldout(args.ckpt, args.data, args.n, args.seed):
            print(f"{path}: held-out loss {loss:.4f} ({count} images of {name}, seed {args.seed})")

    return run_cli("lego.heldout", work)


if __name__ == "__main__":
    sys.exit(main())
