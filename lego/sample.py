"""Sample from a trained LEGO model.

Usage: python -m lego.sample --ckpt runs/lego/checkpoint.safetensors --n 64 --out samples.png
         [--sampler heun|ddpm|ddim] [--steps N] [--cfg-scale S] [--labels 3 | 0,1,2] [--t-break 0.5]
         [--height H --width W] [--seed N] [--vae PATH]
         [--window W --stride S --max-batch N --regions "0:64=3,64:128=7"]   (sliding-window mode)

--out takes a .png (a grid) or an .npz (float samples, uint8 images, labels); --npz writes an .npz as well.
The canvas may be any height and width that are multiples of the model's largest brick, larger than the training
images and non-square included. Either the whole canvas goes through the model in one call (the default), or, with
--window, --stride or --regions, a window of the training size slides over it (lego.panorama, the paper's way), and
--regions gives column ranges of the canvas their own classes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lego import checks
from lego.checkpoint import load_checkpoint, load_model
from lego.errors import LegoError, run_cli
from lego.images import save_grid, save_npz
from lego.panorama import SlidingWindow, parse_regions, region_map
from lego.sampling import SAMPLERS, skip_schedule

DEFAULT_STEPS = {"heun": 18, "ddpm": 250, "ddim": 50}


def parse_labels(text: str | None, n: int, num_classes: int) -> torch.Tensor | None:
    if not num_classes:
        if text:
            raise LegoError("--labels given but the model is unconditional")
        return None
    if not text:
        return torch.arange(n) % num_classes
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise LegoError(f"--labels must be integers separated by commas, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise LegoError(f"--labels {bad} out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor(values).repeat(n // len(values) + 1)[:n]


def sample(
    ckpt, n=64, sampler="heun", steps=None, cfg_scale=1.0, labels=None, t_break=0.0, height=None, width=None,
    seed=0, batch=64, device=None, use_ema=True, churn=0.0, window=None, stride=None, max_batch=64, regions=None,
):
    """Draw n samples [n, C, H, W] (and their labels) from the checkpoint ``ckpt``; see the module docstring."""
    if sampler not in SAMPLERS:
        raise LegoError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    checks.check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window,
                                stride, max_batch)
    device = checks.device(device)
    model = load_model(ckpt, use_ema=use_ema, device=device)
    checks.check_guidance(cfg_scale, model.num_classes, load_checkpoint(ckpt, parts=()).train_config)
    h = height or model.config.resolution
    w = width or model.config.resolution
    labels_text, labels = labels, parse_labels(labels, n, model.num_classes)
    net = model
    if window or stride or regions:  # sliding window: the canvas only has to hold one window
        net = SlidingWindow(model, window, stride, max_batch)
        net.windows(h, w)
        if regions:
            if labels_text:
                raise LegoError("give --labels or --regions, not both")
            if not model.num_classes:
                raise LegoError("--regions given but the model is unconditional")
            labels = region_map(h, w, parse_regions(regions, h)).expand(n, -1, -1)  # (n, H, W)
            if labels.min() < 0 or labels.max() >= model.num_classes:
                raise LegoError(f"--regions: classes must be in 0..{model.num_classes - 1}")
    else:
        model.check_canvas(torch.empty(1, model.in_channels, h, w, device="meta"))
    num_steps = DEFAULT_STEPS[sampler] if steps is None else steps
    kwargs = {"num_steps": num_steps, "cfg_scale": cfg_scale, "skip": skip_schedule(model, t_break)}
    if sampler == "heun" and churn:
        kwargs.update(S_churn=churn, S_min=0.05, S_max=20.0, S_noise=1.003)  # the paper's ImageNet settings
    g = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        z = torch.randn(size, model.in_channels, h, w, generator=g, device=device)
        y = labels[start : start + size].to(device) if labels is not None else None
        chunks.append(SAMPLERS[sampler](net, z, y, generator=g, **kwargs).cpu())
    images = torch.cat(chunks)
    if not torch.isfinite(images).all():
        raise LegoError(f"sampling {ckpt} gave NaN or inf values; nothing was written. Try fewer guidance "
                        "(--cfg-scale) or another checkpoint")
    return images, labels  # labels: [n], or [n, H, W] with --regions


def write_samples(args: argparse.Namespace) -> None:
    outs = [Path(p) for p in (args.out, args.npz) if p]
    for path in outs:
        if path.suffix not in (".png", ".npz"):
            raise LegoError(f"{path}: the output must end in .png (a grid) or .npz")
    if args.npz and Path(args.npz).suffix != ".npz":  # it wrote a second grid there
        raise LegoError(f"--npz {args.npz}: --npz writes an .npz; give a name ending in .npz")
    if args.vae:  # a latent model: its samples are decoded by the autoencoder (loaded first: a bad --vae fails fast)
        from lego.vae import decode_samples, load_vae

        vae = load_vae(args.vae, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = sample(
        args.ckpt, args.n, args.sampler, args.steps, args.cfg_scale, args.labels, args.t_break, args.height,
        args.width, args.seed, args.batch, args.device, not args.raw, args.churn, args.window, args.stride,
        args.max_batch, args.regions,
    )
    if args.vae:
        images = decode_samples(images, vae, args.ckpt)
    for path in outs:
        if path.suffix == ".png":
            save_grid(images, path)
        else:
            save_npz(images, path, labels)
        print(f"lego.sample: wrote {path} ({len(images)} samples, {images.shape[2]}x{images.shape[3]})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.safetensors written by lego.train or lego.convert")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output .png grid or .npz")
    p.add_argument("--npz", help="also write the samples to this .npz")
    p.add_argument("--sampler", default="heun", choices=list(SAMPLERS), help="heun (EDM, default), ddpm or ddim")
    p.add_argument("--steps", type=int, help="sampling steps (default: heun 18, ddpm 250, ddim 50)")
    p.add_argument("--churn", type=float, default=0.0, help="Heun S_churn; > 0 makes it stochastic (paper: 10)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--labels", help="class labels: one (all samples) or a comma list, cycled (default 0, 1, 2, ...)")
    p.add_argument("--t-break", type=float, default=0.0, help="skip the top brick for this share of the steps")
    p.add_argument("--height", type=int, help="canvas height (default: the training resolution)")
    p.add_argument("--width", type=int, help="canvas width (default: the training resolution)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--batch", type=int, default=64, help="samples per network call (default 64)")
    p.add_argument("--window", type=int, help="sliding-window mode: window side (default: the training canvas)")
    p.add_argument("--stride", type=int, help="sliding-window mode: step between windows (default: window / 4)")
    p.add_argument("--max-batch", type=int, default=64, help="sliding-window mode: windows per network call (64)")
    p.add_argument("--regions", help="sliding-window mode: column ranges with a class each, e.g. '0:64=3,64:128=7'")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--vae", help="decode latent samples to images with this AutoencoderKL (folder or hub id)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.sample", lambda: write_samples(args))


if __name__ == "__main__":
    sys.exit(main())
