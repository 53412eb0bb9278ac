"""Train a LEGO model.

Usage: python -m lego.train [--model LEGO-T-PG-32] [--data default] [--steps N] [--out runs/lego] [--resume] ...
       torchrun --nproc_per_node 8 -m lego.train ...  (data-parallel; --batch is the global batch)

With no arguments it trains the tiny demo model on the embedded MNIST subset (a few minutes on a 2-core CPU) and
writes to --out: log.jsonl (loss, images/s), checkpoint.safetensors + config.json (model, EMA, optimizer), and
samples.png (a grid drawn with the EMA weights). A GPU is used when there is one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lego import checks, distributed, loader
from lego.base import stack_on_base, with_base_weights
from lego.checkpoint import check_finite, load_checkpoint, load_weights
from lego.dit import DiTModel
from lego.errors import Stopped, run_cli
from lego.images import save_grid
from lego.loader import open_dataset
from lego.loss import LegoLoss
from lego.models import LegoModel
from lego.rundir import RunDir
from lego.sampling import edm_sampler
from lego.zoo import MODEL_NAMES, bricks_of, build_model, model_config


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
    device: str | None = None  # default: cuda if available (under torchrun: cuda:LOCAL_RANK)
    flip: bool = False  # mirror each image with probability 1/2 (the paper's augmentation)
    # How the work is done, not what is computed: a run resumed with other values continues the same run.
    grad_accum: int = 1  # micro-steps per step: the same global batch in less memory
    compile: str | None = None  # torch.compile the bricks with this backend ("inductor"; "aot_eager" to debug)
    fsdp: bool = False  # shard parameters and optimizer state over the ranks (FSDP2) instead of replicating them
    workers: int | None = None  # DataLoader workers (default: 4 for .npy datasets, none for data held in memory)
    base_ckpt: str | None = None  # a pretrained denoiser as brick 0 of the PR stack --model (lego.base)
    freeze_base: bool = False  # train only the bricks on top of it


RUNTIME_OPTIONS = ("grad_accum", "compile", "fsdp", "workers")  # not taken from the checkpoint on --resume


def compile_bricks(model: LegoModel | DiTModel, backend: str = "inductor") -> None:
    """torch.compile each brick's forward, fullgraph (a graph break is an error): the bricks hold the compute, while
    the loss's random draws stay eager. The forward is replaced, not the module, so state-dict keys do not change and
    DDP/FSDP hooks run around the compiled code."""
    for brick in bricks_of(model):  # a DiT's transformer is its one brick
        brick.forward = torch.compile(brick.forward, fullgraph=True, backend=backend)


def _workers(cfg: TrainConfig, data) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 4 if isinstance(data, loader.MappedData) else 0  # data in memory is sliced faster than workers start


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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Train per ``cfg``; returns the output folder. ``resume`` continues from ``cfg.out``'s checkpoint; without it a
    folder that holds a checkpoint is refused unless ``overwrite``. Every option is checked before anything is loaded
    or written; the folder is locked while the run lasts (lego/rundir.py). Under torchrun every rank calls this;
    rank 0 alone owns the folder, logs, writes checkpoints and samples (lego.distributed)."""
    checks.check_train_config(cfg, resume)
    ranks, device, created = distributed.setup(cfg.device, checks.device)
    try:
        run = RunDir(cfg.out, resume=resume, overwrite=overwrite, ranks=ranks)
        distributed.agree(run.open, ranks)  # rank 0's folder checks: if they fail, every rank stops
        try:
            return _train(cfg, run, resume, progress and ranks.main, ranks, device)
        finally:
            run.close()
    finally:
        distributed.teardown(created)


