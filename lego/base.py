"""A pretrained diffusion model as the bottom brick of a LEGO-PR stack (Zheng et al., Sec. 3.3, Table 4).

Any denoiser D(x; sigma, labels) can be brick 0: LegoModel runs it on the noisy canvas and hands the bricks above
the raw output F_0 = (D - c_skip x) / c_out that reproduces its prediction, so the patch-bricks refine it exactly as
they refine an image-brick, and skipping rules, samplers and the joint loss work unchanged.

The bricks above a base refine it from the start: brick k outputs F_k = F_{k-1} + f_k, its own output f_k added to the
one below (on the patches it processed; the others keep the training fill, x0, as before). A new brick's f_k is zero
(adaLN-Zero), so the untrained stack is exactly the base and training starts from the base's loss instead of first
learning to pass the base's prediction on (the README's table measures both). Every brick's own prediction is then a
refinement of the base, so the joint loss over bricks and skipping work unchanged; skipping every brick above the base
gives the base. The add is one pass over the [B, C, H, W] canvas in PyTorch, not fused into patch_unembed: a few
channels against the brick's [N, S, d] tokens. The config records the choice (``base["refine"]``); stacks on a base
saved before it load and run as they were.

Three sources:

- a module computing ``D(x, sigma, class_labels)`` in EDM's view x = x0 + sigma n (Python only);
- a diffusers ``DiTTransformer2DModel`` or ``UNet2DModel`` folder (``save_pretrained``), trained as DDPM
  (1000 linear-beta steps) to predict epsilon, v or x0: ``DiffusersDenoiser`` adapts it to the EDM call;
- a checkpoint of ours, read with the usual checkpoint loader (``lego.checkpoint.load_model``, EMA weights).

The stack's config records where the base came from (``LegoConfig.base``): kind, path, its own config, prediction
and whether it is frozen. A frozen base's weights are not copied into the checkpoint (they are read from the origin
again when the checkpoint is loaded); a fine-tuned base's weights are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lego.errors import LegoError
from lego.precond import VPPrecond

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "UNet2DModel")
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # diffusers' names for epsilon, v and x0 prediction


class DiffusersDenoiser(nn.Module):
    """D(x; sigma, labels) from a diffusers DDPM model (epsilon, v or x0 prediction).

    EDM's x = x0 + sigma n is DDPM's x_t / sqrt(abar) with abar = 1 / (1 + sigma^2); the model sees x_t = x sqrt(abar)
    and the training step whose sigma is nearest (as VPPrecond does), and its prediction is turned into x0.
    """

    def __init__(self, model: nn.Module, prediction: str = "epsilon", num_train_timesteps: int = 1000):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise LegoError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.model, self.prediction = model, prediction
        self.schedule = VPPrecond(num_train_timesteps)
        cfg = getattr(model, "config", {})
        # DiT's label table has a last row for the null class, at index num_classes as ours; UNet2DModel's has none.
        self.num_classes = int(cfg.get("num_embeds_ada_norm") or cfg.get("num_class_embeds") or 0)
        self.has_null = bool(cfg.get("num_embeds_ada_norm"))

    def forward(self, x, sigma, class_labels=None):
        """x [B, C, H, W], sigma [B] -> x0 estimate [B, C, H, W] (fp32)."""
        sigma = sigma.float().reshape(-1)
        abar = 1 / (1 + sigma.double() ** 2)  # (B,)
        a = abar.sqrt().float().view(-1, 1, 1, 1)
        s = (1 - abar).sqrt().float().view(-1, 1, 1, 1)
        x_t = x * a  # DDPM's x_t
        labels = None
        if self.num_classes:
            labels = class_labels if class_labels is not None else torch.full(sigma.shape, self.num_classes)
            labels = labels.to(x.device).long()
            if not self.has_null and (labels >= self.num_classes).any():
                raise LegoError(
                    "this UNet2DModel has no null class, so it cannot run without labels: "
                    "train with --label-dropout 0 and sample without --cfg-scale"
                )
        out = self.model(x_t, self.schedule.timestep(sigma), class_labels=labels).sample.float()
        out = out[:, : x.shape[1]]  # DiT with a learned variance outputs 2C channels: the first C are the mean's
        if self.prediction == "epsilon":
            return x - sigma.view(-1, 1, 1, 1) * out
        if self.prediction == "v_prediction":
            return a * x_t - s * out  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return out


class BaseBrick(nn.Module):
    """Brick 0 of a stack: runs ``denoiser`` (D(x; sigma, labels)) and returns the raw output F_0 the bricks above
    take as their previous brick's output."""

    is_base = True

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.brick_size = None  # the whole canvas, like an image-brick

    def num_patches(self, height: int, width: int) -> int:
        return 1

    def forward(self, x, sigma, class_labels, precond):
        """x [B, C, H, W] (not scaled by c_in), sigma [B] -> F_0 [B, C, H, W] with c_skip x + c_out F_0 = D_base."""
        frozen = not any(p.requires_grad for p in self.denoiser.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen base costs no backward
            d = self.denoiser(x, sigma, class_labels).float()  # (B, C, H, W)
        c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in precond.coefficients(sigma))
        return (d - c_skip * x) / c_out


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
        import diffusers

        model = getattr(diffusers, name).from_pretrained(str(path), low_cpu_mem_usage=False)  # (no accelerate)
        record = {"kind": "diffusers", "class": name, "config": dict(model.config),
                  "prediction": prediction or _prediction_of(path)}
        denoiser = DiffusersDenoiser(model, record["prediction"])
    elif path.is_file():
        from lego.checkpoint import load_checkpoint, load_model

        denoiser = load_model(path, use_ema=True)
        record = {"kind": "lego", "config": load_checkpoint(path, parts=()).model_config.to_dict()}
    else:
        raise LegoError(f"base model not found: {path}; give a checkpoint of ours or a diffusers model folder")
    record["path"] = str(path.resolve())
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
        return load_base(record["path"], record.get("prediction"))[0]
    if kind == "diffusers":
        import diffusers

        model = getattr(diffusers, record["class"]).from_config(record["config"])
        return DiffusersDenoiser(model, record["prediction"])
    if kind == "lego":  # a checkpoint of ours: a LEGO stack or a DiT
        from lego.zoo import build_model, config_from_dict

        return build_model(config_from_dict(record["config"])).eval()
    raise LegoError(f"unknown base kind {kind!r} in the model config")


def stack_on_base(name: str, base, freeze: bool = False, refine: bool = True, **options):
    """The PR stack ``name`` with its bottom image-brick replaced by ``base``: a path (see load_base) or a module
    computing D(x, sigma, class_labels). ``refine``: the bricks above add their output to the one below (see the module
    docstring; False gives plain bricks, which start from a zero prediction). ``options`` are model options
    (in_channels, num_classes, resolution, ...)."""
    from lego.models import LegoModel, model_config

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


def base_is_frozen(model) -> bool:
    return bool(getattr(model.config, "base", None) and model.config.base.get("frozen"))


def stored_state(model) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint holds: all of it but a frozen base's weights."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if not (base_is_frozen(model) and k.startswith("bricks.0."))}


def with_base_weights(model, state: dict) -> dict:
    """A checkpoint's state dict completed with the frozen base's weights the model was built with."""
    if not base_is_frozen(model):
        return state
    return {**{f"bricks.0.{k}": v for k, v in model.bricks[0].state_dict().items()}, **state}
