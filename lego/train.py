"""Train a LEGO model.

Usage: python -m lego.train [--model LEGO-T-PG-32] [--data default] [--steps N] [--out runs/lego] [--resume] ...

With no arguments it trains the tiny demo model on the embedded MNIST subset (a few minutes on a 2-core CPU) and
writes to --out: log.jsonl (loss, images/s), checkpoint.safetensors + config.json (model, EMA, optimizer), and
samples.png (a grid drawn with the EMA weights). A GPU is used when there is one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lego.checkpoint import load_checkpoint, save_checkpoint
from lego.data import load_dataset
from lego.errors import LegoError, run_cli
from lego.images import save_grid
from lego.loss import LegoLoss
from lego.sampling import edm_sampler
from lego.zoo import MODEL_NAMES, build_model, model_config


@dataclass
class TrainConfig:
    model: str = "LEGO-T-PR-16"
    data: str = "default"
    resolution: int | None = None  # default: the model's canvas
    precond: str = "edm"
    batch: int = 64
    steps: int = 800
    lr: float = 2e-3
    warmup: int = 100  # steps of linear learning-rate warm-up
    ema: float = 0.995  # EMA decay per step (ramped up over the first steps); ~0.9999 for long runs
    precision: str = "fp32"  # or "bf16" (autocast)
    # Share of each patch-brick's patches trained per image (paper: 0.5 CelebA, 0.75 ImageNet). The tiny demo uses
    # all of them: the bricks above see x0 in the others, and a tiny model learns to lean on it (measured on the
    # demo: held-out loss 0.315 at 0.5 vs 0.283 at 1.0 after 500 steps, and grainy samples at 0.5).
    patch_fraction: float = 1.0
    label_dropout: float = 0.1  # for classifier-free guidance
    seed: int = 0
    out: str = "runs/lego"
    log_every: int = 50
    ckpt_every: int = 400
    sample_n: int = 100
    sample_steps: int = 18
    device: str | None = None  # default: cuda if available


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LegoError(f"--device {name} asked for a GPU but torch sees none; drop --device to use the CPU")
    return torch.device(name)


def _batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Images of a step: epoch-wise shuffles seeded by (seed, epoch), so any step's batch is known without state."""
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < batch:  # a tiny dataset: repeat it to fill the batch
        perm = perm.repeat(batch // n + 1)
    return perm[i * batch : (i + 1) * batch]


@torch.no_grad()
def _ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def sample_grid(model, path, n, steps, num_classes, resolution, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(n, device=device) % num_classes if num_classes else None
    z = torch.randn(n, model.in_channels, resolution, resolution, generator=g, device=device)
    images = edm_sampler(model, z, labels, num_steps=steps, generator=g)
    save_grid(images, path, nrow=num_classes if 1 < num_classes <= 16 else None)
    return images


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train per ``cfg``; returns the output folder. ``resume`` continues from ``cfg.out``'s checkpoint."""
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.safetensors"
    device = _device(cfg.device)
    if cfg.precision not in ("fp32", "bf16"):
        raise LegoError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    resolution = cfg.resolution or model_config(cfg.model).resolution  # (an unknown name fails here, clearly)
    data = load_dataset(cfg.data, resolution)
    channels = data.images.shape[1]
    torch.manual_seed(cfg.seed)  # the initial weights; every later draw comes from per-step generators
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.model_config.in_channels != channels:
            raise LegoError(
                f"{cfg.data} has {channels} channels but the checkpoint's model takes {ckpt.model_config.in_channels}"
            )
        model = build_model(ckpt.model_config)
    else:
        model = build_model(model_config(
            cfg.model, in_channels=channels, num_classes=data.num_classes, precond=cfg.precond, resolution=resolution
        ))
    model.check_canvas(data.images[:1])
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt.load_state_dict(ckpt.optimizer)
        start = ckpt.step
    loss_fn = LegoLoss(cfg.patch_fraction, cfg.label_dropout)
    images, labels = data.images, data.labels
    n_params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"lego.train: {cfg.model} ({n_params / 1e6:.2f}M parameters) on {data.name} "
        f"({len(data)} x {tuple(images.shape[1:])}), {device}, steps {start}..{cfg.steps} -> {out}",
        flush=True,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, dynamic_ncols=True)
    tick, seen = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        idx = _batch_indices(step, len(data), cfg.batch, cfg.seed)
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device) if labels is not None else None
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
        with autocast:
            loss, per_brick = loss_fn(model, x, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        seen += x.shape[0]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise LegoError(f"the loss is not finite at step {step + 1}; lower --lr or use --precision fp32")
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = seen / (time.perf_counter() - tick)
            tick, seen = time.perf_counter(), 0
            record = {"step": step + 1, "loss": round(value, 5), "per_brick": [round(v, 5) for v in per_brick.tolist()],
                      "img_per_s": round(rate, 1), "lr": opt.param_groups[0]["lr"]}
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
            if not progress:
                print(json.dumps(record), flush=True)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_path, model, ema, opt, step + 1, dataclasses.asdict(cfg))
    bar.close()
    if cfg.sample_n > 0:
        sample_grid(ema, out / "samples.png", cfg.sample_n, cfg.sample_steps, model.num_classes, resolution, device)
        print(f"lego.train: wrote {out / 'samples.png'} ({cfg.sample_n} EMA samples, {cfg.sample_steps} Heun steps)")
    print(f"lego.train: checkpoint {ckpt_path}")
    return out


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
    p.add_argument("--patch-fraction", type=float, help=f"share of patch-brick patches trained (default {d.patch_fraction})")
    p.add_argument("--label-dropout", type=float, help=f"label dropout for CFG (default {d.label_dropout})")
    p.add_argument("--seed", type=int, help=f"seed (default {d.seed})")
    p.add_argument("--out", help=f"output folder (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--log-every", type=int, help=f"steps between log lines (default {d.log_every})")
    p.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    p.add_argument("--sample-n", type=int, help=f"samples in the final grid, 0 for none (default {d.sample_n})")
    p.add_argument("--sample-steps", type=int, help=f"Heun steps for the final grid (default {d.sample_steps})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Options given on the command line over the defaults, or over the checkpoint's options with --resume."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    base = TrainConfig()
    if args.resume:
        out = Path(given.get("out", base.out))
        saved = load_checkpoint(out / "checkpoint.safetensors", parts=()).train_config
        base = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    return dataclasses.replace(base, **given)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.train", lambda: train(config_from_args(args), resume=args.resume, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
