"""Train a LEGO model.

Usage: python -m lego.train [--model LEGO-T-PG-32] [--data default] [--steps N] [--out runs/lego] [--resume] ...
       torchrun --nproc_per_node 8 -m lego.train ...  (data-parallel; --batch is the global batch)

With no arguments it trains the tiny demo model on the embedded MNIST subset (a few minutes on a 2-core CPU) and
writes to --out: log.jsonl (loss, images/s), checkpoint.safetensors + config.json (model, EMA, optimizer), and
samples.png (a grid drawn with the EMA weights). A GPU is used when there is one.
"""

from __future__ import annotations

import argparse
import sys

from lego.errors import run_cli
from lego.networks.registry import MODEL_NAMES
from lego.training.config import TrainConfig, resolve_config
from lego.training.loop import train


def _depths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give whole numbers separated by commas, e.g. 2,3,3, not {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.train", description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    p.add_argument("--model", choices=MODEL_NAMES, metavar="NAME", help=f"registry name (default {d.model})")
    p.add_argument("--data", help="default | mnist | fashion-mnist | a folder of images | an .npz (default: default)")
    p.add_argument("--resolution", type=int, help="canvas side; images are resized (default: the model's canvas)")
    p.add_argument("--precond", choices=["edm", "vp"], help="EDM (default) or VP/DDPM preconditioning and loss")
    p.add_argument("--batch", type=int, help=f"images per step (default {d.batch})")
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, help=f"learning-rate warm-up steps (default {d.warmup})")
    p.add_argument("--ema", type=float, help=f"EMA decay per step (default {d.ema})")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    p.add_argument(
        "--patch-fraction", type=float, help=f"share of patch-brick patches trained (default {d.patch_fraction})"
    )
    p.add_argument("--depths", type=_depths, metavar="D1,D2,...",
                   help="blocks per brick, bottom to top (a LEGO stack; e.g. 2,3,3), or a DiT's blocks (default: the "
                   "registry's)")  # fmt: skip
    p.add_argument("--label-dropout", type=float, help=f"label dropout for CFG (default {d.label_dropout})")
    p.add_argument("--seed", type=int, help=f"seed (default {d.seed})")
    p.add_argument("--out", help=f"output folder (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out with a checkpoint, replacing it")
    p.add_argument("--log-every", type=int, help=f"steps between log lines (default {d.log_every})")
    p.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    p.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help=f"keep the newest N checkpoints, older ones as checkpoint-STEP.safetensors (default "
                   f"{d.keep_checkpoints})")  # fmt: skip
    p.add_argument("--sample-n", type=int, help=f"samples in the final grid, 0 for none (default {d.sample_n})")
    p.add_argument("--sample-steps", type=int, help=f"Heun steps for the final grid (default {d.sample_steps})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--base-ckpt", help="a checkpoint of ours or a diffusers DiT/UNet folder as brick 0 of the PR stack")
    p.add_argument("--freeze-base", action="store_true", default=None, help="with --base-ckpt: train the bricks only")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--flip", action="store_true", default=None, help="mirror each image with probability 1/2")
    p.add_argument("--grad-accum", type=int, metavar="K", help="split each step into K micro-steps (same global batch)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile each brick, fullgraph (backend default inductor)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard parameters and optimizer state (FSDP2) instead of replicating them",
    )
    p.add_argument("--workers", type=int, help="DataLoader workers (default: 4 for a .npy dataset, else 0)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.resume and args.overwrite:
        parser().error("--resume and --overwrite contradict each other; give one")
    return run_cli(
        "lego.train",
        lambda: train(
            resolve_config(vars(args), args.resume),
            resume=args.resume,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
