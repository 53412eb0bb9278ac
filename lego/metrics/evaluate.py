"""Scoring checkpoints: ``evaluate`` (sample quality and sampling cost, ``python -m lego.eval``) and ``heldout``
(the held-out denoising loss, ``python -m lego.heldout``).

Reported by ``evaluate``:
- ``fd``: the Fréchet distance between samples and the training set on the 128-d penultimate features of an MNIST
  classifier that installs offline (lego.metrics.features). Images at the model's resolution are resized to the CNN's
  28 x 28 on both sides. Comparable between models evaluated at the same n, not to published FIDs.
- ``class_accuracy`` (10-class conditional models on digits): the share of samples the CNN assigns to the class
  asked for.
- ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall`` with a reference (``ref``, or ``inception``
  against the training set): ADM's protocol (lego.metrics.adm) on the images, latent models' decoded by ``vae``.
- the cost: network calls, network evaluations per sample, FLOPs spent (counted by torch.utils.flop_counter per
  network call; skipped bricks cost nothing), wall and process CPU seconds.
- how the score was made: the checkpoint's SHA-256, step and weights (EMA or raw), the reference's name and SHA-256,
  the seeds, sampler, guidance, brick skipping, dtype (precision), device, ranks and versions.

With ``sweep`` (guidance scales x t_break values) every point is sampled and scored against the same reference
statistics, computed once, and reported with its FLOPs per image.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import platform
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

from lego import ranks
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint
from lego.data.datasets import open_dataset
from lego.data.loader import prepare
from lego.data.vae import downsampling
from lego.diffusion.samplers import DEFAULT_STEPS
from lego.errors import LegoError
from lego.files import atomic_write, check_new_files, sha256
from lego.generation import draw, gather, load_job, open_vae, vary
from lego.metrics.adm import InceptionFeatures, adm_metrics, load_reference, to_uint8_nchw
from lego.metrics.features import MnistFeatures
from lego.metrics.frechet import feature_stats, frechet_distance, reference_stats

NOT_DIGITS = ("fashion-mnist",)  # 10 classes, but not the digits the classifier knows: no class accuracy
SWEEPABLE = {"cfg-scale": "cfg_scale", "t-break": "t_break"}


def parse_sweep(items) -> list[dict]:
    """--sweep cfg-scale=1,1.5,2 t-break=0,0.25: the grid of option values, as a list of overrides."""
    axes = {}
    for item in items or ():
        key, eq, values = item.partition("=")
        if not eq or key not in SWEEPABLE:
            raise LegoError(f"--sweep {item!r}: give {' and/or '.join(k + '=A,B,...' for k in SWEEPABLE)}")
        try:
            axes[SWEEPABLE[key]] = [float(v) for v in values.split(",")]
        except ValueError:
            raise LegoError(f"--sweep {item!r}: the values must be numbers separated by commas") from None
    return [dict(zip(axes, point)) for point in itertools.product(*axes.values())] if axes else []


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("lego-diffusion", "triton", "torch-fidelity", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # absent: not used then
            out[name] = metadata.version(name)
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def evaluate(
    ckpt, n=None, sampler="heun", steps=None, cfg_scale=1.0, t_break=0.0, seed=0, batch=250, data=None,
    inception=False, inception_weights=None, device=None, use_ema=True, progress=True, json_path=None,
    guidance_interval=None, guide_skip=None, guide_ckpt=None, overwrite=False, seeds=None, ref=None, vae=None,
    sweep=None, rank=0, world=1, churn=0.0,
) -> dict | None:  # fmt: skip
    """Sample n images from ``ckpt`` (image i from seed ``seed + i``, or ``seeds``' i-th: EDM's notation) and score
    them (see the module docstring); returns the report as a dict (rank 0; None on the other ranks under torchrun),
    and writes it to ``json_path`` too if given. ``ref``: the reference of the Inception metrics (an ADM reference
    batch, a folder or .npz of images; ``inception`` alone: the training set); ``vae``: the autoencoder that decodes
    a latent model's samples; ``sweep``: option overrides (parse_sweep), one scored point each."""
    if rank == 0:
        check_new_files([json_path] if json_path else [], overwrite, "--json")
    points = sweep or [{}]
    job = load_job(ckpt, n, seeds, seed, None, None, batch, device, use_ema, guide_ckpt, sampler, steps, cfg_scale,
                   t_break, churn=churn, guidance_interval=guidance_interval, guide_skip=guide_skip,
                   default_n=10000)  # fmt: skip
    jobs = [vary(job, **point) for point in points]  # every point checked before the feature networks load
    net, dev, n = job.model, job.options["device"], job.n
    train_config = job.train_config
    data = data or train_config.get("data", "default")
    latents = train_config.get("latents")  # trained on lego.encode's latents: its samples are not images
    scored = bool(ref or inception)
    if latents and scored and not vae:
        raise LegoError(
            f"{ckpt} draws autoencoder latents (it was trained on {data}): give --vae, the autoencoder they were "
            "encoded with, to score the decoded images; or drop --ref / --inception to measure the sampling cost alone"
        )
    autoencoder = open_vae(vae, ckpt, latents, dev, "lego.eval") if scored else None
    mnist = MnistFeatures(dev) if net.in_channels == 1 and not latents else None  # before sampling: fail fast
    incep = InceptionFeatures(inception_weights, dev) if scored else None
    if (mnist or incep) and n < 2:
        raise LegoError(
            f"--n {n}: a Fréchet distance needs the covariance of at least 2 samples; give --n 2 or more "
            "(thousands for a stable score)"
        )
    side = net.resolution * (downsampling(autoencoder) if autoencoder is not None else 1)
    reference = None
    if incep is not None:  # read (or computed and cached) on rank 0 before sampling: a bad reference fails fast
        reference = ranks.agree(lambda: load_reference(ref or data, side, incep) if rank == 0 else None, world)
    info = load_checkpoint(ckpt, parts=())
    common = {
        "ckpt": str(ckpt), "ckpt_sha256": sha256(Path(ckpt)) if rank == 0 else None, "model": net.config.name,
        "step": info.step, "weights": "ema" if use_ema else "raw", "ema": use_ema, "data": data, "resolution": side,
        "n": n, "seed": seed, "seeds": seeds or f"{seed}-{seed + n - 1}", "sampler": sampler,
        "steps": steps or DEFAULT_STEPS[sampler], "churn": churn,
        "guidance_interval": None if job.options["guidance_interval"] is None else
        "{:g},{:g}".format(*job.options["guidance_interval"]),  # (a string: inf is not JSON)
        "guide_skip": guide_skip, "guide_ckpt": None if guide_ckpt is None else str(guide_ckpt),
        "vae": None if vae is None else str(vae), "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "backend": getattr(net.config, "backend", None), "device": str(dev), "device_name": device_name(dev),
        "ranks": world, "versions": versions(),
    }  # fmt: skip
    if reference is not None:
        common["reference"] = {"name": reference.name, "path": str(ref or data), "sha256": reference.sha256,
                               "n": reference.n, "statistics": reference.source}  # fmt: skip
    reports = []
    for point, job in zip(points, jobs):
        report = _score_point(job, point, common, autoencoder, latents, mnist, incep, reference, data, progress,
                              rank, world)  # fmt: skip
        reports.append(report)
    if rank:
        return None
    result = reports[0] if not sweep else {"sweep": reports}
    if json_path:
        atomic_write(Path(json_path), lambda tmp: Path(tmp).write_text(json.dumps(result) + "\n"))
    return result


