"""Sampling a checkpoint into files (``python -m lego.sample``): load it, draw with lego.diffusion.generate, decode
latents through an autoencoder, write a PNG grid or an .npz."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lego import checks
from lego.checkpoints.build import load_for_sampling
from lego.checkpoints.format import load_checkpoint
from lego.data.images import save_grid, save_npz
from lego.data.vae import decode, factors, load_vae
from lego.diffusion.cost import CostMeter
from lego.diffusion.generate import check_sample_options, generate, parse_interval, parse_labels, sample_count
from lego.diffusion.window import parse_regions
from lego.errors import LegoError
from lego.files import check_new_files


def sample(
    ckpt, n=None, sampler="heun", steps=None, cfg_scale=1.0, labels=None, t_break=0.0, height=None, width=None,
    seed=0, batch=64, device=None, use_ema=True, churn=0.0, window=None, stride=None, max_batch=64, regions=None,
    guidance_interval=None, guide_skip=None, guide_ckpt=None, seeds=None, rank=0, world=1,
):  # fmt: skip
    """Draw n samples [n, C, H, W] (and their labels) from the checkpoint ``ckpt``. ``labels``, ``regions``,
    ``guidance_interval`` and ``seeds`` are lego.sample's texts ("3", "0,1,2"; "0:64=3,64:128=7"; "0.28,5.42";
    "0-49999"); ``guide_ckpt`` a checkpoint to guide by (autoguidance; its EMA weights unless ``use_ema`` is False);
    the rest is lego.diffusion.generate's. With ``seeds``, n is their number (None) and a conditional model's image
    of seed s asks for class s mod K unless ``labels`` says otherwise. Prints the network evaluations per image.

    Under torchrun (``world`` ranks, torch.distributed initialised), every image comes from its own seed (0..n-1
    without ``seeds``): the images are cut into batches of ``batch``, rank r samples batches r, r + world, ..., and
    rank 0 gathers them in order (the others return None), so the result does not depend on the number of ranks."""
    interval = parse_interval(guidance_interval)
    n, seeds = sample_count(n, seeds, 64)
    if world > 1 and seeds is None:
        seeds = list(range(n))
    # generate() checks these too; here they are checked before a checkpoint is loaded (seconds for a large one)
    check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window, stride,
                         max_batch, interval, guide_skip, guide_ckpt is not None)  # fmt: skip
    device = checks.device(device)
    model, guide, _ = load_for_sampling(ckpt, guide_ckpt, use_ema, device, cfg_scale, t_break, guide_skip)
    h = height or model.resolution
    ids = parse_labels(labels, n, model.num_classes, seeds)
    rects = None
    if regions:
        if labels:
            raise LegoError("give --labels or --regions, not both")
        if not model.num_classes:
            raise LegoError("--regions given but the model is unconditional")
        rects = parse_regions(regions, h)
        if any(not 0 <= cls < model.num_classes for *_, cls in rects):
            raise LegoError(f"--regions: classes must be in 0..{model.num_classes - 1}")
    mine = _share(n, batch, rank, world)  # the images this rank draws
    images, labels = torch.empty(0), None
    if mine:
        with CostMeter(model, guide) as meter:
            images, labels = generate(
                model, len(mine), sampler, steps, cfg_scale, None if ids is None else ids[mine], t_break, height,
                width, seed, batch, churn, window, stride, max_batch, rects, device=device, guidance_interval=interval,
                guide_skip=guide_skip, guide=guide, seeds=None if seeds is None else [seeds[i] for i in mine],
            )  # fmt: skip
        if rank == 0:
            print(f"lego.sample: {meter.evaluations / len(mine):g} network evaluations per image")
    if world > 1:
        images, labels = _gather(mine, images, labels, rank, world)
        if images is None:  # not rank 0
            return None, None
    if not torch.isfinite(images).all():
        raise LegoError(
            f"sampling {ckpt} gave NaN or inf values; nothing was written. Try fewer guidance "
            "(--cfg-scale) or another checkpoint"
        )
    return images, labels  # labels: [n], or [n, H, W] with --regions


def _share(n: int, batch: int, rank: int, world: int) -> list[int]:
    """The indices of the images rank ``rank`` of ``world`` draws: batches rank, rank + world, ... of ``batch``."""
    starts = range(rank * batch, n, world * batch)
    return [i for start in starts for i in range(start, min(start + batch, n))]


def _gather(mine: list[int], images, labels, rank: int, world: int):
    """Every rank's (images, labels) on rank 0, in image order (None, None elsewhere)."""
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object((mine, images.cpu(), None if labels is None else labels.cpu()), parts, dst=0)
    if rank:
        return None, None
    parts = [p for p in parts if p[0]]
    order = torch.tensor([i for p in parts for i in p[0]]).argsort()
    images = torch.cat([p[1] for p in parts])[order]
    labels = None if parts[0][2] is None else torch.cat([p[2] for p in parts])[order]
    return images, labels


