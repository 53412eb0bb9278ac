"""The denoiser: a preconditioning wrapper around a backbone, in EDM's shape (Karras et al., 2022, ``EDMPrecond``).

``Denoiser(backbone, precond)(x, sigma, class_labels=None, skip=())`` is D(x; sigma) = c_skip x + c_out F in fp32,
F being the raw output of the top brick that ran (lego.networks.interface); bricks listed in ``skip`` (0 = bottom;
negative indices count from the top, -1 being the top brick) are not run and pass their predecessor's output on.
sigma must be >= 0; sigma = 0 returns x. Every caller, the loss, the samplers, guidance, the sliding window, the
training step and lego.eval, goes through this call: with ``every_brick=True`` it returns every brick's own D_k (the
joint loss), and ``patches`` / ``x0`` ask for training's patch sampling, the unprocessed patches taking x0.

``LegoModel(config)`` is the LEGO stack so wrapped, ``DiTModel(config)`` the DiT (lego.checkpoints.build_model
builds either from its config). The backbone sits at ``.net`` (state-dict keys ``net.*``); checkpoints written
before that (keys without the prefix) load unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lego.diffusion.precond import as_batch_sigma, make_precond
from lego.networks.dit import DiT, DiTConfig
from lego.networks.interface import BrickOutput, NoiseLevel, PatchDraw
from lego.networks.stack import LegoConfig, LegoStack, model_config


class Denoiser(nn.Module):
    """D(x; sigma, class_labels) around ``net``, a backbone (lego.networks.interface), under ``precond``
    (lego.diffusion.precond). ``time_scale`` multiplies c_noise before the time embedding (default: the
    preconditioning's own)."""

    def __init__(self, net: nn.Module, precond, time_scale: float | None = None):
        super().__init__()
        self.net = net
        self.precond = precond
        self.time_scale = precond.embed_scale if time_scale is None else time_scale
        self.sigma_min, self.sigma_max = precond.sigma_min, precond.sigma_max
        self.register_load_state_dict_pre_hook(_backbone_prefix)

    # What samplers, guidance and the sliding window read of a denoiser: the backbone's own.
    @property
    def config(self):
        return self.net.config

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def resolution(self) -> int:
        return self.net.config.resolution

    @property
    def max_brick(self) -> int:
        return self.net.max_brick

    def check_canvas(self, x: torch.Tensor) -> None:
        self.net.check_canvas(x)

    def forward(
        self,
        x,
        sigma,
        class_labels=None,
        skip=(),
        *,
        patches: PatchDraw | None = None,
        x0=None,
        every_brick: bool = False,
    ):
        """The denoiser D(x; sigma) [B, C, H, W] (fp32) of the top brick that runs; with ``every_brick`` a
        BrickOutput per brick that ran, bottom to top, its ``denoised`` D_k. ``x0`` (with ``patches``): the clean
        images whose brick output the unprocessed patches take."""
        x = x.float()
        self.net.check_canvas(x)
        batch = x.shape[0]
        sigma = as_batch_sigma(sigma, batch, x.device)
        skip = self._skip_set(skip)
        # Value checks cost a device sync: made on eager calls on data, not on training's (LegoLoss checks those).
        if not torch.compiler.is_compiling() and x.device.type != "meta":
            check_inputs(sigma, class_labels, batch, self.num_classes, values=patches is None)
        zero = sigma == 0  # D(x; 0) = x: there is no noise to remove (and c_noise = log 0 would poison the batch)
        noise = self.noise_level(torch.where(zero, torch.ones_like(sigma), sigma))
        c_skip, c_out, zero = noise.c_skip.view(-1, 1, 1, 1), noise.c_out.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1)
        fill = None if x0 is None else (x0 - c_skip * x) / c_out  # the brick output that reproduces x0 exactly
        outputs = self.net(x, noise, class_labels, skip, patches, fill)
        if not every_brick:
            return torch.where(zero, x, c_skip * x + c_out * outputs[-1].output)  # (B, C, H, W)
        return [dataclasses.replace(o, denoised=torch.where(zero, x, c_skip * x + c_out * o.output)) for o in outputs]

    def noise_level(self, sigma: torch.Tensor) -> NoiseLevel:
        """What the backbone sees of sigma [B] (> 0): the preconditioning's coefficients for it."""
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        return NoiseLevel(sigma, c_skip, c_out, c_in, c_noise * self.time_scale)

    def _skip_set(self, skip) -> frozenset[int]:
        if not skip:
            return frozenset()
        n = self.net.num_bricks
        if n == 1:
            raise ValueError(f"{self.config.name} has no bricks to skip; brick skipping (--t-break) is for LEGO models")
        out_of_range = [int(k) for k in skip if not -n <= int(k) < n]
        if out_of_range:
            raise ValueError(f"skip {out_of_range}: this model's bricks are 0..{n - 1} (or -{n}..-1 from the top)")
        skip = frozenset(int(k) % n for k in skip)  # negative indices count from the top, as in Python
        if len(skip) == n:
            raise ValueError("every brick is skipped; keep at least one")
        return skip


