"""A training run's options (``TrainConfig``), and their checks, made before anything is loaded or written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lego import checks
from lego.checkpoints.format import load_checkpoint
from lego.errors import LegoError
from lego.networks.registry import is_dit, model_config


@dataclass
class TrainConfig:
    model: str = "LEGO-T-PR-16"
    data: str = "default"
    resolution: int | None = None  # default: the model's canvas
    precond: str = "edm"
    batch: int = 64
    steps: int = 800
    lr: float = 4e-3  # the demo's best (studies/matched_compute.py: better than 2e-3 for every tiny model tried)
    warmup: int = 100  # steps of linear learning-rate warm-up
    ema: float = 0.995  # EMA decay per step (ramped up over the first steps); ~0.9999 for long runs
    precision: str = "fp32"  # or "bf16" (autocast)
    # Share of each patch-brick's patches trained per image (paper: 0.5 CelebA, 0.75 ImageNet). The tiny demo uses
    # all of them: the bricks above see x0 in the others, and a tiny model learns to lean on it (README, "Training").
    patch_fraction: float = 1.0
    # Blocks per brick, bottom to top (a LEGO stack), or one number, a DiT's blocks; None: the registry's
    depths: tuple[int, ...] | None = None
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
    keep_checkpoints: int = 2  # the newest checkpoint and those before it, as checkpoint-STEP.safetensors
    base_ckpt: str | None = None  # a pretrained denoiser as brick 0 of the PR stack --model (lego.checkpoints.build)
    freeze_base: bool = False  # train only the bricks on top of it


# How the work is done: not taken from the checkpoint on --resume.
RUNTIME_OPTIONS = ("grad_accum", "compile", "fsdp", "workers", "keep_checkpoints")


def resolve_config(given: dict, resume: bool = False) -> TrainConfig:
    """The options ``given`` (those a user set) over the defaults, or with ``resume`` over the options of the run in
    ``given["out"]``'s checkpoint (the options of how the work is done, RUNTIME_OPTIONS, are never taken from it)."""
    given = {k: v for k, v in given.items() if v is not None and k in TrainConfig.__dataclass_fields__}
    base = TrainConfig()
    if resume:
        out = Path(given.get("out", base.out))
        saved = load_checkpoint(out / "checkpoint.safetensors", parts=()).train_config
        keep = set(TrainConfig.__dataclass_fields__) - set(RUNTIME_OPTIONS)
        base = TrainConfig(**{k: v for k, v in saved.items() if k in keep})
    return dataclasses.replace(base, **given)


def registry_depths(config) -> tuple[int, ...]:
    """A model config's depths as --depths gives them: blocks per brick (LEGO), or (blocks,) (DiT)."""
    return tuple(b.depth for b in config.bricks) if hasattr(config, "bricks") else (config.num_layers,)


def architecture(cfg: TrainConfig) -> dict:
    """The model options --depths sets (model_config's keyword arguments)."""
    if cfg.depths is None:
        return {}
    return {"depths": tuple(cfg.depths)} if not is_dit(cfg.model) else {"num_layers": cfg.depths[0]}


def _compile_backends() -> list[str]:
    import torch._dynamo  # a second or more to import: only when --compile is given

    return torch._dynamo.list_backends(exclude_tags=())


