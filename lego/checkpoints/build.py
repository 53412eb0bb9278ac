"""Building denoisers from a config, a checkpoint or a pretrained base; ``load(path)``, the public way to load one.

A pretrained diffusion model can be the bottom brick of a LEGO-PR stack (Zheng et al., Sec. 3.3, Table 4): the stack
runs it on the noisy canvas and hands the bricks above the raw output F_0 = (D - c_skip x) / c_out that reproduces its
prediction (lego.networks.stack.BaseBrick), so the patch-bricks refine it exactly as they refine an image-brick, and
skipping rules, samplers and the joint loss work unchanged.

The bricks above a base refine it from the start: brick k outputs F_k = F_{k-1} + f_k, its own output f_k added to the
one below (on the patches it processed; the others keep the training fill, x0, as before). A new brick's f_k is zero
(adaLN-Zero), so the untrained stack is exactly the base and training starts from the base's loss instead of first
learning to pass the base's prediction on (the README's table measures both). Skipping every brick above the base
gives the base. The config records the choice (``base["refine"]``); stacks on a base saved before it load and run as
they were.

Three sources of a base:

- a module computing ``D(x, sigma, class_labels)`` in EDM's view x = x0 + sigma n (Python only);
- a diffusers ``DiTTransformer2DModel`` or ``UNet2DModel`` folder (``save_pretrained``), trained as DDPM
  (1000 linear-beta steps) to predict epsilon, v or x0 (lego.diffusion.diffusers.DiffusersDenoiser);
- a checkpoint of ours (its EMA weights).

The stack's config records where the base came from (``LegoConfig.base``): kind, path, its own config, prediction,
whether it is frozen and the SHA-256 of its weights. A frozen base's weights are not copied into the checkpoint (they
are read from the origin again when the checkpoint is loaded, and refused if their checksum changed: the bricks were
trained on the old ones); a fine-tuned base's weights are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lego.checkpoints.format import load_checkpoint, load_weights, non_finite, tensors_digest, with_base_weights
from lego.diffusion.denoiser import DiTModel, LegoModel
from lego.diffusion.diffusers import DIFFUSERS_CLASSES, DiffusersDenoiser
from lego.errors import LegoError
from lego.networks.dit import DiTConfig
from lego.networks.registry import config_from_dict
from lego.networks.stack import LegoConfig, model_config


def _prediction_of(folder: Path) -> str:
    """The prediction type in a diffusers pipeline's scheduler config beside the model, else epsilon (DiT, DDPM)."""
    for cfg in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if cfg.is_file():
            return json.loads(cfg.read_text()).get("prediction_type", "epsilon")
    return "epsilon"