def _train(cfg: TrainConfig, run: RunDir, resume: bool, progress: bool, ranks: distributed.Dist,
           device: torch.device) -> Path:
    out, ckpt_path = run.out, run.ckpt_path
    resolution = cfg.resolution or model_config(cfg.model).resolution  # (an unknown name fails here, clearly)
    data = open_dataset(cfg.data, resolution)
    channels = data.channels
    torch.manual_seed(cfg.seed)  # the initial weights; every later draw comes from per-step generators
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_finite(ckpt, ckpt_path)
        checks.check_resume(cfg, ckpt.model_config, ckpt.step, resolution, channels, data.num_classes)
        model = build_model(ckpt.model_config)
    elif cfg.base_ckpt:
        model = stack_on_base(cfg.model, cfg.base_ckpt, cfg.freeze_base, in_channels=channels,
                              num_classes=data.num_classes, precond=cfg.precond, resolution=resolution)
    else:
        model = build_model(model_config(
            cfg.model, in_channels=channels, num_classes=data.num_classes, precond=cfg.precond, resolution=resolution
        ))
    model.check_canvas(torch.empty(1, channels, resolution, resolution, device="meta"))
    loss_fn = LegoLoss(cfg.patch_fraction, cfg.label_dropout)
    batches = loader.batches(data, cfg.batch, cfg.seed, ckpt.step if ckpt else 0, cfg.steps, ranks.rank, ranks.world,
                             cfg.grad_accum, _workers(cfg, data), device)
    if ckpt is not None:
        load_weights(model, with_base_weights(model, ckpt.model), ckpt_path)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None:
        load_weights(ema, with_base_weights(ema, ckpt.ema), ckpt_path)
    if cfg.compile:
        compile_bricks(model, cfg.compile)
    step_fn = distributed.wrap(distributed.TrainStep(model, loss_fn), ranks, device, cfg.fsdp)
    if cfg.fsdp:
        distributed.shard_like(ema, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    start = 0
    if ckpt is not None:
        distributed.load_optimizer(opt, step_fn, ckpt.optimizer, cfg.fsdp)
        start = ckpt.step
    n_params = sum(p.numel() for p in model.parameters())
    if ranks.main:
        launch = f", {ranks.world} ranks" if ranks.world > 1 else ""
        print(
            f"lego.train: {cfg.model} ({n_params / 1e6:.2f}M parameters) on {data.name} "
            f"({len(data)} x {(channels, *data.size)}), {device}{launch}, steps {start}..{cfg.steps} -> {out}",
            flush=True,
        )
    hint = f"Lower --lr (now {cfg.lr:g})" + (" or use --precision fp32" if cfg.precision == "bf16" else "")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, dynamic_ncols=True)
    tick, seen = time.perf_counter(), 0
    chunk = cfg.batch // (ranks.world * cfg.grad_accum)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        flips = loader.flip_draws(step, cfg.seed, cfg.batch) if cfg.flip else None
        opt.zero_grad(set_to_none=True)
        loss = per_brick = 0  # summed over micro-steps
        for k in range(cfg.grad_accum):  # micro-steps: this rank's chunks of the global batch
            x, y = next(batches)
            first = (k * ranks.world + ranks.rank) * chunk  # where the chunk sits in the global batch
            x = loader.prepare(x.to(device, non_blocking=True), resolution,
                               None if flips is None else flips[first : first + chunk].to(device))
            y = y.to(device) if y is not None else None
            g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
            with distributed.grad_sync(step_fn, k == cfg.grad_accum - 1), autocast:
                micro_loss, micro_per_brick = step_fn(x, y, g, (first, cfg.batch))
            (micro_loss / cfg.grad_accum if cfg.grad_accum > 1 else micro_loss).backward()
            loss, per_brick = loss + micro_loss.detach(), per_brick + micro_per_brick
        opt.step()
        _ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        run.observe(loss, step + 1)
        seen += cfg.batch
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            run.check_loss(hint)
            loss = distributed.mean(loss / cfg.grad_accum, ranks)  # the global batch's loss, on every rank
            per_brick = distributed.mean(per_brick / cfg.grad_accum, ranks)
            value = loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = seen / (time.perf_counter() - tick)
            tick, seen = time.perf_counter(), 0
            record = {"step": step + 1, "loss": round(value, 5), "per_brick": [round(v, 5) for v in per_brick.tolist()],
                      "img_per_s": round(rate, 1), "lr": opt.param_groups[0]["lr"]}
            if ranks.main:
                with open(out / "log.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
                if not progress:
                    print(json.dumps(record), flush=True)
        stop = distributed.stop_signal(run.stop_signal, ranks)  # every rank stops at the same step
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop:
            train_config = {**dataclasses.asdict(cfg), "latents": data.meta} if data.meta else dataclasses.asdict(cfg)
            run.save(step + 1, hint, functools.partial(distributed.save, ckpt_path, model, ema, opt, step + 1,
                                                       train_config, ranks, step_fn, cfg.fsdp))
        if stop:
            bar.close()
            raise Stopped(stop, f"stopped by {signal.Signals(stop).name} after step {step + 1}; saved {ckpt_path} "
                                "(continue with --resume)")
    bar.close()
    run.release_signals()  # from here on Ctrl-C interrupts the sample grid at once; the checkpoint is saved
    if cfg.fsdp and cfg.sample_n > 0:
        ema = distributed.gathered(ema, ranks)  # a plain model on rank 0 (None elsewhere) for the sample grid
    if cfg.sample_n > 0 and ranks.main:
        sample_grid(ema, out / "samples.png", cfg.sample_n, cfg.sample_steps, model.num_classes, resolution, device)
        print(f"lego.train: wrote {out / 'samples.png'} ({cfg.sample_n} EMA samples, {cfg.sample_steps} Heun steps)")
    if ranks.main:
        print(f"lego.train: checkpoint {ckpt_path}")
    distributed.barrier(ranks)
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
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out with a checkpoint, replacing it")
    p.add_argument("--log-every", type=int, help=f"steps between log lines (default {d.log_every})")
    p.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    p.add_argument("--sample-n", type=int, help=f"samples in the final grid, 0 for none (default {d.sample_n})")
    p.add_argument("--sample-steps", type=int, help=f"Heun steps for the final grid (default {d.sample_steps})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--base-ckpt", help="a checkpoint of ours or a diffusers DiT/UNet folder as brick 0 of the PR stack")
    p.add_argument("--freeze-base", action="store_true", default=None, help="with --base-ckpt: train the bricks only")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--flip", action="store_true", default=None, help="mirror each image with probability 1/2")
    p.add_argument("--grad-accum", type=int, metavar="K", help="split each step into K micro-steps (same global batch)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile each brick, fullgraph (backend default inductor)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters and optimizer state (FSDP2) instead of replicating them")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: 4 for a .npy dataset, else 0)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Options given on the command line over the defaults, or over the checkpoint's options with --resume."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    base = TrainConfig()
    if args.resume:
        out = Path(given.get("out", base.out))
        saved = load_checkpoint(out / "checkpoint.safetensors", parts=()).train_config
        keep = set(TrainConfig.__dataclass_fields__) - set(RUNTIME_OPTIONS)
        base = TrainConfig(**{k: v for k, v in saved.items() if k in keep})
    return dataclasses.replace(base, **given)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.resume and args.overwrite:
        parser().error("--resume and --overwrite contradict each other; give one")
    return run_cli("lego.train", lambda: train(
        config_from_args(args), resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
