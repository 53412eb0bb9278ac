"""Checks on what a user gives, made before any work starts: option ranges and devices.

Each failure is a LegoError naming the option, the value and the fix, so the CLIs end in one ``error:`` line.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lego.errors import LegoError
from lego.zoo import model_config

MAX_SEED = 2**31 - 1  # seeds are combined with the step into generator seeds, which must stay below 2^63


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(option: str, value, low: int, high: int | None = None, meaning: str = "") -> None:
    """``value`` is an integer in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"at least {low}" if high is None else f"in {low}..{high}"
        raise LegoError(f"{option} must be an integer {span}{meaning}, got {value!r}")


def real(option: str, value, low: float, high: float = math.inf, low_open=False, high_open=False, meaning="") -> None:
    """``value`` is a finite number in the interval from low to high (each end open or closed)."""
    ok = _number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in {left}{low:g}, {high:g}{right}"
        raise LegoError(f"{option} must be a finite number {span}{meaning}, got {value!r}")


def device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device ``name`` names (default: cuda when there is one), refusing ones this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise LegoError(f"{option} {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LegoError(f"{option} {name} asked for a GPU but torch sees none; drop {option} to use the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LegoError(f"{option} {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if not (backend and hasattr(backend, "is_available") and backend.is_available()):
            raise LegoError(f"{option} {name}: torch has no usable {dev.type} device here; use cpu or cuda")
    return dev


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def check_train_config(cfg, resume: bool = False) -> None:
    """Every number of a TrainConfig, before anything is loaded or written. With ``resume`` the model is the
    checkpoint's (maybe a converted one outside the registry): check_resume compares --resolution with it."""
    integer("--steps", cfg.steps, 1, meaning=" (training steps)")
    integer("--batch", cfg.batch, 1, meaning=" (images per step)")
    real("--lr", cfg.lr, 0, low_open=True, meaning=" (e.g. 1e-3)")
    integer("--warmup", cfg.warmup, 0)
    real("--ema", cfg.ema, 0, 1, high_open=True, meaning=" (a decay per step, e.g. 0.995)")
    real("--patch-fraction", cfg.patch_fraction, 0, 1, low_open=True)
    real("--label-dropout", cfg.label_dropout, 0, 1, high_open=True)
    integer("--seed", cfg.seed, 0, MAX_SEED)
    integer("--log-every", cfg.log_every, 1)
    integer("--ckpt-every", cfg.ckpt_every, 1)
    integer("--sample-n", cfg.sample_n, 0, meaning=" (0 for no sample grid)")
    integer("--sample-steps", cfg.sample_steps, 1)
    if cfg.resolution is not None:
        integer("--resolution", cfg.resolution, 1, meaning=" (a multiple of the model's largest brick)")
    if cfg.resolution is not None and not resume:
        config = model_config(cfg.model)
        largest = max(b.brick_size for b in config.bricks) if hasattr(config, "bricks") else config.patch_size
        if cfg.resolution % largest:
            raise LegoError(
                f"--resolution {cfg.resolution} is not divisible by {cfg.model}'s largest brick (or patch) size "
                f"{largest}; "
                f"use a multiple of {largest}"
            )
    if cfg.precision not in ("fp32", "bf16"):
        raise LegoError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.precond not in ("edm", "vp"):
        raise LegoError(f"--precond must be edm or vp, got {cfg.precond!r}")
    integer("--grad-accum", cfg.grad_accum, 1, meaning=" (micro-steps per step)")
    if cfg.fsdp and cfg.freeze_base:  # checkpoints index the optimizer's state by every parameter's name
        raise LegoError("--fsdp with --freeze-base is not supported: drop --fsdp (DDP handles a frozen base) or train "
                        "the base too")
    if cfg.workers is not None:
        integer("--workers", cfg.workers, 0, meaning=" (DataLoader worker processes)")
    if cfg.compile and cfg.compile not in _compile_backends():
        raise LegoError(f"--compile {cfg.compile}: not a torch.compile backend; use inductor (the default) or one of "
                        f"{', '.join(_compile_backends())}")


def check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window=None,
                         stride=None, max_batch=1) -> None:
    """The numbers lego.sample takes (``sampler`` is already known to exist)."""
    integer("--n", n, 1, meaning=" (samples to draw)")
    if steps is not None:
        integer("--steps", steps, 1, 1000 if sampler in ("ddpm", "ddim") else None)
    real("--cfg-scale", cfg_scale, 0, meaning=" (1 = no guidance)")
    real("--t-break", t_break, 0, 1)
    for option, side in (("--height", height), ("--width", width)):
        if side is not None:
            integer(option, side, 1, meaning=" (a multiple of the model's largest brick)")
    integer("--seed", seed, 0, MAX_SEED)
    integer("--batch", batch, 1, meaning=" (samples per network call)")
    real("--churn", churn, 0)
    if window is not None:
        integer("--window", window, 1, meaning=" (a multiple of the model's largest brick)")
    if stride is not None:
        integer("--stride", stride, 1, meaning=" (pixels between windows)")
    integer("--max-batch", max_batch, 1, meaning=" (windows per network call)")
    if churn and sampler != "heun":
        raise LegoError(f"--churn applies to the heun sampler only, not {sampler}; drop it or use --sampler heun")


def check_guidance(cfg_scale: float, num_classes: int, train_config: dict) -> None:
    """Classifier-free guidance needs classes and a trained null class (lego.sample, lego.eval; once the checkpoint's
    model and training options are known)."""
    if cfg_scale == 1:
        return
    if not num_classes:
        raise LegoError(f"--cfg-scale {cfg_scale:g}: the model is unconditional (trained without classes), so there is "
                        "nothing to guide towards; drop --cfg-scale")
    if train_config.get("label_dropout") == 0:  # (converted checkpoints do not record it: their null class is trained)
        raise LegoError(f"--cfg-scale {cfg_scale:g}: the model was trained with --label-dropout 0, so its null class, "
                        "the unconditional half of guidance, never trained; drop --cfg-scale, or train with "
                        "--label-dropout 0.1")


def check_resume(cfg, saved, saved_step: int, resolution: int, channels: int, num_classes: int) -> None:
    """--resume: the options and data must describe the model in the checkpoint (``saved``, a LegoConfig or
    DiTConfig), its base brick included."""
    clash = []
    if cfg.model != saved.name:
        clash.append(f"--model {cfg.model} (the checkpoint holds {saved.name})")
    if resolution != saved.resolution:
        clash.append(f"--resolution {resolution} (the checkpoint was trained at {saved.resolution})")
    if cfg.precond != saved.precond:
        clash.append(f"--precond {cfg.precond} (the checkpoint uses {saved.precond})")
    if channels != saved.in_channels:
        clash.append(f"--data {cfg.data}: its {channels} channels (the checkpoint's model takes {saved.in_channels})")
    if num_classes != saved.num_classes:
        clash.append(f"--data {cfg.data}: its {num_classes} classes (the checkpoint's model has {saved.num_classes})")
    base = getattr(saved, "base", None) or {}  # brick 0 from a pretrained model (lego.base); DiTs have none
    given, recorded = Path(cfg.base_ckpt or "").expanduser(), Path(base.get("path") or "")
    # (a relative --base-ckpt saved with the run may not resolve from here: only two files that exist are compared)
    if cfg.base_ckpt and (not base or given.exists() and recorded.exists() and not given.samefile(recorded)):
        clash.append(f"--base-ckpt {cfg.base_ckpt} (the checkpoint's base is {base.get('path') or 'none'})")
    if base and bool(cfg.freeze_base) != bool(base.get("frozen")):
        clash.append(f"--freeze-base {'given' if cfg.freeze_base else 'not given'} (the checkpoint's base is "
                     f"{'frozen' if base.get('frozen') else 'trained'})")
    if clash:
        raise LegoError(
            f"--resume: {'; '.join(clash)} contradict the checkpoint in {cfg.out}; drop those options to continue it, "
            "or start a new run in another --out"
        )
    if cfg.steps <= saved_step:
        raise LegoError(f"--resume: the checkpoint is at step {saved_step} already; give --steps above {saved_step}")
