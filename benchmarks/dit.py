"""The DiT baseline: diffusers' DiTTransformer2DModel behind the same EDM calling convention as LegoModel.

``DiTDenoiser(x, sigma, class_labels)`` returns D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels) with the
preconditioning LegoModel uses (lego.precond.EDMPrecond), so the samplers and a loss treat both models alike and
the comparison times the same work around the network. Its out_channels equal its in_channels (LEGO predicts C
channels; the original DiT also predicts a variance, which a speed comparison does not need). Attention runs
through PyTorch's SDPA (flash-attention kernels on a GPU). diffusers is optional: without it every DiT benchmark is
skipped with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

from lego.precond import EDMPrecond, as_batch_sigma


def diffusers_missing() -> str | None:
    """Why the DiT baseline cannot run here, or None when it can."""
    try:
        from diffusers import DiTTransformer2DModel  # noqa: F401
    except ImportError as e:
        return f"diffusers is not installed ({e}); the DiT baseline is skipped (pip install diffusers)"
    return None


class DiTDenoiser(nn.Module):
    def __init__(self, dit: nn.Module, num_classes: int, sigma_data: float = 0.5):
        super().__init__()
        self.dit = dit
        self.precond = EDMPrecond(sigma_data=sigma_data)
        self.sigma_min, self.sigma_max = self.precond.sigma_min, self.precond.sigma_max
        self.num_classes = num_classes
        self.in_channels = dit.config.in_channels

    def forward(self, x, sigma, class_labels=None, skip=()):
        if skip:
            raise ValueError("DiT has no bricks to skip")
        x = x.float()
        batch = x.shape[0]
        sigma = as_batch_sigma(sigma, batch, x.device)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in self.precond.coefficients(sigma))
        if class_labels is None:  # the null class: the embedding table's extra row, used for guidance
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        f = self.dit(c_in * x, c_noise.reshape(-1), class_labels.long(), return_dict=False)[0]  # (B, C, H, W)
        return c_skip * x + c_out * f.float()


def build_dit(config: dict, num_classes: int, device: torch.device) -> DiTDenoiser:
    """``config``: DiTTransformer2DModel arguments (num_attention_heads, attention_head_dim, num_layers, in_channels,
    sample_size, patch_size)."""
    from diffusers import DiTTransformer2DModel

    with torch.device(device):
        dit = DiTTransformer2DModel(**config, num_embeds_ada_norm=num_classes)
    return DiTDenoiser(dit, num_classes).to(device)


def dit_loss(net: DiTDenoiser, images, labels=None, generator=None):
    """EDM's loss for the DiT baseline, drawn like lego.LegoLoss (sigma, noise); returns (loss, None).

    Label dropout happens inside diffusers' label embedder in train mode (probability 0.1, as LegoLoss's default).
    """
    batch, device = images.shape[0], images.device
    sigma = net.precond.sample_sigma(batch, generator, device)  # (B,)
    noise = torch.randn(images.shape, generator=generator, device=device)
    x = images + sigma.view(-1, 1, 1, 1) * noise
    d = net(x, sigma, labels)  # (B, C, H, W)
    weight = net.precond.loss_weight(sigma).view(-1, 1, 1, 1)
    return (weight * (d - images) ** 2).mean(), None
