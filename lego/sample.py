"""Sample from a trained LEGO model.

Usage: python -m lego.sample --ckpt runs/lego/checkpoint.safetensors --n 64 --out samples.png
         [--sampler heun|dpmpp-2m|dpmpp-2m-sde|ddpm|ddim] [--steps N] [--labels 3 | 0,1,2] [--t-break 0.5]
         [--cfg-scale S [--guidance-interval LO,HI] [--guide-skip K | --guide-ckpt PATH]]
         [--height H --width W] [--seed N] [--vae PATH]
         [--window W --stride S --max-batch N --regions "0:64=3,64:128=7"]   (sliding-window mode)

--out takes a .png (a grid) or an .npz (float samples, uint8 images, labels; and arr_0, arr_1 as ADM's evaluator reads
them); --npz writes an .npz as well. Image i is drawn from its own seed, S + i (--seed S, default 0), or the i-th of
--seeds (EDM's notation, 0-49999), whatever batch or rank draws it. Under torchrun (torchrun --nproc-per-node 8 -m
lego.sample --n 50000 ...) every rank samples its share of the batches and rank 0 writes one file, the same as one
process would. Finished batches wait in OUT.parts/ until the files are written: after an interruption, the same
command goes on where the run stopped.
The canvas may be any height and width that are multiples of the model's largest brick, larger than the training
images and non-square included. Either the whole canvas goes through the model in one call (the default), or, with
--window, --stride or --regions, a window of the training size slides over it (lego.diffusion.window, the paper's
way), and --regions gives column ranges of the canvas their own classes.
"""

from __future__ import annotations

import argparse
import sys

from lego import checks
from lego.diffusion.generate import add_sampler_options
from lego.errors import run_cli
from lego.generation import write_samples
from lego.training import distributed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.safetensors written by lego.train or lego.convert")
    p.add_argument("--n", type=int, help="number of samples (default 64; with --seeds, their number)")
    p.add_argument("--out", required=True, help="output .png grid or .npz")
    p.add_argument("--npz", help="also write the samples to this .npz")
    add_sampler_options(p)
    p.add_argument("--churn", type=float, default=0.0, help="Heun S_churn; > 0 makes it stochastic (paper: 10)")
    p.add_argument("--labels", help="class labels: one (all samples) or a comma list, cycled (default 0, 1, 2, ...)")
    p.add_argument("--t-break", type=float, default=0.0, help="skip the top brick for this share of the steps")
    p.add_argument("--height", type=int, help="canvas height (default: the training resolution)")
    p.add_argument("--width", type=int, help="canvas width (default: the training resolution)")
    p.add_argument("--seed", type=int, default=0, help="the first image's seed: --n N draws seeds S..S+N-1 (default 0)")
    p.add_argument("--batch", type=int, default=64, help="samples per network call (default 64)")
    p.add_argument("--window", type=int, help="sliding-window mode: window side (default: the training canvas)")
    p.add_argument("--stride", type=int, help="sliding-window mode: step between windows (default: window / 4)")
    p.add_argument("--max-batch", type=int, default=64, help="sliding-window mode: windows per network call (64)")
    p.add_argument("--regions", help="sliding-window mode: column ranges with a class each, e.g. '0:64=3,64:128=7'")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--vae", help="decode latent samples to images with this AutoencoderKL (folder or hub id)")
    p.add_argument("--images-only", action="store_true",
                   help="the .npz holds the uint8 images (arr_0) and labels alone, not the float32 samples: a fifth "
                   "of the size (FID-50K at 256x256: 9.8 GB instead of 49 GB)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out / --npz if they are there")
    return p


def run(args: argparse.Namespace) -> None:
    """lego.sample, in one process or on every rank torchrun started (each rank on its device; rank 0 writes)."""
    ranks, device, created = distributed.setup(args.device, checks.device)
    try:
        write_samples(
            args.ckpt, args.out, args.npz, args.vae, args.overwrite, args.images_only, ranks.rank, ranks.world,
            n=args.n, seeds=args.seeds, seed=args.seed, labels=args.labels, regions=args.regions, batch=args.batch,
            device=str(device), use_ema=not args.raw, guide_ckpt=args.guide_ckpt, sampler=args.sampler,
            steps=args.steps, cfg_scale=args.cfg_scale, t_break=args.t_break, height=args.height, width=args.width,
            churn=args.churn, window=args.window, stride=args.stride, max_batch=args.max_batch,
            guidance_interval=args.guidance_interval, guide_skip=args.guide_skip,
        )  # fmt: skip
    finally:
        distributed.teardown(created)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.sample", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