def load_base(path, prediction: str | None = None) -> tuple[nn.Module, dict]:
    """The denoiser stored at ``path`` (a diffusers model folder or a checkpoint of ours) and its origin record."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        name = config.get("_class_name")
        if name not in DIFFUSERS_CLASSES:
            raise LegoError(f"{path} holds a diffusers {name}; a base must be one of {', '.join(DIFFUSERS_CLASSES)}")
        import diffusers  # optional (the latent and test extras): only diffusers bases need it

        model = getattr(diffusers, name).from_pretrained(str(path), low_cpu_mem_usage=False)  # (no accelerate)
        record = {"kind": "diffusers", "class": name, "config": dict(model.config),
                  "prediction": prediction or _prediction_of(path)}  # fmt: skip
        denoiser = DiffusersDenoiser(model, record["prediction"])
    elif path.is_file():
        denoiser = load_model(path, use_ema=True)
        record = {"kind": "lego", "config": load_checkpoint(path, parts=()).model_config.to_dict()}
    else:
        raise LegoError(f"base model not found: {path}; give a checkpoint of ours or a diffusers model folder")
    record["path"] = str(path.resolve())
    state = denoiser.state_dict()
    bad = non_finite(state)
    if bad:  # (training on it ended in "the loss is not finite ... Lower --lr")
        raise LegoError(f"the base {path}: {len(bad)} of its weight tensors hold NaN or inf (first {bad[0]})")
    record["checksum"] = tensors_digest(state)
    return denoiser, record


def build_base(record: dict) -> nn.Module:
    """The base denoiser a stack's config records: with the origin's weights when frozen (a checkpoint does not hold
    them), else only its architecture (the checkpoint's weights are loaded over it)."""
    kind = record.get("kind")
    if kind == "module":
        raise LegoError("this model's base is a Python module; build it with LegoModel(config, base=module)")
    if record.get("frozen"):
        if not Path(record["path"]).exists():
            raise LegoError(f"the frozen base {record['path']} is missing; the checkpoint does not hold its weights")
        base, now = load_base(record["path"], record.get("prediction"))
        if record.get("checksum", now["checksum"]) != now["checksum"]:  # (stacks saved before checksums: unchecked)
            raise LegoError(
                f"the frozen base {record['path']} has changed since this stack was trained on it (its weights' "
                "checksum differs): the bricks above it learned to refine the old one. Put that base back, or "
                "train the stack again on the new one"
            )
        return base
    if kind == "diffusers":
        import diffusers  # optional, as above

        model = getattr(diffusers, record["class"]).from_config(record["config"])
        return DiffusersDenoiser(model, record["prediction"])
    if kind == "lego":  # a checkpoint of ours: a LEGO stack or a DiT
        return build_model(config_from_dict(record["config"])).eval()
    raise LegoError(f"unknown base kind {kind!r} in the model config")


def build_model(config: LegoConfig | DiTConfig) -> LegoModel | DiTModel:
    """The denoiser a config describes: a DiT, or a LEGO stack with the base its config records loaded."""
    if isinstance(config, DiTConfig):
        return DiTModel(config)
    return LegoModel(config, build_base(config.base) if config.base else None)


def stack_on_base(name: str, base, freeze: bool = False, refine: bool = True, **options) -> LegoModel:
    """The PR stack ``name`` with its bottom image-brick replaced by ``base``: a path (see load_base) or a module
    computing D(x, sigma, class_labels). ``refine``: the bricks above add their output to the one below (see the module
    docstring; False gives plain bricks, which start from a zero prediction). ``options`` are model options
    (in_channels, num_classes, resolution, ...)."""
    if isinstance(base, nn.Module):
        denoiser, record = base, {"kind": "module", "class": type(base).__name__}
    else:
        denoiser, record = load_base(base)
    record["frozen"], record["refine"] = bool(freeze), bool(refine)
    config = model_config(name, base=record, **options)
    if len(config.bricks) < 2 or config.bricks[0].brick_size != max(b.brick_size for b in config.bricks):
        raise LegoError(f"{name} is not a PR stack; a base replaces the bottom image-brick of one (e.g. LEGO-T-PR-16)")
    base_classes = getattr(denoiser, "num_classes", 0)
    if base_classes and base_classes != config.num_classes:
        raise LegoError(f"the base has {base_classes} classes but the data has {config.num_classes}")
    probe = torch.zeros(1, config.in_channels, config.resolution, config.resolution)
    try:
        with torch.no_grad():
            denoiser.float()(probe, torch.ones(1), None)
    except (RuntimeError, ValueError) as e:
        raise LegoError(
            f"the base cannot denoise a {tuple(probe.shape[1:])} canvas ({str(e).splitlines()[0]}); "
            "match --resolution and the data's channels to it"
        ) from None
    return LegoModel(config, base=denoiser)


_LOADING: set[Path] = set()  # the checkpoints load_model is reading, to refuse one that is its own frozen base


def load_model(path, use_ema: bool = True, device="cpu") -> LegoModel | DiTModel:
    """The denoiser in a checkpoint written by lego.train or lego.convert, ready to sample (``lego.load``): its EMA
    weights (``use_ema`` False: the raw ones), in eval mode on ``device``. ``D = model(x, sigma, labels)``."""
    resolved = Path(path).expanduser().resolve()
    if resolved in _LOADING:
        raise LegoError(
            f"{path} names itself as its frozen base (a run trained with --base-ckpt on its own --out's checkpoint), "
            "so the base's weights were replaced by the stack's; the checkpoint cannot be used"
        )
    _LOADING.add(resolved)
    try:
        return _load_model(path, use_ema, device)
    finally:
        _LOADING.discard(resolved)


def _load_model(path, use_ema: bool, device) -> LegoModel | DiTModel:
    ckpt = load_checkpoint(path, parts=("ema",) if use_ema else ("model",))
    weights = ckpt.ema if use_ema else ckpt.model
    if not weights:  # e.g. tests/fixtures' models, which keep the EMA only
        raise LegoError(
            f"{path} holds no {'EMA' if use_ema else 'raw'} weights; "
            f"{'use its raw weights (--raw)' if use_ema else 'use its EMA weights (drop --raw)'}"
        )
    bad = non_finite(weights)
    if bad:
        raise LegoError(
            f"{path}: {len(bad)} of its {len(weights)} {'EMA' if use_ema else 'raw'} weight tensors hold NaN or inf "
            f"(first {bad[0]}); it would sample NaN images: use a checkpoint from before the run diverged"
        )
    model = build_model(ckpt.model_config)
    load_weights(model, with_base_weights(model, weights), path)
    return model.to(device).eval()


def check_guidance(cfg_scale: float, num_classes: int, train_config: dict, classifier_free: bool = True) -> None:
    """Classifier-free guidance needs classes and a trained null class (checked once the checkpoint's model and
    training options are known); guidance by a sub-stack or a guide model (``classifier_free`` False) needs
    neither."""
    if cfg_scale == 1 or not classifier_free:
        return
    if not num_classes:
        raise LegoError(
            f"--cfg-scale {cfg_scale:g}: the model is unconditional (trained without classes), so there is "
            "nothing to guide towards; drop --cfg-scale"
        )
    if train_config.get("label_dropout") == 0:  # (converted checkpoints do not record it: their null class is trained)
        raise LegoError(
            f"--cfg-scale {cfg_scale:g}: the model was trained with --label-dropout 0, so its null class, "
            "the unconditional half of guidance, never trained; drop --cfg-scale, or train with "
            "--label-dropout 0.1"
        )


def check_skipping(train_config: dict, t_break: float, guide_skip=None) -> None:
    """Brick skipping runs the lower bricks without the ones above: refused on a model whose lower bricks never
    learned to denoise on their own (a released snapshot trained with ``--joint=False``, as lego.convert records)."""
    if train_config.get("joint", True) is False and (t_break or guide_skip):
        option = "--t-break" if t_break else "--guide-skip"
        raise LegoError(
            f"{option}: this model was trained with --joint=False (only its top brick learned to denoise), so "
            "skipping bricks would sample from bricks that never did; drop it"
        )


def load_for_sampling(ckpt, guide_ckpt, use_ema: bool, device, cfg_scale: float, t_break: float, guide_skip=None):
    """(model, guide model or None, the checkpoint's training options) to sample ``ckpt`` with this guidance and brick
    skipping, both checked against how the model was trained (check_guidance, check_skipping)."""
    model = load_model(ckpt, use_ema=use_ema, device=device)
    guide = load_model(guide_ckpt, use_ema=use_ema, device=device) if guide_ckpt is not None else None
    train_config = load_checkpoint(ckpt, parts=()).train_config
    check_guidance(cfg_scale, model.num_classes, train_config, classifier_free=guide is None and guide_skip is None)
    check_skipping(train_config, t_break, guide_skip)
    return model, guide, train_config
