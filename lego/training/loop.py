"""The training loop: ``train(TrainConfig)`` trains a LEGO stack or a DiT into a run folder (``python -m lego.train``).

It writes to ``cfg.out``: log.jsonl (loss, images/s), checkpoint.safetensors + config.json (model, EMA, optimizer),
and samples.png (a grid drawn with the EMA weights). Every random draw comes from (seed, step), so a resumed run, or
one split over ranks or accumulation steps, draws what one uninterrupted run would.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lego import checks
from lego.checkpoints.build import build_model, stack_on_base
from lego.checkpoints.format import check_finite, load_checkpoint, load_weights, with_base_weights
from lego.data import loader
from lego.data.datasets import MappedData, open_dataset, scale_warning
from lego.data.images import save_grid
from lego.diffusion.denoiser import Denoiser
from lego.diffusion.generate import generate, parse_labels
from lego.diffusion.loss import LegoLoss
from lego.errors import LegoError, Stopped
from lego.networks.registry import model_config
from lego.training import distributed
from lego.training.config import TrainConfig, architecture, check_resume, check_train_config
from lego.training.rundir import RunDir


def compile_bricks(model: Denoiser, backend: str = "inductor") -> None:
    """torch.compile each brick's forward, fullgraph (a graph break is an error): the bricks hold the compute, while
    the loss's random draws stay eager. The forward is replaced, not the module, so state-dict keys do not change and
    DDP/FSDP hooks run around the compiled code."""
    for brick in model.net.brick_modules():  # a DiT's transformer is its one brick
        brick.forward = torch.compile(brick.forward, fullgraph=True, backend=backend)


def _workers(cfg: TrainConfig, data) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 4 if isinstance(data, MappedData) else 0  # data in memory is sliced faster than workers start


@torch.no_grad()
def _append_log(path: Path, record: dict, saved_step: int | None) -> None:
    try:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")
    except OSError as e:  # (a full disk was a bare "[Errno 28] No space left on device")
        kept = f"the checkpoint of step {saved_step} is intact" if saved_step else "no checkpoint was written yet"
        raise LegoError(
            f"could not write the training log {path} ({e.strerror}); {kept}. Free some space and continue with "
            "--resume"
        ) from None


def _ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def sample_grid(model, path, n, steps, num_classes, resolution, device, seed=0):
    """The run's final grid: n EMA samples by Heun, one class per column (0, 1, 2, ... cycled)."""
    labels = parse_labels(None, n, num_classes)  # lego.sample's default
    images, _ = generate(
        model, n, "heun", steps, labels=labels, height=resolution, width=resolution, seed=seed, batch=n, device=device
    )
    save_grid(images, path, nrow=num_classes if 1 < num_classes <= 16 else None)
    return images


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Train per ``cfg``; returns the output folder. ``resume`` continues from ``cfg.out``'s checkpoint; without it a
    folder that holds a checkpoint is refused unless ``overwrite``. Every option is checked before anything is loaded
    or written; the folder is locked while the run lasts (lego.training.rundir). Under torchrun every rank calls
    this; rank 0 alone owns the folder, logs, writes checkpoints and samples (lego.training.distributed)."""
    check_train_config(cfg, resume)
    ranks, device, created = distributed.setup(cfg.device, checks.device)
    try:
        run = RunDir(cfg.out, resume=resume, overwrite=overwrite, ranks=ranks, keep=cfg.keep_checkpoints)
        distributed.agree(run.open, ranks)  # rank 0's folder checks: if they fail, every rank stops
        try:
            return _train(cfg, run, resume, progress and ranks.main, ranks, device)
        finally:
            run.close()
    finally:
        distributed.teardown(created)


def _train(
    cfg: TrainConfig, run: RunDir, resume: bool, progress: bool, ranks: distributed.Dist, device: torch.device
) -> Path:
    out, ckpt_path = run.out, run.ckpt_path
    resolution = cfg.resolution or model_config(cfg.model).resolution  # (an unknown name fails here, clearly)
    data = open_dataset(cfg.data, resolution)
    warning = scale_warning(data) if ranks.main else None
    if warning:
        print(f"lego.train: warning: {warning}", file=sys.stderr, flush=True)
    channels = data.channels
    torch.manual_seed(cfg.seed)  # the initial weights; every later draw comes from per-step generators
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_finite(ckpt, ckpt_path)
        check_resume(cfg, ckpt.model_config, ckpt.step, resolution, channels, data.num_classes)
        model = build_model(ckpt.model_config)
    elif cfg.base_ckpt:
        model = stack_on_base(
            cfg.model,
            cfg.base_ckpt,
            cfg.freeze_base,
            in_channels=channels,
            num_classes=data.num_classes,
            precond=cfg.precond,
            resolution=resolution,
            **architecture(cfg),
        )
    else:
        model = build_model(
            model_config(
                cfg.model,
                in_channels=channels,
                num_classes=data.num_classes,
                precond=cfg.precond,
                resolution=resolution,
                **architecture(cfg),
            )
        )
    model.check_canvas(torch.empty(1, channels, resolution, resolution, device="meta"))
    loss_fn = LegoLoss(cfg.patch_fraction, cfg.label_dropout)
    batches = loader.batches(
        data,
        cfg.batch,
        cfg.seed,
        ckpt.step if ckpt else 0,
        cfg.steps,
        ranks.rank,
        ranks.world,
        cfg.grad_accum,
        _workers(cfg, data),
        device,
    )
    if ckpt is not None:
        load_weights(model, with_base_weights(model, ckpt.model), ckpt_path)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None:
        load_weights(ema, with_base_weights(ema, ckpt.ema), ckpt_path)
    if cfg.compile:
        compile_bricks(model, cfg.compile)
    net = distributed.wrap(model, ranks, device, cfg.fsdp)  # what the loss calls
    if cfg.fsdp:
        distributed.shard_like(ema, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    start = 0
    if ckpt is not None:
        distributed.load_optimizer(opt, net, ckpt.optimizer, cfg.fsdp)
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
            x = loader.prepare(
                x.to(device, non_blocking=True),
                resolution,
                None if flips is None else flips[first : first + chunk].to(device),
            )
            y = y.to(device) if y is not None else None
            g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
            with distributed.grad_sync(net, k == cfg.grad_accum - 1), autocast:
                micro_loss, micro_per_brick = loss_fn(net, x, y, g, (first, cfg.batch))
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
            record = {
                "step": step + 1,
                "loss": round(value, 5),
                "per_brick": [round(v, 5) for v in per_brick.tolist()],
                "img_per_s": round(rate, 1),
                "lr": opt.param_groups[0]["lr"],
            }
            if ranks.main:
                _append_log(out / "log.jsonl", record, run.saved_step)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
                if not progress:
                    print(json.dumps(record), flush=True)
        stop = distributed.stop_signal(run.stop_signal, ranks)  # every rank stops at the same step
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop:
            train_config = {**dataclasses.asdict(cfg), "latents": data.meta} if data.meta else dataclasses.asdict(cfg)
            run.save(
                step + 1,
                hint,
                functools.partial(
                    distributed.save, ckpt_path, model, ema, opt, step + 1, train_config, ranks, net, cfg.fsdp
                ),
            )
        if stop:
            bar.close()
            raise Stopped(
                stop,
                f"stopped by {signal.Signals(stop).name} after step {step + 1}; saved {ckpt_path} "
                "(continue with --resume)",
            )
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