def check_train_config(cfg, resume: bool = False) -> None:
    """Every number of a TrainConfig, before anything is loaded or written. With ``resume`` the model is the
    checkpoint's (maybe a converted one outside the registry): check_resume compares --resolution with it."""
    checks.integer("--steps", cfg.steps, 1, meaning=" (training steps)")
    checks.integer("--batch", cfg.batch, 1, meaning=" (images per step)")
    checks.real("--lr", cfg.lr, 0, low_open=True, meaning=" (e.g. 1e-3)")
    checks.integer("--warmup", cfg.warmup, 0)
    checks.real("--ema", cfg.ema, 0, 1, high_open=True, meaning=" (a decay per step, e.g. 0.995)")
    checks.real("--patch-fraction", cfg.patch_fraction, 0, 1, low_open=True)
    checks.real("--label-dropout", cfg.label_dropout, 0, 1, high_open=True)
    checks.integer("--seed", cfg.seed, 0, checks.MAX_SEED)
    checks.integer("--log-every", cfg.log_every, 1)
    checks.integer("--ckpt-every", cfg.ckpt_every, 1)
    checks.integer("--keep-checkpoints", cfg.keep_checkpoints, 1, meaning=" (the newest and those before it)")
    checks.integer("--sample-n", cfg.sample_n, 0, meaning=" (0 for no sample grid)")
    checks.integer("--sample-steps", cfg.sample_steps, 1)
    if cfg.resolution is not None:
        checks.integer("--resolution", cfg.resolution, 1, meaning=" (a multiple of the model's largest brick)")
    if cfg.resolution is not None and not resume:
        config = model_config(cfg.model)
        largest = max(b.brick_size for b in config.bricks) if hasattr(config, "bricks") else config.patch_size
        if cfg.resolution % largest:
            raise LegoError(
                f"--resolution {cfg.resolution} is not divisible by {cfg.model}'s largest brick (or patch) size "
                f"{largest}; "
                f"use a multiple of {largest}"
            )
    if cfg.depths is not None:
        for d in cfg.depths:
            checks.integer("--depths", d, 1, meaning=" (blocks per brick)")
        want = len(registry_depths(model_config(cfg.model)))
        if len(cfg.depths) != want:
            what = "one number, its blocks" if is_dit(cfg.model) else f"{want} numbers, blocks per brick bottom to top"
            raise LegoError(f"--depths {','.join(map(str, cfg.depths))}: {cfg.model} takes {what}")
    if cfg.precision not in ("fp32", "bf16"):
        raise LegoError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.precond not in ("edm", "vp"):
        raise LegoError(f"--precond must be edm or vp, got {cfg.precond!r}")
    checks.integer("--grad-accum", cfg.grad_accum, 1, meaning=" (micro-steps per step)")
    base = Path(cfg.base_ckpt or "").expanduser().resolve()
    if cfg.base_ckpt and base.parent == Path(cfg.out).expanduser().resolve() and base.name.startswith("checkpoint"):
        raise LegoError(
            f"--base-ckpt {cfg.base_ckpt} is a checkpoint of --out {cfg.out}, which this run replaces: a stack "
            "cannot be its own base. Copy the base elsewhere first, or pick another --out"
        )
    if cfg.freeze_base and not cfg.base_ckpt:
        raise LegoError("--freeze-base freezes the base of --base-ckpt, and none was given: add --base-ckpt PATH")
    if cfg.fsdp and cfg.freeze_base:  # checkpoints index the optimizer's state by every parameter's name
        raise LegoError(
            "--fsdp with --freeze-base is not supported: drop --fsdp (DDP handles a frozen base) or train the base too"
        )
    if cfg.workers is not None:
        checks.integer("--workers", cfg.workers, 0, meaning=" (DataLoader worker processes)")
    if cfg.compile and cfg.compile not in _compile_backends():
        raise LegoError(
            f"--compile {cfg.compile}: not a torch.compile backend; use inductor (the default) or one of "
            f"{', '.join(_compile_backends())}"
        )


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
    if cfg.depths is not None and tuple(cfg.depths) != registry_depths(saved):
        clash.append(f"--depths {','.join(map(str, cfg.depths))} (the checkpoint's are "
                     f"{','.join(map(str, registry_depths(saved)))})")  # fmt: skip
    if channels != saved.in_channels:
        clash.append(f"--data {cfg.data}: its {channels} channels (the checkpoint's model takes {saved.in_channels})")
    if num_classes != saved.num_classes:
        clash.append(f"--data {cfg.data}: its {num_classes} classes (the checkpoint's model has {saved.num_classes})")
    base = (
        getattr(saved, "base", None) or {}
    )  # brick 0 from a pretrained model (lego.checkpoints.build); DiTs have none
    given, recorded = Path(cfg.base_ckpt or "").expanduser(), Path(base.get("path") or "")
    # (a relative --base-ckpt saved with the run may not resolve from here: only two files that exist are compared)
    if cfg.base_ckpt and (not base or given.exists() and recorded.exists() and not given.samefile(recorded)):
        clash.append(f"--base-ckpt {cfg.base_ckpt} (the checkpoint's base is {base.get('path') or 'none'})")
    if base and bool(cfg.freeze_base) != bool(base.get("frozen")):
        clash.append(
            f"--freeze-base {'given' if cfg.freeze_base else 'not given'} (the checkpoint's base is "
            f"{'frozen' if base.get('frozen') else 'trained'})"
        )
    if clash:
        raise LegoError(
            f"--resume: {'; '.join(clash)} contradict the checkpoint in {cfg.out}; drop those options to continue it, "
            "or start a new run in another --out"
        )
    if cfg.steps <= saved_step:
        raise LegoError(f"--resume: the checkpoint is at step {saved_step} already; give --steps above {saved_step}")
