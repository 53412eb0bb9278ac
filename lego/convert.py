"""Convert the authors' released LEGO models (EDM-style snapshot pickles) into lego checkpoints.

Usage: python -m lego.convert LEGO-L-PG-64.pkl --out runs/lego-l-pg-64 [--num-heads N] [--overwrite]

See lego.checkpoints.snapshots for what is read and how, safely. Like lego.train, it holds --out's lock while it
writes, and replaces a checkpoint there only with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from lego.checkpoints.format import load_checkpoint
from lego.checkpoints.snapshots import convert
from lego.errors import LegoError, run_cli
from lego.files import FolderLock


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot", help="a released snapshot pickle, e.g. LEGO-L-PG-64.pkl")
    p.add_argument("--out", required=True, help="folder for checkpoint.safetensors + config.json")
    p.add_argument("--num-heads", type=int, help="attention heads, only if the snapshot does not record them")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return p


def _main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LegoError(f"--out {out} is a file, not a folder; give a folder name (it is created if missing)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(out, "lego.convert"):
            existing = out / "checkpoint.safetensors"
            if existing.exists() and not args.overwrite:
                raise LegoError(
                    f"--out {out} already holds a checkpoint ({existing}); pick a new --out, or pass --overwrite to "
                    "replace it"
                )
            ckpt = convert(args.snapshot, out, args.num_heads)
    except BaseException:
        if created:  # a failed conversion leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
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
