"""Convert the authors' released LEGO models (EDM-style snapshot pickles) into lego checkpoints.

Usage: python -m lego.convert LEGO-L-PG-64.pkl --out runs/lego-l-pg-64 [--num-heads N]

See lego.checkpoints.snapshots for what is read and how, safely.
"""

from __future__ import annotations

import argparse
import sys

from lego.checkpoints.format import load_checkpoint
from lego.checkpoints.snapshots import convert
from lego.errors import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot", help="a released snapshot pickle, e.g. LEGO-L-PG-64.pkl")
    p.add_argument("--out", required=True, help="folder for checkpoint.safetensors + config.json")
    p.add_argument("--num-heads", type=int, help="attention heads, only if the snapshot does not record them")
    return p


def _main(args: argparse.Namespace) -> None:
    ckpt = convert(args.snapshot, args.out, args.num_heads)
    c = load_checkpoint(ckpt, parts=()).model_config
    bricks = ", ".join(f"{b.brick_size}/{b.field_size}/{b.depth}" for b in c.bricks)
    print(
        f"lego.convert: {c.name}: bricks (r/l/depth, bottom to top) {bricks}; hidden {c.hidden_size}, "
        f"{c.num_heads} heads, {c.in_channels} channels, {c.num_classes} classes, {c.resolution}x{c.resolution}"
    )
    print(f"lego.convert: wrote {ckpt} and {ckpt.with_name('config.json')}")
    print(f"lego.convert: sample it with: python -m lego.sample --ckpt {ckpt} --n 16 --out samples.png")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.convert", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