def write_samples(
    ckpt,
    out,
    npz=None,
    vae=None,
    n=None,
    sampler="heun",
    steps=None,
    cfg_scale=1.0,
    labels=None,
    t_break=0.0,
    height=None,
    width=None,
    seed=0,
    batch=64,
    device=None,
    use_ema=True,
    churn=0.0,
    window=None,
    stride=None,
    max_batch=64,
    regions=None,
    guidance_interval=None,
    guide_skip=None,
    guide_ckpt=None,
    overwrite=False,
    seeds=None,
    rank=0,
    world=1,
) -> list[Path]:
    """lego.sample: sample (see ``sample``), decode latents with the autoencoder ``vae`` (loaded first: a bad one
    fails fast), write ``out`` (a .png grid or an .npz) and ``npz`` (replacing files only with ``overwrite``);
    returns the files written. Under torchrun (``rank`` of ``world``) rank 0 writes them (see ``sample``)."""
    outs = [Path(p) for p in (out, npz) if p]
    for path in outs:
        if path.suffix not in (".png", ".npz"):
            raise LegoError(f"{path}: the output must end in .png (a grid) or .npz")
    check_new_files(outs, overwrite)
    if npz and Path(npz).suffix != ".npz":  # it wrote a second grid there
        raise LegoError(f"--npz {npz}: --npz writes an .npz; give a name ending in .npz")
    latents = load_checkpoint(ckpt, parts=()).train_config.get("latents")  # what lego.encode recorded, if any
    if latents and not vae and any(path.suffix == ".png" for path in outs):
        raise LegoError(
            f"{ckpt} draws autoencoder latents (encoded with {latents.get('vae', 'an autoencoder')}), not images: give "
            "--vae to decode them, or write an .npz to keep the raw latents"
        )
    if vae and not rank:  # a latent model: its samples are decoded by the autoencoder (on rank 0, which writes)
        if latents and latents.get("vae") and not _same_source(vae, latents["vae"]):
            print(f"lego.sample: warning: {ckpt} was trained on latents of the autoencoder {latents['vae']}; decoding "
                  f"with {vae} gives wrong images unless it is the same model", file=sys.stderr)  # fmt: skip
        vae_name, vae = vae, load_vae(vae, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = sample(ckpt, n, sampler, steps, cfg_scale, labels, t_break, height, width, seed, batch, device,
                            use_ema, churn, window, stride, max_batch, regions, guidance_interval, guide_skip,
                            guide_ckpt, seeds, rank, world)  # fmt: skip
    if rank:
        return []
    if vae:
        images = decode(vae, images, *factors(vae, latents))
        if not torch.isfinite(images).all():
            raise LegoError(
                f"the autoencoder {vae_name} decoded the (finite) samples into NaN or inf values; nothing was "
                "written. Check it is the autoencoder the latents were made with, and that it loads in float32"
            )
    for path in outs:
        if path.suffix == ".png":
            save_grid(images, path)
        else:
            save_npz(images, path, labels)
        print(f"lego.sample: wrote {path} ({len(images)} samples, {images.shape[2]}x{images.shape[3]})")
    return outs


def _same_source(given: str, recorded: str) -> bool:
    """The autoencoder --vae names is the one lego.encode recorded: the same folder, or the same hub id."""
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return given == recorded