def _score_point(job, point, common, autoencoder, latents, mnist, incep, reference, data, progress, rank, world):
    """Draw ``job``'s images on every rank, extract their features there, and score them on rank 0."""
    wall, cpu = time.perf_counter(), time.process_time()
    desc = "lego.eval: sampling" + "".join(f" {k} {v:g}" for k, v in point.items())

    def mine():
        drawn = draw(job, rank, world, autoencoder, latents, None, progress and rank == 0, desc)
        feats = {"labels": drawn.labels}
        if mnist is not None:
            feats["mnist"], feats["mnist_logits"] = mnist(drawn.images) if len(drawn.images) else (None, None)
        if incep is not None:
            feats.update(incep(to_uint8_nchw(drawn.images)) if len(drawn.images) else {})
        return drawn, feats

    drawn, feats = ranks.agree(mine, world)
    calls = drawn.meter.calls
    if ranks.multi(world):
        calls = ranks.reduce(calls, dist.ReduceOp.SUM)
    feats = gather(drawn.indices, feats, rank, world)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if rank:
        return None
    net, res = job.model, job.model.resolution
    per_image = drawn.meter.flops(res, res) / drawn.drawn  # every image costs the same (rank 0 drew batch 0)
    unskipped = drawn.meter.flops_unskipped(res, res) / drawn.drawn
    report = {
        **common, "cfg_scale": job.options["cfg_scale"], "t_break": job.options["t_break"], "network_calls": calls,
        "nfe_per_sample": drawn.meter.evaluations / drawn.drawn, "flops_per_sample": per_image,
        "flops_saved_by_skipping": 1 - per_image / unskipped, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
    }  # fmt: skip
    labels = feats["labels"]
    if mnist is not None:
        report["fd"] = frechet_distance(
            *feature_stats(feats["mnist"]), *reference_stats(data, res, mnist, "ccexam-mnist")
        )
        report["fd_features"] = "ccexam MNISTNet 128-d penultimate layer, images resized to 28x28"
        if labels is not None and net.num_classes == 10 and data not in NOT_DIGITS:
            report["class_accuracy"] = float((feats["mnist_logits"].argmax(1) == labels).float().mean())
    if incep is not None:
        report.update(adm_metrics(feats, reference, job.options["device"]))
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
