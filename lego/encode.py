"""Encode a dataset into latents with an autoencoder, for latent-space training.

Usage: python -m lego.encode --vae PATH_OR_HUB_ID --data FOLDER_OR_NPZ --out latents.npy [--resolution 256]
         [--batch 32] [--half] [--device cuda]

See lego.data.encode for what it writes.
"""

from __future__ import annotations

import argparse
import sys

from lego.data.encode import encode_dataset
from lego.errors import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="AutoencoderKL: a local folder (save_pretrained) or a hub id")
    p.add_argument("--data", required=True, help="a folder of images, a uint8 .npy, an .npz, or default | mnist ...")
    p.add_argument("--out", required=True, help="the latents' .npy (sidecars .labels.npy and .json beside it)")
    p.add_argument(
        "--resolution", type=int, help="image side before encoding (default: 256 for a folder, else the stored size)"
    )
    p.add_argument("--batch", type=int, default=32, help="images per autoencoder call (default 32)")
    p.add_argument("--half", action="store_true", help="store float16 latents (half the disk)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace latents (and their sidecars) already at --out")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli(
        "lego.encode",
        lambda: encode_dataset(
            args.vae,
            args.data,
            args.out,
            args.resolution,
            args.batch,
            args.half,
            args.device,
            not args.no_progress,
            args.overwrite,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
