"""The backbone interface: what the preconditioning wrapper (``lego.diffusion.Denoiser``) calls, and what it gets back.

A backbone is an ``nn.Module`` (the LEGO stack, ``lego.networks.stack.LegoStack``; DiT, ``lego.networks.dit.DiT``)
whose forward is

    backbone(x, noise, class_labels=None, skip=frozenset(), patches=None, fill=None) -> list[BrickOutput]

- ``x`` [B, C, H, W]: the noisy canvas as the sampler holds it, not yet scaled: the backbone multiplies it by
  ``noise.c_in`` itself (a pretrained base brick needs x unscaled);
- ``noise``: a ``NoiseLevel``, sigma [B] and the preconditioning's coefficients for it;
- ``class_labels`` [B]: class ids, ``num_classes`` being the null class; None for the null class throughout;
- ``skip``: the brick indices not to run, already checked (0..num_bricks-1, not all of them);
- ``patches``: a ``PatchDraw`` (training: each patch-brick processes a random share of its patches), or None (all);
- ``fill`` [B, C, H, W]: the raw output a brick gives on the patches it does not process (the training target).

It returns the raw output F_k of every brick that ran, bottom to top. A backbone also has ``config`` (with ``name``
and ``resolution``, the training canvas), ``num_classes``, ``in_channels``, ``num_bricks``, ``max_brick`` (canvas
sides are multiples of it), ``top_is_image`` (whether the top brick sees the whole canvas), ``check_canvas(x)`` and
``brick_modules()`` (the modules holding its compute, one per brick: what ``--compile`` compiles and ``--fsdp`` shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lego import checks


@dataclass(frozen=True)
class NoiseLevel:
    """sigma [B] and the preconditioning's coefficients for it, each [B] (lego.diffusion.precond)."""

    sigma: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor  # what the time embedding sees (scaled as the model's config says)


@dataclass(frozen=True)
class PatchDraw:
    """Training's patch sampling: each patch-brick processes ``fraction`` of its patches per image, drawn with
    ``generator``. ``share=(start, total)``: the batch holds rows start.. of a batch of ``total``; patches are drawn for
    all of them and these rows kept, so a data-parallel run draws what a one-process run draws (lego.diffusion.loss)."""

    fraction: float
    generator: torch.Generator | None = None
    share: tuple[int, int] | None = None


@dataclass(frozen=True)
class BrickOutput:
    index: int  # which brick (0 = bottom)
    output: torch.Tensor  # F_k, the brick's raw output on the full canvas, [B, C, H, W]
    patch_index: torch.Tensor | None  # [B, P] patches it processed, None for all
    mask: torch.Tensor | None = None  # [B, 1, H, W] 1 where processed (None for all)
    denoised: torch.Tensor | None = None  # D_k = c_skip x + c_out F_k, filled in by the Denoiser


def check_batch_of_canvases(x: torch.Tensor, in_channels: int) -> tuple[int, int]:
    """``x`` is [B, in_channels, H, W]; returns (H, W). Each backbone adds its own rule for H and W."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of canvases [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"the input has {x.shape[1]} channels but the model was built for {in_channels}")
    return x.shape[2], x.shape[3]


def check_sizes(config) -> None:
    """The sizes every model config has are whole and positive (a damaged checkpoint's config fails here, not in a
    tensor allocation)."""
    for field in ("hidden_size", "num_heads", "in_channels", "resolution"):
        checks.integer(field, getattr(config, field), 1)
    checks.integer("num_classes", config.num_classes, 0)
    checks.real("sigma_data", config.sigma_data, 0, low_open=True)
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} does not split into {config.num_heads} heads")