def _backbone_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Checkpoints written before the backbone moved to ``.net`` name its tensors without the prefix."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
        state_dict[prefix + "net." + key[len(prefix) :]] = state_dict.pop(key)


class LegoModel(Denoiser):
    """A LEGO stack (lego.networks.stack) under its config's preconditioning. ``base``: the pretrained denoiser that
    ``config.base`` records as brick 0 (lego.checkpoints.build_model loads it from the record)."""

    def __init__(self, config: LegoConfig, base: nn.Module | None = None):
        super().__init__(LegoStack(config, base), make_precond(config.precond, config.sigma_data), config.time_scale)

    @classmethod
    def from_name(cls, name: str, in_channels: int = 3, num_classes: int = 0, **overrides) -> LegoModel:
        return cls(model_config(name, in_channels=in_channels, num_classes=num_classes, **overrides))


class DiTModel(Denoiser):
    """DiT (lego.networks.dit) under its config's preconditioning, called exactly as a LegoModel."""

    def __init__(self, config: DiTConfig):
        super().__init__(DiT(config), make_precond(config.precond, config.sigma_data))


def check_inputs(
    sigma: torch.Tensor,
    class_labels,
    batch: int,
    num_classes: int,
    values: bool = True,
    null: str = "none, for guidance",
) -> None:
    """A denoiser's call: sigma [B] finite and >= 0, class labels one id per image in 0..num_classes (num_classes:
    the null class, which the message calls ``null``), none for an unconditional model. ``values=False`` checks
    only what costs no device sync."""
    labels = None if class_labels is None else check_label_ids(class_labels, batch, num_classes)
    if not values:
        return
    # One host sync for all the value checks (a sampler calls this every step); the messages below only on failure.
    ok = (torch.isfinite(sigma) & (sigma >= 0)).all()
    if labels is not None:
        ok = ok & ((labels >= 0) & (labels <= num_classes)).all().to(ok.device)
    if bool(ok):
        return
    if not (torch.isfinite(sigma) & (sigma >= 0)).all():
        raise ValueError(f"sigma must be finite and >= 0 (0 returns x), got {sigma.tolist()[:8]}")
    raise ValueError(
        f"class labels must be in 0..{num_classes - 1} ({num_classes}: {null}), "
        f"got {labels.min().item()}..{labels.max().item()}"
    )


def check_label_ids(class_labels, batch: int, num_classes: int) -> torch.Tensor:
    """``class_labels`` (a tensor or a list) holds one integer class id per image, for a model of ``num_classes``
    classes (0: unconditional, which takes none: the labels would be ignored); returns them as a tensor [batch]."""
    if not num_classes:
        raise ValueError(
            "class labels given to an unconditional model (num_classes=0); pass class_labels=None, or "
            "build the model with num_classes=K to condition it on K classes"
        )
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class labels must be integer class ids, got {labels.dtype}")
    if labels.numel() != batch:
        raise ValueError(f"{labels.numel()} class labels for a batch of {batch}")
    return labels


__all__ = ["BrickOutput", "Denoiser", "DiTModel", "LegoModel", "check_inputs", "check_label_ids"]
