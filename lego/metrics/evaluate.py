"""Scoring checkpoints: ``evaluate`` (sample quality and sampling cost, ``python -m lego.eval``) and ``heldout``
(the held-out denoising loss, ``python -m lego.heldout``).

Reported by ``evaluate``:
- ``fd``: the Fréchet distance between samples and the training set on the 128-d penultimate features of an MNIST
  classifier that installs offline (lego.metrics.features). Images at the model's resolution are resized to the CNN's
  28 x 28 on both sides. Comparable between models evaluated at the same n, not to published FIDs.
- ``class_accuracy`` (10-class conditional models on digits): the share of samples the CNN assigns to the class
  asked for.
- ``inception_fid`` with ``inception``: the standard FID through torch-fidelity's Inception-v3.
- the cost: network calls, network evaluations per sample, FLOPs spent (counted by torch.utils.flop_counter per
  network call; skipped bricks cost nothing), wall and process CPU seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lego import checks
from lego.checkpoints.build import load_for_sampling, load_model
from lego.checkpoints.format import load_checkpoint
from lego.data.datasets import open_dataset
from lego.data.loader import prepare
from lego.diffusion.cost import CostMeter
from lego.diffusion.generate import check_sample_options, generate, parse_interval, parse_labels, sample_count
from lego.diffusion.samplers import DEFAULT_STEPS
from lego.errors import LegoError
from lego.files import atomic_write, check_new_files
from lego.metrics.features import InceptionFeatures, MnistFeatures
from lego.metrics.frechet import feature_stats, frechet_distance, reference_stats

NOT_DIGITS = ("fashion-mnist",)  # 10 classes, but not the digits the classifier knows: no class accuracy


def evaluate(
    ckpt, n=None, sampler="heun", steps=None, cfg_scale=1.0, t_break=0.0, seed=0, batch=250, data=None,
    inception=False, inception_weights=None, device=None, use_ema=True, progress=True, json_path=None,
    guidance_interval=None, guide_skip=None, guide_ckpt=None, overwrite=False, seeds=None,
) -> dict:  # fmt: skip
    """Sample n images from ``ckpt`` and score them (see the module docstring); returns the report as a dict, and
    writes it to ``json_path`` too if given. Guidance options and ``seeds`` as lego.sample's
    (lego.generation.sample): with seeds, n is their number."""
    interval = parse_interval(guidance_interval)
    seeds_text, (n, seeds) = seeds, sample_count(n, seeds, 10000)
    check_new_files([json_path] if json_path else [], overwrite, "--json")
    # as lego.sample: before the checkpoint and the feature networks load (generate() checks them again)
    check_sample_options(n, sampler, steps, cfg_scale, t_break, None, None, seed, batch, 0.0,
                         guidance_interval=interval, guide_skip=guide_skip,
                         guide_model=guide_ckpt is not None)  # fmt: skip
    device = checks.device(device)
    info = load_checkpoint(ckpt, parts=())
    data = data or info.train_config.get("data", "default")
    net, guide, _ = load_for_sampling(ckpt, guide_ckpt, use_ema, device, cfg_scale, t_break, guide_skip)
    res = net.resolution
    latent = bool(info.train_config.get("latents"))  # trained on lego.encode's latents: its samples are not images
    if latent and inception:
        raise LegoError(
            f"--inception: {ckpt} draws autoencoder latents (it was trained on {data}), and lego.eval scores "
            "images; drop --inception to measure the sampling cost alone"
        )
    mnist = MnistFeatures(device) if net.in_channels == 1 and not latent else None  # before sampling: fail fast
    incep = InceptionFeatures(inception_weights, device) if inception else None
    if (mnist or incep) and n < 2:
        raise LegoError(
            f"--n {n}: a Fréchet distance needs the covariance of at least 2 samples; give --n 2 or more "
            "(thousands for a stable score)"
        )

    wall, cpu = time.perf_counter(), time.process_time()
    with CostMeter(net, guide) as meter:
        labels = parse_labels(None, n, net.num_classes, seeds)
        images, labels = generate(
            net, n, sampler, steps, cfg_scale, labels, t_break, seed=seed, batch=batch, device=device,
            progress=progress, desc="lego.eval: sampling", guidance_interval=interval, guide_skip=guide_skip,
            guide=guide, seeds=seeds,
        )  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not torch.isfinite(images).all():  # (the Fréchet distance would end in a LinAlgError)
        raise LegoError(
            f"sampling {ckpt} gave NaN or inf values, so there is nothing to score; try less guidance (--cfg-scale) "
            "or another checkpoint"
        )
    flops = meter.flops(res, res)
    report = {
        "ckpt": str(ckpt), "model": net.config.name, "step": info.step, "data": data, "resolution": res, "n": n,
        "sampler": sampler, "steps": steps or DEFAULT_STEPS[sampler], "cfg_scale": cfg_scale, "t_break": t_break,
        "guidance_interval": f"{interval[0]:g},{interval[1]:g}" if interval else None,  # (a string: inf is not JSON)
        "guide_skip": guide_skip,
        "guide_ckpt": None if guide_ckpt is None else str(guide_ckpt), "seed": seed,
        "seeds": seeds_text, "ema": use_ema,
        "network_calls": meter.calls, "nfe_per_sample": meter.evaluations / n,
        "flops_per_sample": flops / n, "flops_saved_by_skipping": 1 - flops / meter.flops_unskipped(res, res),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "device": str(device),
    }  # fmt: skip
    if mnist is not None:
        feats, logits = mnist(images)
        report["fd"] = frechet_distance(*feature_stats(feats), *reference_stats(data, res, mnist, "ccexam-mnist"))
        report["fd_features"] = "ccexam MNISTNet 128-d penultimate layer, images resized to 28x28"
        if labels is not None and net.num_classes == 10 and data not in NOT_DIGITS:
            report["class_accuracy"] = float((logits.argmax(1) == labels).float().mean())
    if incep is not None:
        feats, _ = incep(images)
        report["inception_fid"] = frechet_distance(*feature_stats(feats), *reference_stats(data, res, incep, "incv3"))
    if json_path:
        atomic_write(Path(json_path), lambda tmp: Path(tmp).write_text(json.dumps(report) + "\n"))
    return report


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


def heldout(ckpts, data: str, n: int = 1000, seed: int = 0) -> Iterator[tuple[str, float, int, str]]:
    """lego.heldout: the held-out loss of each checkpoint on the first n images of ``data`` (read as lego.train reads
    it), with the noise fixed by ``seed``; yields (checkpoint, loss, images scored, dataset name) as each is scored."""
    if n <= 0:
        raise LegoError(f"--n must be positive, got {n}")
    for path in ckpts:
        model = load_model(path)
        res = model.resolution
        dataset = open_dataset(data, res)
        images, labels = dataset[torch.arange(min(n, len(dataset)))]
        loss = heldout_loss(model, prepare(images, res, None), labels, seed)
        yield str(path), loss, min(n, len(dataset)), dataset.name
